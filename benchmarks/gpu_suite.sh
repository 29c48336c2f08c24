#!/usr/bin/env bash
# What the dated GPU results under docs/ were produced with, on the lent H100 (see docs/usage.md):
#   bash benchmarks/gpu_suite.sh tests|swap|stress|zoo|soak|docs OUT_DIR [extra args]
# onnxruntime-gpu must be importable (PYTHONPATH=/tmp/site:$PWD after ../shared/gpu/stage.sh).
set -uo pipefail
what=${1:?tests, swap, stress, zoo, soak or docs}
out=${2:?an output folder}
shift 2
mkdir -p "$out"
export PYTHONFAULTHANDLER=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
python3 -c "import onnxruntime, numpy, sys; print('python', sys.version.split()[0], 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)" >> "$out/device.txt" 2>&1
case "$what" in
  tests)
    # the pycuda tests need pycuda: bash benchmarks/build_pycuda.sh DIR first (they skip without it)
    MODELCACHE_RESULTS_DIR="$out" python3 -m pytest -m gpu -q -rs -p no:cacheprovider \
      tests/devices tests/backends "$@" 2>&1 | tee "$out/pytest_gpu.log" | tail -15 ;;
  swap)
    python3 benchmarks/ort_swap.py --cycles 20 --slow-cycles 7 --json "$out/ort_swap.json" --check 2>&1 \
      | tee "$out/ort_swap.txt" ;;
  stress)
    models=/dev/shm/modelcache-stress
    [ "$(df --output=avail -B1G /dev/shm | tail -1)" -ge 40 ] || models=/tmp/modelcache-stress
    python3 -m modelcache stress --models 40 --min-size 64MiB --max-size 1GiB --budget 8GiB --threads 16 \
      --zipf-s 1.1 --requests 10000 --models-dir "$models" --json "$out/stress.json" --plot "$out/stress.png" \
      --no-progress "$@" 2>&1 | tee "$out/stress.txt" ;;
  zoo)
    python3 benchmarks/zoo.py --zoo /tmp/modelcache-zoo --json "$out/zoo.json" "$@" 2>&1 | tee "$out/zoo.txt" ;;
  soak)
    python3 benchmarks/soak.py --zoo /tmp/modelcache-zoo --json "$out/soak.json" "$@" 2>&1 | tee "$out/soak.txt" ;;
  docs)
    # the code blocks of README.md and docs/ marked <!-- gpu --> or <!-- slow: ... --> (tests/docs)
    MODELCACHE_DOCS_SLOW=1 python3 -m pytest -m "gpu or slow" -q -rA -p no:cacheprovider tests/docs "$@" 2>&1 \
      | tee "$out/pytest_docs.log" | tail -15 ;;
  *) echo "unknown: $what"; exit 2 ;;
esac

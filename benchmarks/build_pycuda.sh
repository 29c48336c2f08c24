#!/usr/bin/env bash
# Build pycuda from its sdist on a GPU machine with nvcc and no package index (the lent H100), for
# tests/devices/test_gpu_pycuda.py. DIR holds pycuda-*.tar.gz and the wheels of its pure-Python
# dependencies for the machine's Python (fetched where PyPI is reachable:
#   curl -LO <pycuda sdist URL from https://pypi.org/pypi/pycuda/json>
#   pip download --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 -d DIR \
#       pytools mako platformdirs siphash24 typing_extensions markupsafe).
#   bash benchmarks/build_pycuda.sh DIR [SITE]      then: export PYTHONPATH=SITE:$PYTHONPATH
# SITE (default /tmp/site) receives pycuda and its dependencies.
set -euo pipefail
dir=$(cd "${1:?a folder with the pycuda sdist and wheels}" && pwd)
site=${2:-/tmp/site}
cuda_root=${CUDA_ROOT:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
work=/tmp/pycuda-build
rm -rf "$work" && mkdir -p "$work" "$site"
tar xzf "$dir"/pycuda-*.tar.gz -C "$work"
cd "$work"/pycuda-*
echo "build_pycuda: $(basename "$PWD") against CUDA at $cuda_root ($("$cuda_root/bin/nvcc" --version | tail -1))"
python3 configure.py --cuda-root="$cuda_root" > configure.log
python3 setup.py -q build_ext -j "$(nproc)" > build.log 2>&1 || { tail -40 build.log; exit 1; }
python3 setup.py -q build > install.log 2>&1 || { tail -40 install.log; exit 1; }
rm -rf "$site/pycuda" && cp -r build/lib*/pycuda "$site/"
python3 -m pip install -q --no-index --find-links "$dir" --no-compile --target "$site" \
  pytools mako platformdirs siphash24 typing_extensions markupsafe
cd /
PYTHONPATH="$site:${PYTHONPATH:-}" python3 -c "import pycuda, pycuda.driver as d; d.init(); print('build_pycuda: pycuda', pycuda.VERSION_TEXT, 'CUDA driver', d.get_driver_version(), d.Device(0).name())"

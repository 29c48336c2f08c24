"""``import modelcache`` never imports Ray, and neither does ``import modelcache.ray``; without
Ray installed, using ``modelcache.ray`` says which extra to install."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_import_modelcache_does_not_import_ray():
    out = run("""
        import sys
        import modelcache as mc
        import numpy as np
        with mc.ModelCache(monitor=mc.SimulatedDevice(1000), device_budget=500, reserve=0) as cache:
            cache.register("a", lambda: np.zeros(10))
            with cache.use("a"):
                pass
        import modelcache.ray                      # the package imports Ray only when used
        print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_ray_the_error_names_the_extra():
    out = run("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import modelcache as mc
        import modelcache.ray as mcray
        for call in (mcray.routing_options, mcray.replica_devices, mcray.current_model_id):
            try:
                call()
            except mc.ModelCacheError as exc:
                assert "pip install 'modelcache[ray]'" in str(exc), exc
            else:
                raise AssertionError(f"{call.__name__} worked without Ray")
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

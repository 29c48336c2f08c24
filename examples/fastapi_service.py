"""A reference inference service: FastAPI serving the ONNX models of a folder through modelcache.

    pip install "modelcache[onnxruntime,service]"            # GPU: "modelcache[gpu,service]"
    MODELS_DIR=models uvicorn examples.fastapi_service:app --port 8000

Endpoints:

- ``POST /models/{model_id}/predict`` with ``{"inputs": {"x": [[...]]}}``: the model's outputs.
  ``model_id`` names ``MODELS_DIR/{model_id}.onnx``; models load on first use and move between
  the device, host RAM and disk as the cache decides.
- ``GET /models``: every model with its tier; ``GET /stats``: ``cache.stats()``;
  ``GET /metrics``: Prometheus (``modelcache.metrics``).
- ``GET /healthz`` (the process answers) and ``GET /readyz`` (startup has finished: the cache is
  open, onnx and onnxruntime are imported, the model folder exists; 503 until then and while
  shutting down).

Errors map to HTTP statuses: an unknown model 404, a refused id 400, a bad input 422 (the
client's), a full device or a timeout 503 with ``Retry-After``, a broken model file or a failed
run 500 (the server's). On shutdown (the app's lifespan) the cache drains: requests in flight
finish, new ones get 503, then every model is freed.

Inference never runs on the event loop: acquisition is ``async with load(model_id)`` (a hit is
served on the loop at once, a miss waits on modelcache's own threads), the run (with parsing the
input and writing the answer) goes to a thread pool as wide as the machine: Python code in more
threads than cores only queues for the GIL, and the event loop with it. Settings (environment): ``MODELS_DIR``,
``MODELCACHE_DEVICE_BUDGET`` (e.g. ``6GiB``), ``MODELCACHE_MAX_MODELS`` (ids registered at once),
``MODELCACHE_SIMULATE`` (a simulated device of that size on a machine without a GPU, e.g. ``1GiB``),
``MODELCACHE_DISK_DIR``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
from typing import Any, AsyncIterator, Dict, List, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

import modelcache as mc

logger = logging.getLogger("modelcache.example")

#: how each error reaches the client: (HTTP status, whose fault it is)
STATUS = [
    (mc.ModelNotFoundError, 404), (mc.ModelInputError, 422), (mc.ConfigError, 400),
    (mc.CacheClosedError, 503), (mc.DeviceBusyError, 503), (mc.LeaseTimeoutError, 503),
    (mc.ModelTooLargeError, 507), (mc.ModelCacheError, 500),
]


class PredictRequest(BaseModel):
    inputs: Dict[str, Any]               #: input name -> nested lists (shapes and dtypes as the model's)


def status_of(exc: mc.ModelCacheError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def create_app(models_dir: Optional[str] = None, cache_factory: Optional[Any] = None,
               max_models: Optional[int] = None, shutdown_timeout: float = 30.0,
               run_threads: Optional[int] = None) -> FastAPI:
    """The service. ``cache_factory()`` makes the :class:`modelcache.ModelCache` at startup
    (default: from the environment); ``max_models``: most model ids registered at once;
    ``run_threads``: threads running models (default: the machine's cores)."""
    run_threads = run_threads or os.cpu_count() or 2
    folder = models_dir or os.environ.get("MODELS_DIR", "models")
    limit = max_models or int(os.environ.get("MODELCACHE_MAX_MODELS", "64"))
    state: Dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the runtimes, imported before the service is ready: their first import (onnx and
        # onnxruntime: about half a second on a 2-core machine, holding the GIL) would otherwise
        # happen at the first request's load and stall the event loop under that first burst
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        cache = (cache_factory or cache_from_environment)()
        state["cache"] = cache

        @cache.multiplexed(backend="onnxruntime", max_models=limit,
                           session_options={"intra_op_num_threads": 1})
        async def load(model_id: str) -> str:
            return os.path.join(folder, f"{model_id}.onnx")
        state["load"] = load
        try:                                     # prometheus_client missing: /metrics says so
            from modelcache.metrics import register
            from prometheus_client import CollectorRegistry
            state["registry"] = CollectorRegistry()
            register(cache, registry=state["registry"])
        except ImportError as exc:
            state["metrics_error"] = str(exc)
        state["runs"] = concurrent.futures.ThreadPoolExecutor(run_threads, thread_name_prefix="inference")
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            # drains: requests holding a model finish, new ones get CacheClosedError (503)
            await run_in_threadpool(cache.close, shutdown_timeout)
            state["runs"].shutdown(wait=False)

    app = FastAPI(title="modelcache example service", lifespan=lifespan)

    @app.exception_handler(mc.ModelCacheError)
    async def cache_error(request: Request, exc: mc.ModelCacheError) -> JSONResponse:
        code = status_of(exc)
        if code >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": "1"} if code == 503 else None
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=code, headers=headers)

    @app.post("/models/{model_id}/predict")
    async def predict(model_id: str, request: Request) -> Response:
        path = os.path.join(folder, f"{model_id}.onnx")
        lease = state["load"](model_id)          # refuses ids with path separators or ".." (400)
        if not os.path.isfile(path):
            raise mc.ModelNotFoundError(f"no such model file: {path}", model=model_id)
        body = await request.body()
        async with lease as model:
            # parsing, the run and the answer's JSON all happen off the event loop, on a pool as
            # wide as the machine: more threads than cores only queue for the GIL, the loop too
            out = await asyncio.get_running_loop().run_in_executor(state["runs"], _run, model, model_id, body)
        return Response(out, media_type="application/json")

    @app.get("/models")
    async def models() -> List[Dict[str, Any]]:
        cache: mc.ModelCache = state["cache"]
        known = {e.name: e for e in cache.entries()}
        files = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".onnx"))
        return [{"model": name, "tier": str(known[name].tier) if name in known else "unregistered",
                 "device_bytes": known[name].device_bytes if name in known else 0} for name in files]

    @app.get("/stats")
    async def stats() -> Dict[str, Any]:
        return dict(state["cache"].stats())

    @app.get("/metrics")
    async def metrics() -> Response:
        if "registry" not in state:
            raise HTTPException(501, f"metrics need prometheus_client: {state.get('metrics_error')}")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(state["registry"]), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = bool(state.get("ready")) and os.path.isdir(folder)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    return app


def _run(model: Any, model_id: str, body: bytes) -> bytes:
    """Parse ``{"inputs": {name: nested lists}}``, run the model, return its outputs as JSON."""
    try:
        inputs = PredictRequest.model_validate_json(body).inputs
    except ValueError as exc:
        raise mc.ModelInputError(f"the body is not {{\"inputs\": {{name: array}}}}: {exc}", model=model_id) from None
    feed = {name: np.asarray(value, dtype=_dtype(model, model_id, name)) for name, value in inputs.items()}
    outputs = model.run(None, feed)
    return json.dumps({"model": model_id, "outputs": [np.asarray(o).tolist() for o in outputs]}).encode()


def _dtype(model: Any, model_id: str, name: str) -> Any:
    """The numpy dtype of input ``name`` (ONNX Runtime's type string, e.g. ``tensor(float)``)."""
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(float16)": np.float16, "tensor(bool)": np.bool_}
    for i in model.get_inputs():
        if i.name == name:
            return types.get(i.type, np.float32)
    raise mc.ModelInputError(f"unknown input {name!r}; the model's inputs are "
                             f"{[i.name for i in model.get_inputs()]}", model=model_id)


def cache_from_environment() -> mc.ModelCache:
    """A cache as the environment says (see the module docstring)."""
    simulate = os.environ.get("MODELCACHE_SIMULATE")
    monitor = mc.SimulatedDevice(simulate) if simulate else None
    return mc.ModelCache(device_budget=os.environ.get("MODELCACHE_DEVICE_BUDGET"), monitor=monitor,
                         reserve=0 if simulate else "512MiB", disk_dir=os.environ.get("MODELCACHE_DISK_DIR"))


app = create_app()

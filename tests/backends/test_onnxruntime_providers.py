"""The CUDA provider's options and session settings, read without a GPU: ONNX Runtime is replaced
by a stand-in that records what a session would be given."""
import pytest

from modelcache.backends.onnxruntime import sessions


class _SessionOptions:
    def __init__(self):
        self.entries = {}

    def add_session_config_entry(self, key, value):
        self.entries[key] = value


class _Ort:
    __version__ = "stand-in"

    class OrtAllocatorType:
        ORT_ARENA_ALLOCATOR = "arena"

    class OrtMemType:
        DEFAULT = "default"

    def __init__(self, refuse_arena=False):
        self.refuse_arena = refuse_arena
        self.registered = []

    def get_available_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def OrtMemoryInfo(self, *args):  # noqa: N802 - ONNX Runtime's name
        return args

    def OrtArenaCfg(self, cfg):  # noqa: N802
        return cfg

    def create_and_register_allocator_v2(self, provider, info, options, cfg):
        if self.refuse_arena:
            raise RuntimeError("no shared arena here")
        self.registered.append((provider, info, options, cfg))


@pytest.fixture
def ort(monkeypatch):
    fake = _Ort()
    monkeypatch.setattr(sessions, "ort_module", lambda: fake)
    monkeypatch.setattr(sessions, "_env_arenas", set())
    monkeypatch.setattr(sessions, "arena_errors", {})
    return fake


def test_cuda_sessions_run_on_one_stream_unless_the_user_says_otherwise(ort):
    provider = sessions.CudaProvider(1)
    (name, cuda), cpu = provider.providers({})
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert cuda["device_id"] == "1" and cuda["use_ep_level_unified_stream"] == "1"
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    (_, cuda), _ = provider.providers({"provider_options": {"use_ep_level_unified_stream": 0, "gpu_mem_limit": 1}})
    assert cuda["use_ep_level_unified_stream"] == "0" and cuda["gpu_mem_limit"] == "1"


def test_lifted_sessions_share_the_arena_and_keep_their_constants_out_of_it(ort):
    provider = sessions.CudaProvider(0)
    so = _SessionOptions()
    provider.configure(so, {}, weights_as_inputs=True)
    assert so.entries == {"session.use_env_allocators": "1", "session.use_device_allocator_for_initializers": "1"}
    assert len(ort.registered) == 1
    provider.configure(_SessionOptions(), {}, weights_as_inputs=True)
    assert len(ort.registered) == 1                 # registered once per device
    for options, lifted in (({}, False), ({"shared_arena": False}, True)):
        so = _SessionOptions()
        provider.configure(so, options, weights_as_inputs=lifted)
        assert so.entries == {}                     # a plain session keeps its own arena


def test_a_refused_shared_arena_is_reported_and_sessions_keep_their_own(monkeypatch):
    fake = _Ort(refuse_arena=True)
    monkeypatch.setattr(sessions, "ort_module", lambda: fake)
    monkeypatch.setattr(sessions, "_env_arenas", set())
    monkeypatch.setattr(sessions, "arena_errors", {})
    so = _SessionOptions()
    sessions.CudaProvider(0).configure(so, {}, weights_as_inputs=True)
    assert so.entries == {} and "no shared arena here" in sessions.arena_errors[0]

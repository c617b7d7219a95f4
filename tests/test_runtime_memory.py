"""The runtime's lean-memory settings: large freed blocks and the denoiser's arena go back to the OS before
the VAE decode instead of staying resident."""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "fixed":
        from runtime.sessions import return_large_frees_to_os
        assert return_large_frees_to_os()
    def rss_mib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
    mib = 1 << 20
    libc.free(libc.malloc(16 * mib))  # freeing an mmapped block raises glibc's dynamic threshold to 16 MiB
    before = rss_mib()
    blocks = [libc.malloc(8 * mib) for _ in range(5)]
    for block in blocks:
        ctypes.memset(block, 1, 8 * mib)
    for block in blocks[:4]:  # the fifth, still live, pins the heap's top
        libc.free(block)
    print(rss_mib() - before)
""")


TRIM_PROBE = textwrap.dedent("""
    import ctypes, sys
    from runtime.sessions import trim_heap
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
    size = 64 << 10
    before = rss_mib()
    blocks = [libc.malloc(size) for _ in range(201)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks[:-1]:
        libc.free(block)
    if sys.argv[1] == "trim":
        assert trim_heap()
    print(rss_mib() - before)
""")


# One run of a graph with two 32 MiB activations, with or without the releasing RunOptions.
ARENA_PROBE = textwrap.dedent("""
    import sys
    import numpy as np, onnxruntime as ort
    from onnx import helper as h, TensorProto as TP
    from runtime.sessions import releasing_arena_run_options
    def rss_mib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
    shape = h.make_tensor("shape", TP.INT64, [2], [4096, 2048])
    nodes = [h.make_node("Expand", ["x", "shape"], ["big"]), h.make_node("Add", ["big", "big"], ["twice"]),
             h.make_node("ReduceSum", ["twice"], ["out"], keepdims=0)]
    graph = h.make_graph(nodes, "probe", [h.make_tensor_value_info("x", TP.FLOAT, [1, 1])],
                         [h.make_tensor_value_info("out", TP.FLOAT, [])], [shape])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = rss_mib()
    options = releasing_arena_run_options() if sys.argv[1] == "release" else None
    session.run(None, {"x": np.ones((1, 1), np.float32)}, options)
    print(rss_mib() - before)
""")


def retained_mib(mode: str, probe: str = PROBE) -> float:
    out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_fixed_mmap_threshold_returns_freed_blocks():
    # Without the fix, four freed 8 MiB blocks stay resident in the heap; with it only the live one counts.
    assert retained_mib("default") > 24
    assert retained_mib("fixed") < 12


def test_lean_sessions_fix_the_threshold(monkeypatch, tmp_path):
    from runtime import sessions

    calls = []
    monkeypatch.setattr(sessions, "return_large_frees_to_os", lambda: calls.append(True) or True)
    monkeypatch.setattr(sessions, "_open", lambda path, provider, threads, arena=True: (path, arena))
    assert sessions.open_session(tmp_path / "a.onnx", "cpu") == ((tmp_path / "a.onnx", True), "cpu")
    assert calls == []
    assert sessions.open_session(tmp_path / "b.onnx", "cpu", arena=False) == ((tmp_path / "b.onnx", False), "cpu")
    assert calls == [True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim exists on Linux only")
def test_trim_heap_returns_free_holes():
    # 200 freed 64 KiB blocks (heap-served, below any mmap threshold) behind a live one stay resident until trimmed
    assert retained_mib("keep", TRIM_PROBE) > 8
    assert retained_mib("trim", TRIM_PROBE) < 2


def test_releasing_run_options_hand_the_arena_back():
    # ONNX Runtime keeps both 32 MiB activations in its arena after a plain run; the options free them
    kept = retained_mib("keep", ARENA_PROBE)
    assert kept > 48
    assert retained_mib("release", ARENA_PROBE) < kept - 24


class RecordingSession:
    def __init__(self, session):
        self.session, self.options = session, []

    def run(self, names, feeds, run_options=None):
        self.options.append(run_options)
        return self.session.run(names, feeds, run_options)


def test_sampler_releases_the_denoiser_arena_before_decoding(tmp_path):
    from runtime import Sampler
    from tests.runtime_fixtures import build_package

    latent_path, _ = build_package(tmp_path / "latent")
    pixel_path, _ = build_package(tmp_path / "pixel", pixel=True, learn_sigma=False, cfg_channels="all")
    for path, decodes in ((latent_path, True), (pixel_path, False)):
        sampler = Sampler(path, threads=1)
        sampler._denoiser = recorder = RecordingSession(sampler._denoiser)
        sampler([1, 2], steps=3, scheduler="ddim")
        sampler([1, 2], steps=2, scheduler="ddim", output_type="latent")  # no decode, nothing to make room for
        released = [options is not None for options in recorder.options]
        assert released == [False, False, decodes, False, False], (path, released)


def test_low_memory_sampler_holds_one_model_at_a_time(tmp_path):
    import gc
    import weakref

    import numpy as np

    from runtime import Sampler
    from tests.runtime_fixtures import build_package

    path, _ = build_package(tmp_path / "latent")
    reference = Sampler(path, threads=1)
    sampler = Sampler(path, threads=1, low_memory=True)
    opened = weakref.ref(sampler._denoiser)
    seen_at_decode = []
    decode = sampler._decode
    sampler._decode = lambda x: seen_at_decode.append((sampler._denoiser, opened())) or decode(x)
    for seed in (0, 1):  # the second call opens the denoiser again
        images = sampler([1, 2], steps=3, scheduler="ddim", seed=seed)
        np.testing.assert_array_equal(images, reference([1, 2], steps=3, scheduler="ddim", seed=seed))
    gc.collect()
    assert seen_at_decode == [(None, None), (None, None)]  # closed, and no reference left anywhere
    latents = sampler([3], steps=2, scheduler="ddim", output_type="latent")  # no decode: the denoiser stays
    assert sampler._denoiser is not None and latents.shape == (1, *sampler.latent_shape)
    pixel_path, _ = build_package(tmp_path / "pixel", pixel=True, learn_sigma=False, cfg_channels="all")
    assert not Sampler(pixel_path, threads=1, low_memory=True).low_memory  # nothing to decode, nothing to drop

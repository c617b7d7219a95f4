"""The runtime's lean-memory setting: large freed blocks go back to the OS instead of staying resident."""
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


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
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
    monkeypatch.setattr(sessions, "_open", lambda path, provider, threads, no_arena=False: (path, no_arena))
    opened, _ = sessions.open_sessions([tmp_path / "a.onnx", tmp_path / "b.onnx"], "cpu", no_arena=[tmp_path / "b.onnx"])
    assert calls == [True] and opened == [(tmp_path / "a.onnx", False), (tmp_path / "b.onnx", True)]
    sessions.open_sessions([tmp_path / "a.onnx"], "cpu")
    assert calls == [True]

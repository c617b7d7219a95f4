"""Inference sessions for the package's ONNX files on the requested execution provider.

onnxruntime is imported here on first use, not at `import runtime` (it alone costs ~0.2 s). The
TensorRT path lives in `runtime.tensorrt_session` (TensorRT and CUDA bindings) and is imported only
when provider="tensorrt" is asked for. Sessions only need `run(output_names, feeds) -> list[ndarray]`,
which ONNX Runtime guarantees is safe to call from several threads at once.
"""

import ctypes
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

PROVIDERS = ("cpu", "cuda", "tensorrt")
# ONNX Runtime's common-subexpression pass merges the dedicated Q/DQ pairs that calibration writes for
# products sharing one input (q, k, v projections); a DequantizeLinear with several consumers then cannot
# fuse into MatMulIntegerToFloat, and those products run in float on weights dequantized at every call
# (a diffusers-exported DiT-S/2 int8 step: 161 ms with the pass, 101 ms without; fp32 graphs arrive
# already deduplicated by the exporter).
DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]
# glibc serves allocations below its mmap threshold from the heap and, after freeing a large mmapped block,
# raises that threshold (up to 32 MiB). The VAE decoder's activations (up to 64 MiB at 256 px) and ONNX
# Runtime's weight reorders at load then land in the heap and stay resident after they are freed: sampler
# peak 1131 MB. A fixed 1 MiB threshold hands large blocks back to the OS at free: 778 MB, same speed.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


class Session(Protocol):
    def run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class ProviderUnavailable(RuntimeError):
    """The requested execution provider cannot run on this machine."""


def open_session(
    path: Path, provider: str, *, strict: bool = False, threads: int | None = None, arena: bool = True
) -> tuple[Session, str]:
    """Open `path` on `provider`; returns the session and the provider actually used.

    An unavailable provider falls back to CPU with a RuntimeWarning, or raises ProviderUnavailable
    when `strict`. arena=False runs on the CPU without ONNX Runtime's memory arena: for a model of few,
    large activations (the SD VAE decoder at 256 px) the arena's growth in doubling chunks keeps ~400 MB
    more at its peak (1188 vs 777 MB) and buys no speed. It also fixes glibc's mmap threshold for the
    process (see MMAP_THRESHOLD_BYTES).
    """
    check_provider(provider, threads)
    if not arena:
        return_large_frees_to_os()
    try:
        return _open(Path(path), provider, threads, arena), provider
    except ProviderUnavailable as error:
        if strict or provider == "cpu":
            raise
        warnings.warn(f"{error}; falling back to the CPU provider", RuntimeWarning, stacklevel=3)
        return _open(Path(path), "cpu", threads, arena), "cpu"


def check_provider(provider: str, threads: int | None = None) -> None:
    """Reject an unknown provider name or thread count before any file is hashed or opened."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; valid choices: {', '.join(PROVIDERS)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for ONNX Runtime's default), got {threads}")


def releasing_arena_run_options() -> Any:
    """ONNX Runtime RunOptions that hand the CPU arena's free chunks back to the OS when the run ends.

    The denoiser's arena holds its activations between steps (~40 MB for a DiT-S/2 CFG pair); released
    after the last step, they are not resident next to the VAE decoder's activations (sampler peak
    755 -> 717 MB at 256 px). The next call regrows the arena in its first step.
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def return_large_frees_to_os() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES; False where the C library is not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim); False where the C library is not glibc.

    A closed session leaves its many small allocations (graph, kernels, small weights) as free holes in
    the heap that glibc keeps resident: ~45 MB after closing a DiT-S/2 denoiser.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc() -> Any:
    """glibc with its malloc tuning calls, or None (not Linux; musl and other C libraries lack them)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _open(path: Path, provider: str, threads: int | None, arena: bool = True) -> Session:
    if provider == "tensorrt":
        return _open_tensorrt(path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ProviderUnavailable(
                "provider 'cuda' is unavailable: this onnxruntime build has no CUDAExecutionProvider "
                "(install onnxruntime-gpu instead of onnxruntime)"
            )
        session = ort.InferenceSession(
            str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            disabled_optimizers=DISABLED_OPTIMIZERS,
        )
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise ProviderUnavailable("provider 'cuda' is unavailable: ONNX Runtime could not start CUDA")
        return session
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS
    )


def _open_tensorrt(path: Path) -> Any:
    try:
        from runtime import tensorrt_session

        return tensorrt_session.open_session(path)
    except (ImportError, RuntimeError, OSError) as error:
        raise ProviderUnavailable(f"provider 'tensorrt' is unavailable: {error}") from error

"""Can this machine use TensorRT? Probe once, explain why not, and load the dit_ops plugins.

TensorRT is optional (extra `tensorrt`): its libraries only install on machines with NVIDIA's wheels,
and even where `import tensorrt` works a Builder cannot be created without a CUDA GPU ("CUDA
initialization failure"). Every TensorRT command and test asks `probe()` first and reports its reason.
This module imports nothing heavy at import time.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "MIN_VERSION", "PLUGIN_MODULES", "TensorRTStatus", "TensorRTUnavailable", "parse_version", "probe",
    "require_tensorrt", "load_tensorrt_plugins",
]

MIN_VERSION = (10, 9)  # tensorrt.plugin.aot_impl (Python AOT plugins) appeared in TensorRT 10.9
STRONGLY_TYPED_ONLY = (11, 0)  # TensorRT 11: networks are always strongly typed, no precision builder flags
PLUGIN_MODULES = (
    "dit_ops.downsampled_attention.trt_plugin",
    "dit_ops.local_window_attention.trt_plugin",
)
INSTALL_HINT = (
    "install it on a machine with an NVIDIA GPU: pip install 'dit-edge[tensorrt]' (see docs/gpu_deployment.md)"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU for it) is missing; the message says which and what to do."""


@dataclass(frozen=True)
class TensorRTStatus:
    available: bool
    version: str | None  # tensorrt.__version__ when importable
    reason: str  # why TensorRT cannot be used ("" when available)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return parse_version(self.version) if self.version else ()

    @property
    def strongly_typed_only(self) -> bool:
        """TensorRT >= 11: precision comes from the graph (casts, Q/DQ), never from builder flags."""
        return self.version_tuple >= STRONGLY_TYPED_ONLY


def parse_version(version: str) -> tuple[int, ...]:
    """'10.13.3.9' -> (10, 13, 3, 9); trailing non-numeric parts ('11.0.0rc1') are cut."""
    parts = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() != len(part):
            break
    if not parts:
        raise ValueError(f"cannot parse a TensorRT version from {version!r}")
    return tuple(parts)


@lru_cache(maxsize=1)
def probe() -> TensorRTStatus:
    """Import tensorrt, check its version, create a Builder (needs a CUDA GPU). Cached per process."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as err:
        return TensorRTStatus(False, None, f"TensorRT is not installed ({err}); {INSTALL_HINT}")
    except OSError as err:  # the Python bindings are there but libnvinfer is not
        return TensorRTStatus(False, None, f"TensorRT libraries could not be loaded ({err}); {INSTALL_HINT}")
    version = getattr(trt, "__version__", "0")
    if parse_version(version) < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        reason = f"TensorRT {version} is too old: >= {wanted} is needed for AOT Python plugins; {INSTALL_HINT}"
        return TensorRTStatus(False, version, reason)
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except (TypeError, RuntimeError) as err:  # pybind "factory function returned nullptr" without CUDA
        builder = None
        detail = f" ({err})"
    else:
        detail = ""
    if builder is None:
        return TensorRTStatus(
            False, version,
            f"TensorRT {version} is installed but no Builder could be created{detail}: "
            "no usable CUDA GPU or driver on this machine",
        )
    return TensorRTStatus(True, version, "")


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable with the probe's reason."""
    status = probe()
    if not status.available:
        raise TensorRTUnavailable(status.reason)
    return importlib.import_module("tensorrt")


def load_tensorrt_plugins() -> list[str]:
    """Register the dit_ops TensorRT plugins (Triton kernels) in this process; returns their ids.

    Needed to build engines and to run engines built with the JIT implementation; engines built with
    the AOT implementation (the default, see exporter.trt_engine) run without them.
    """
    require_tensorrt()
    try:
        importlib.import_module("triton")
    except ImportError as err:
        raise TensorRTUnavailable(f"the dit_ops plugins need Triton ({err}); {INSTALL_HINT}") from err
    ids = []
    for name in PLUGIN_MODULES:
        module = importlib.import_module(name)
        ids.append(module.tk.PLUGIN_ID)
    return ids

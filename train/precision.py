"""Which devices multiply in bfloat16 natively, so that `--bf16` can default to what is fast where it runs."""

from __future__ import annotations

from pathlib import Path

import torch

# x86 feature flags (Linux /proc/cpuinfo) of native bf16 dot products. Without them oneDNN emulates bf16
# and an autocast step is slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags; empty where /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True on CUDA GPUs with bf16 tensor cores (sm80+) and CPUs with AVX512-BF16 or AMX-BF16."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_flags(cpuinfo) & set(CPU_BF16_FLAGS))
    return False

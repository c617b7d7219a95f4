"""Torch-free runtime: sample exported DiT / U-DiT / CLEAR packages with numpy and ONNX Runtime."""

from runtime.manifest import PackageError
from runtime.sampler import Sampler
from runtime.schedulers import SCHEDULERS
from runtime.sessions import PROVIDERS, ProviderUnavailable

__all__ = ["PROVIDERS", "SCHEDULERS", "PackageError", "ProviderUnavailable", "Sampler"]

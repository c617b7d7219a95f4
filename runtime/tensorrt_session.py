"""Run a serialized TensorRT engine with numpy inputs and outputs (provider="tensorrt").

Torch-free: device memory and copies go through Polygraphy's TrtRunner (ctypes CUDA runtime wrapper).
Imported only when provider="tensorrt" is asked for; tensorrt itself is imported on first use.
Engines are built ahead of time next to their ONNX file (`engine_path_for`, written by
`exporter.trt_engine.build_engine` / `dit-export --engine trt`); engines built with the AOT plugins (the
default) need no plugin module here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dit_ops.tensorrt_probe import load_tensorrt_plugins, require_tensorrt

__all__ = ["ENGINE_SUFFIX", "engine_path_for", "TensorRTSession", "open_session"]

ENGINE_SUFFIX = ".engine"


def engine_path_for(onnx_path: str | Path) -> Path:
    """Where the engine of an ONNX file lives: same directory and name, suffix .engine."""
    return Path(onnx_path).with_suffix(ENGINE_SUFFIX)


class TensorRTSession:
    """One engine, one execution context; `run(output_names, feeds) -> list[ndarray]` like ONNX Runtime.

    Inputs are cast to the engine's dtypes; the batch must lie in the engine's optimization profile.
    Calls are serialized with a lock (a TensorRT execution context is not thread-safe).
    """

    def __init__(self, engine_path: str | Path, *, load_plugins: bool = False) -> None:
        trt = require_tensorrt()
        if load_plugins:  # only engines built with the JIT plugin implementation need them
            load_tensorrt_plugins()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {self.engine_path}")
        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.engine_path))))
        self._runner.activate()
        self._lock = threading.Lock()
        engine = self._runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {name: engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self.input_names = [name for name in names if is_input[name]]
        self.output_names = [name for name in names if not is_input[name]]
        self._dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in self.input_names}
        self._batch_range = {}
        for name in self.input_names:
            lo, _, hi = engine.get_tensor_profile_shape(name, 0)
            self._batch_range[name] = (lo[0], hi[0])

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing}; the engine takes {self.input_names}")
        wanted = list(output_names) if output_names else self.output_names
        unknown = [name for name in wanted if name not in self.output_names]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; the engine has {self.output_names}")
        feed = {}
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            lo, hi = self._batch_range[name]
            if array.ndim and not lo <= array.shape[0] <= hi:
                raise ValueError(
                    f"input {name!r} has batch {array.shape[0]}, outside the engine's profile [{lo}, {hi}]; "
                    "rebuild the engine with a wider batch range (dit-export --engine trt --max-batch ...)"
                )
            feed[name] = array
        with self._lock:
            outputs = self._runner.infer(feed, check_inputs=False)
            return [np.array(outputs[name], copy=True) for name in wanted]

    def close(self) -> None:
        if self._runner.is_active:
            self._runner.deactivate()

    def __enter__(self) -> TensorRTSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_session(path: str | Path, *, load_plugins: bool = False) -> TensorRTSession:
    """Session for an engine file, or for an ONNX file whose engine was built next to it."""
    path = Path(path)
    require_tensorrt()  # report a missing TensorRT / GPU before a missing engine
    engine = path if path.suffix == ENGINE_SUFFIX else engine_path_for(path)
    if not engine.is_file():
        raise FileNotFoundError(
            f"no TensorRT engine for {path.name}: expected {engine}; build it on this GPU with "
            "`dit-export ... --engine trt` (exporter.trt_engine.build_engine)"
        )
    return TensorRTSession(engine, load_plugins=load_plugins)

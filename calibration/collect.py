"""Denoiser inputs from real sampling trajectories, and their activation ranges per step."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from calibration.ranges import StepRanges, amax_from_reduce_outputs
from runtime import Sampler


class _RecordingSession:
    """Stands in for the sampler's denoiser session and keeps every feed, keyed by step index."""

    def __init__(self, session: Any, steps: int) -> None:
        self._session, self._steps, self._calls = session, steps, 0
        self.feeds: list[tuple[int, dict[str, np.ndarray]]] = []

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append((self._calls % self._steps, {k: v.copy() for k, v in feeds.items()}))
        self._calls += 1
        return self._session.run(output_names, feeds)


def collect_feeds(
    sampler: Sampler,
    labels: np.ndarray,
    *,
    steps: int,
    scheduler: str,
    guidance_scale: float,
    batch_size: int,
    seed: int,
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Run the runtime's own sampling loop over `labels` and return (step, feed) for every denoiser call."""
    recorder = _RecordingSession(sampler._denoiser, steps)
    original, sampler._denoiser = sampler._denoiser, recorder
    try:
        for start in range(0, len(labels), batch_size):
            chunk = labels[start : start + batch_size]
            sampler(chunk, steps=steps, scheduler=scheduler, guidance_scale=guidance_scale,
                    seed=seed + start, output_type="latent")
    finally:
        sampler._denoiser = original
    return recorder.feeds


def record_step_ranges(
    fp32_path: Path, feeds: list[tuple[int, dict[str, np.ndarray]]], steps: int, op_types: tuple[str, ...]
) -> StepRanges:
    """Abs-max of every tensor the quantizer will touch, per feed, through ONNX Runtime's augmented model."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    ranges = StepRanges(steps)
    with tempfile.TemporaryDirectory(prefix="dit-edge-calib.") as tmp:
        calibrator = MinMaxCalibrater(
            str(fp32_path), list(op_types), str(Path(tmp) / "augmented.onnx"), symmetric=True
        )
        calibrator.augment_graph()
        calibrator.create_inference_session()
        session = calibrator.infer_session
        names = [o.name for o in session.get_outputs()][calibrator.num_model_outputs :]
        for step, feed in feeds:
            values = session.run(names, feed)
            ranges.record(step, amax_from_reduce_outputs(names, values))
    return ranges

"""Frechet distance, PSNR, sample grids, the digit classifier and the end-of-run digit evaluation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.classifier import DigitClassifier, random_shift
from train.distill import psnr
from train.metrics import digit_metrics, frechet_distance
from train.sampling import save_grid


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 5, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)
    # scaling by c: (c - 1)^2 |mu|^2 + tr(S) + c^2 tr(S) - 2 c tr(S) = (c - 1)^2 (|mu|^2 + tr(S))
    expected = 4 * (a.mean(0).pow(2).sum().item() + torch.cov(a.T).trace().item())
    assert frechet_distance(a, 3 * a) == pytest.approx(expected, rel=1e-6)
    # against scipy's matrix square root on correlated features
    import scipy.linalg

    b = a @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 0.3
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = np.sum((a.mean(0) - b.mean(0)).numpy() ** 2) + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(a, a[:, :3])


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    assert psnr(x, x + 0.2) == pytest.approx(10 * np.log10(1 / 0.01), rel=1e-5)  # 0.2 in [-1,1] = 0.1 on [0,1]


def test_save_grid(tmp_path):
    images = torch.linspace(-1, 1, 6).reshape(6, 1, 1, 1).expand(6, 1, 3, 3)
    path = save_grid(images, 3, tmp_path / "g.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 5 + 2, 3 * 5 + 2)
    assert grid[2, 2] == 0 and grid[7, 12] == 255 and grid[0, 0] == 255


def test_random_shift_moves_content():
    x = -torch.ones(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1
    shifted = random_shift(x, torch.Generator().manual_seed(0), pixels=2)
    assert shifted.shape == x.shape and (shifted == 1).sum() == 1
    y, x_ = (shifted[0, 0] == 1).nonzero()[0].tolist()
    assert abs(y - 4) <= 2 and abs(x_ - 4) <= 2


def test_digit_metrics_with_a_known_classifier():
    classifier = DigitClassifier().eval()
    images = torch.rand(20, 1, 32, 32) * 2 - 1
    predicted = classifier(images).argmax(1)
    labels = predicted.clone()
    labels[:5] = (labels[:5] + 1) % 10
    scores = digit_metrics(classifier, images, labels, images)
    assert scores["class_accuracy"] == 0.75 and scores["frechet_distance"] == pytest.approx(0, abs=1e-3)


def test_end_of_run_evaluation(tmp_path, monkeypatch):
    """The default run's metrics.json, with a small untrained classifier standing in for the cached one."""
    import train.evaluate as evaluate
    from train.config import build_config
    from train.loop import train as run

    monkeypatch.setattr(evaluate, "load_classifier", lambda: (DigitClassifier().eval(), 0.5))
    out = run(build_config("tiny", None, out=str(tmp_path / "run"), steps=2, eval_per_class=3), progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 30 and 0 <= metrics["class_accuracy"] <= 1
    assert sorted(metrics["per_class_accuracy"]) == [str(i) for i in range(10)]
    assert metrics["frechet_distance"] > 0 and metrics["reference"]["classifier_held_out_accuracy"] == 0.5
    assert metrics["sampler"] == {"kind": "ddpm", "steps": 4, "guidance_scale": 2.0, "cfg_channels": "all", "per_class": 3}
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (10 * 34 + 2, 3 * 34 + 2)  # a row per class

"""Sample quality on the digits: class accuracy by the cached CNN and a Frechet distance in its feature space.

The Frechet distance is FID's formula on the classifier's 128-d features instead of Inception's:
|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).
"""

from __future__ import annotations

import torch

from .classifier import DigitClassifier


@torch.no_grad()
def features(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), computed in float64."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets with equal D, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def digit_metrics(
    classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, real_images: torch.Tensor
) -> dict:
    """Class accuracy (overall and per class) of generated `images` for their `labels`, and the Frechet
    distance of their features to those of `real_images` (all in [-1, 1], (N, 1, 32, 32))."""
    logits = torch.cat([classifier(images[i : i + 500]) for i in range(0, len(images), 500)])
    correct = logits.argmax(1) == labels
    per_class = {int(k): round(correct[labels == k].float().mean().item(), 4) for k in labels.unique()}
    return {
        "class_accuracy": round(correct.float().mean().item(), 4),
        "per_class_accuracy": per_class,
        "frechet_distance": round(frechet_distance(features(classifier, images), features(classifier, real_images)), 3),
        "num_samples": len(images),
    }

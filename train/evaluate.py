"""End-of-run evaluation on the digits: N CFG samples per class -> class accuracy and Frechet distance.

Reference points are reported beside the score so it can be read: the classifier's own accuracy on held-out
real digits, and the Frechet distance of real held-out digits (and of their VAE reconstructions) to the
real training digits, the best a generator can do with this classifier and this VAE.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .classifier import HELD_OUT_EVERY, load_classifier
from .config import TrainConfig
from .data import load_mnist, to_model_range
from .metrics import digit_metrics, features, frechet_distance
from .sampling import latents_to_images, sample_latents, save_grid
from .vae import posterior


@torch.no_grad()
def sample_digits(model, vae, scaling_factor: float, latent_shape, config: TrainConfig, per_class: int):
    """`per_class` CFG samples of every digit with the evaluation sampler: (images in [-1, 1], labels)."""
    labels = torch.arange(10).repeat_interleave(per_class)
    latents = sample_latents(model, labels, latent_shape, config.eval_steps, config.eval_guidance_scale,
                             config.cfg_channels, seed=config.seed + 1)
    return latents_to_images(vae, scaling_factor, latents), labels


@torch.no_grad()
def progress_scores(model, vae, scaling_factor: float, latent_shape, config: TrainConfig, per_class: int) -> dict:
    """Class accuracy and Frechet distance of a smaller sample, for the accuracy-vs-time curve (--eval-every)."""
    classifier, _ = load_classifier()
    images, labels = sample_digits(model, vae, scaling_factor, latent_shape, config, per_class)
    real = to_model_range(load_mnist(32)[0])
    scores = digit_metrics(classifier, images, labels, real[torch.arange(len(real)) % HELD_OUT_EVERY != 0])
    return {"eval_class_accuracy": scores["class_accuracy"], "eval_frechet_distance": scores["frechet_distance"],
            "eval_samples": len(images)}


@torch.no_grad()
def evaluate_digits(model, vae, scaling_factor: float, latent_shape, config: TrainConfig, out: Path) -> dict:
    """Sample `eval_per_class` digits of every class, save the grid (10 per class), score them."""
    tick = time.time()
    classifier, classifier_accuracy = load_classifier()
    classifier_s = time.time() - tick
    tick = time.time()
    images, labels = sample_digits(model, vae, scaling_factor, latent_shape, config, config.eval_per_class)
    sampling_s = time.time() - tick
    columns = min(10, config.eval_per_class)
    pick = torch.cat([torch.arange(c * config.eval_per_class, c * config.eval_per_class + columns) for c in range(10)])
    save_grid(images[pick], columns, out / "samples.png")

    real, real_labels = load_mnist(32)
    real = to_model_range(real)
    held_out = torch.arange(len(real)) % HELD_OUT_EVERY == 0
    scores = digit_metrics(classifier, images, labels, real[~held_out])
    train_features = features(classifier, real[~held_out])
    reference = {"classifier_held_out_accuracy": round(classifier_accuracy, 4),
                 "real_held_out_frechet_distance": round(frechet_distance(features(classifier, real[held_out]), train_features), 3)}
    if vae is not None:
        device = next(vae.parameters()).device
        reconstructed = latents_to_images(vae, 1.0, posterior(vae, real[held_out].to(device))[0].cpu())
        reference["vae_reconstruction_frechet_distance"] = round(frechet_distance(features(classifier, reconstructed), train_features), 3)
        reference["vae_reconstruction_accuracy"] = round(
            (classifier(reconstructed).argmax(1) == real_labels[held_out]).float().mean().item(), 4)
    return {
        **scores,
        "reference": reference,
        "sampler": {"kind": "ddpm", "steps": config.eval_steps, "guidance_scale": config.eval_guidance_scale,
                    "cfg_channels": config.cfg_channels, "per_class": config.eval_per_class},
        "eval_timings": {"classifier_s": round(classifier_s, 1), "sampling_s": round(sampling_s, 1)},
    }

"""`python -m train`: training, the digit VAE and CLEAR distillation (see docs/training.md).

Modules: cli (typer app), config (settings and presets), loop (the run), data / latents (inputs), vae,
ema, checkpoint, distributed, sampling, classifier / metrics / evaluate (digit scores), distill.
"""

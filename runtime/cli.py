"""`dit-sample`: sample a grid of class-conditional images from an exported package into a PNG."""

from pathlib import Path

import typer

from runtime.images import image_grid, write_png
from runtime.sampler import Sampler
from runtime.schedulers import SCHEDULERS
from runtime.sessions import PROVIDERS

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def sample(
    package: Path = typer.Argument(..., help="Package directory written by dit-export."),
    class_label: list[int] = typer.Option(..., "--class-label", "-c", help="Class to sample; repeat for more."),
    num_per_class: int = typer.Option(1, min=1, help="Images per class label (one grid row per label)."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: 250 for ddpm, 50 otherwise)."),
    scheduler: str = typer.Option("ddpm", help=f"One of: {', '.join(SCHEDULERS)}."),
    guidance_scale: float = typer.Option(4.0, help="Classifier-free guidance scale; 1 disables guidance."),
    seed: int = typer.Option(0, min=0, help="Seed of the first image; image i uses seed + i."),
    eta: float = typer.Option(0.0, help="DDIM noise (ddim only)."),
    precision: str = typer.Option("fp32", help="Denoiser precision from the package (fp32, fp16, int8...)."),
    provider: str = typer.Option("cpu", help=f"Execution provider: {', '.join(PROVIDERS)}."),
    strict: bool = typer.Option(False, help="Fail instead of falling back to CPU when the provider is unavailable."),
    threads: int | None = typer.Option(None, min=1, help="ONNX Runtime intra-op threads (default: its own)."),
    low_memory: bool = typer.Option(
        False, help="Hold one model at a time: close the denoiser before the VAE decode (lower peak memory)."
    ),
    out: Path = typer.Option(Path("samples.png"), help="PNG file to write."),
) -> None:
    """Sample num-per-class images for each --class-label and write them as one PNG grid."""
    from tqdm import tqdm

    try:
        sampler = Sampler(
            package, provider=provider, precision=precision, strict=strict, threads=threads, low_memory=low_memory
        )
        labels = [label for label in class_label for _ in range(num_per_class)]
        with tqdm(desc="denoising", unit="step") as bar:

            def progress(step: int, total: int) -> None:
                bar.total = total
                bar.update(1)

            images = sampler(
                labels,
                steps=steps,
                guidance_scale=guidance_scale,
                scheduler=scheduler,
                seed=seed,
                eta=eta,
                progress=progress,
            )
    except (ValueError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    path = write_png(out, image_grid(images, columns=num_per_class))
    typer.echo(f"wrote {len(images)} images ({sampler.provider}, {precision}) to {path}")


if __name__ == "__main__":
    app()

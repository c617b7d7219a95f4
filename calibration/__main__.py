"""`python -m calibration PACKAGE --precision int8`: timestep-aware PTQ of an exported package."""

from pathlib import Path

import typer

from calibration.calibrate import calibrate
from calibration.classifier import package_classifier

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    package: Path = typer.Argument(..., help="package directory written by dit-export"),
    precision: str = typer.Option("int8", help="int8 (ONNX Runtime and TensorRT) or fp8 (TensorRT only)"),
    samples: int = typer.Option(32, help="calibration samples (random labels), each sampled for --steps steps"),
    steps: int = typer.Option(20, help="denoising steps of the calibration trajectories"),
    scheduler: str = typer.Option("dpm++2m", help="runtime scheduler used for the trajectories"),
    guidance_scale: float = typer.Option(4.0, help="CFG scale of the calibration trajectories"),
    method: str = typer.Option("minmax", help="range aggregation written: minmax, or timestep (TensorRT demo: min over the first percentile x steps); the report measures both"),
    percentile: float = typer.Option(1.0, help="timestep method: min over the first percentile x steps"),
    batch_size: int = typer.Option(8, help="samples per sampling call"),
    eval_samples: int = typer.Option(16, help="samples for the PSNR / accuracy report"),
    seed: int = typer.Option(0),
) -> None:
    try:
        calibrate(package, precision, samples=samples, steps=steps, scheduler=scheduler,
                  guidance_scale=guidance_scale, method=method, percentile=percentile,
                  batch_size=batch_size, eval_samples=eval_samples, seed=seed,
                  classifier=package_classifier(package))
    except (ValueError, FileNotFoundError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2)


if __name__ == "__main__":
    app()

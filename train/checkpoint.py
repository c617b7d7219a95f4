"""Checkpoint directories (docs/architecture.md), written atomically and read safely.

    checkpoint/
      config.json          model name + every constructor kwarg, attention, diffusion, VAE, data, cfg_channels
      model.safetensors    EMA weights (unfused training form)
      vae/                 the AutoencoderKL, when it was trained by this tool
      resume/              model.safetensors (raw weights), optimizer.pt, state.json (step, epoch, ...)

A new checkpoint is written into a hidden sibling directory, every file fsynced, then swapped in with
renames. A crash at any point leaves either the previous or the new checkpoint complete under
`checkpoint/` (or, between the two renames, the previous one under `.checkpoint.old`, which the readers
recover). A failed write (e.g. a full disk) removes the partial directory and raises CheckpointError.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

FORMAT = "dit-edge-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


def write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync one file (the single place that touches the disk, so tests can simulate ENOSPC)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """safetensors bytes of a state_dict (contiguous, shared storage broken)."""
    return save({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()})


def copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            write_bytes(dst / item.name, item.read_bytes())


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> Path:
    """Finish an interrupted swap: if only `.<name>.old` exists, move it back. Returns the checkpoint path."""
    path = Path(path)
    if not path.exists() and _old(path).is_dir():
        os.replace(_old(path), path)
    return path


def save_checkpoint(
    path: str | Path,
    config: dict,
    ema_model: torch.nn.Module,
    resume: dict | None = None,
    vae_dir: str | Path | None = None,
) -> Path:
    """Atomically replace the checkpoint at `path`.

    resume: {"model": raw module, "optimizer": optimizer, "state": json-able dict} or None (export-only dir).
    vae_dir: a VAE directory to copy in as `vae/` (config["vae"]["path"] should then be "vae").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
        write_bytes(tmp / "model.safetensors", state_dict_bytes(ema_model))
        if vae_dir is not None:
            copy_tree(Path(vae_dir), tmp / "vae")
        if resume is not None:
            (tmp / "resume").mkdir()
            write_bytes(tmp / "resume" / "model.safetensors", state_dict_bytes(resume["model"]))
            buffer = io.BytesIO()
            torch.save(resume["optimizer"].state_dict(), buffer)
            write_bytes(tmp / "resume" / "optimizer.pt", buffer.getvalue())
            write_bytes(tmp / "resume" / "state.json", json.dumps(resume["state"], indent=2).encode())
            fsync_dir(tmp / "resume")
        fsync_dir(tmp)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if error.errno == errno.ENOSPC else str(error)
        kept = f"the previous checkpoint in {path} is intact" if path.exists() else "no previous checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}") from error
    if path.exists():
        shutil.rmtree(_old(path), ignore_errors=True)
        os.replace(path, _old(path))
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(_old(path), ignore_errors=True)
    return path


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint directory, validated."""
    path = recover(path)
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(f"{file} is not a {FORMAT} version {VERSION} config")
    return config


def load_model(path: str | Path, weights: str = "model.safetensors") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model recorded in config.json (linearized if attention is local) and load its weights."""
    import models

    path = recover(path)
    config = read_config(path)
    model = models.create_model(config["model"]["name"], **config["model"]["kwargs"])
    attention = config.get("attention", {"kind": "full"})
    if attention.get("kind") == "local":
        model = models.linearize(model, attention["radius"], attention.get("down_factor") or None)
    state = load_file(path / weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / weights} does not fit {config['model']['name']}: missing {missing}, unexpected {unexpected}")
    return model, config


def load_resume(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore raw weights and optimizer state in place; returns resume/state.json."""
    path = recover(path)
    resume = path / "resume"
    if not (resume / "state.json").is_file():
        raise CheckpointError(f"{path} has no resume state (resume/state.json); it cannot be resumed")
    model.load_state_dict(load_file(resume / "model.safetensors"))
    optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
    return json.loads((resume / "state.json").read_text())

"""Checkpoints: what one holds, writing it atomically, reading it safely, and the network it describes.

A checkpoint is self-describing (weights, optimizer, config, epoch, metrics, served threshold, package versions),
so the registry, serving, batch scoring, export and evaluation rebuild the model from it alone. They import this
module, not the training loop: serving a model pulls in no training code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anodfd.config import Config, ConfigError
from anodfd.model import AnoDFDNet, build_model, optimize_for_inference
from anodfd.versions import package_versions, warn_if_trained_elsewhere

CHECKPOINT_VERSION = 1


def checkpoint_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int, config: Config,
    metrics: dict[str, float], best: tuple[float, float],
) -> dict:
    """Self-describing: enough on its own to rebuild the model, report on it, or resume training."""
    model = getattr(model, "module", model)  # unwrap DDP
    return {
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "config": config.to_dict(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "threshold": float(metrics.get("calibrated_threshold", config.train.threshold)),
        "best": [float(v) for v in best],  # selection key of the best epoch so far, see `selection_key`
        "versions": package_versions(),  # predict, score and serving warn when they run under others
    }


def save_checkpoint(ckpt: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half checkpoint under the real name


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint file (or a folder's ``checkpoint.pt``) read safely and checked to describe a model
    (`check_checkpoint`): one `ConfigError` naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    ckpt = read_checkpoint(path, map_location)
    check_checkpoint(ckpt, path)
    return ckpt


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """What a checkpoint file holds (``weights_only=True``), unchecked: for ranking a run's own epochs by their
    metrics without building a model per epoch."""
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found; pass the .pt file written by `anodfd train`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        # torch's message runs to a page; what the safe unpickler met is the line after "WeightsUnpickler error".
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
        first = ("not a checkpoint torch can load safely: " + lines[marker + 1]
                 if marker is not None and marker + 1 < len(lines) else lines[0])[:160]
        raise ConfigError(f"{path}: not a readable anodfd checkpoint ({first}); pass a .pt file written by "
                          "`anodfd train`") from None
    return ckpt


def check_checkpoint(ckpt: Any, source: str | Path = "the checkpoint") -> Config:
    """The config of a checkpoint whose parts fit together, or one `ConfigError` naming ``source``.

    torch.load accepts any tensors and dicts, so a file can load and still be no model: a saved tensor, a dict
    without a config, another variant's weights, a config no network can be built from. Everything that builds a
    model from a checkpoint comes through here first, so that is one line, not a traceback from deep in torch.
    The weights are compared by name and shape with the network built on the meta device: no memory, no compute.
    """
    fix = "pass a .pt file written by `anodfd train`"
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{source}: holds a {type(ckpt).__name__}, not an anodfd checkpoint (a dict with 'config' "
                          f"and 'model'); {fix}")
    missing = [k for k in ("config", "model") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise ConfigError(f"{source}: not an anodfd checkpoint (no {' or '.join(map(repr, missing))} dict); {fix}")
    try:
        config = Config.from_dict(ckpt["config"])
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in
                        build_model(dataclasses.replace(config.model, pretrained=False)).state_dict().items()}
    except (ConfigError, TypeError, AttributeError, ValueError, RuntimeError, AssertionError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{source}: its config cannot describe a model ({why}); {fix}") from None
    got = {k: tuple(v.shape) for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    wrong = sorted((set(expected) ^ set(ckpt["model"])) | {k for k in expected if expected[k] != got.get(k, ())})
    if wrong:
        raise ConfigError(f"{source}: its weights do not fit its config's model {config.model.name} ({len(wrong)} "
                          f"of {len(expected)} tensors missing, extra or of another shape, e.g. {wrong[0]!r}); {fix}")
    return config


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu",
                          source: str | Path = "the checkpoint") -> tuple[nn.Module, Config]:
    config = check_checkpoint(ckpt, source)
    # Pretrained weights would only be downloaded to be overwritten by the checkpoint's.
    model = build_model(dataclasses.replace(config.model, pretrained=False))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


def inference_model(ckpt: dict, device: torch.device | str = "cpu",
                    source: str | Path = "the checkpoint") -> tuple[nn.Module, Config]:
    """The checkpoint's network as eval, predict, the pyfunc and score run it: for AnoDFDNet, BatchNorm folded
    into the convolutions and weights channels_last (`optimize_for_inference`; about 6% more pairs/s on CPU),
    equal to the eval-mode model up to float rounding. Export and training keep `model_from_checkpoint`'s."""
    model, config = model_from_checkpoint(ckpt, device, source)
    warn_if_trained_elsewhere(ckpt)
    return (optimize_for_inference(model) if isinstance(model, AnoDFDNet) else model), config

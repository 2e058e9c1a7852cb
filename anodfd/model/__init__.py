"""The network: tensors in, tensors out (no files, Ray or MLflow).

Example: `build_model(ModelConfig(name="paper", depth=2))(hist, cur)` maps two Bx3xHxW images in
[-1, 1] to Bx1xHxW anomaly logits. Every name in `anodfd.config.MODEL_NAMES` builds such a network:
AnoDFDNet variants (`anodfdnet.py`) and the baselines it is compared with (`baselines.py`).
"""

from torch import nn

from anodfd.config import BASELINE_NAMES, ModelConfig
from anodfd.model.anodfdnet import (
    TRANSFORMER_DEFAULTS,
    AnoDFDNet,
    count_parameters,
    optimize_for_inference,
)
from anodfd.model.anodfdnet import build_model as build_anodfdnet


def build_model(config: ModelConfig) -> nn.Module:
    """The network named by `config.name` (randomly initialised unless `config.pretrained`)."""
    if config.name in BASELINE_NAMES:
        return build_baseline(config)
    return build_anodfdnet(config)


def build_baseline(config: ModelConfig) -> nn.Module:
    """A baseline network; `baselines.py` is imported only here, as its segmentation_models_pytorch and timm
    add seconds to the start of every process (each Ray worker, each CLI call) that never builds one."""
    from anodfd.model.baselines import build_baseline as build

    return build(config)


__all__ = [
    "TRANSFORMER_DEFAULTS",
    "AnoDFDNet",
    "build_anodfdnet",
    "build_baseline",
    "build_model",
    "count_parameters",
    "optimize_for_inference",
]

"""One typed config flows from the command line (or a search space) down to data, model and loop.

The whole `Config` is logged to MLflow and saved in every checkpoint, so `Config.from_dict(ckpt["config"])`
is all it takes to rebuild the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad setting, phrased for the person who has to fix it."""


ANODFD_NAMES = ("paper", "tiny", "resnet18", "resnet34", "efficientnet_b0", "convnext_atto")
# Networks to compare with (see anodfd.model.baselines); they take the same (history, current) pair.
BASELINE_NAMES = ("unet", "unet-cat", "deeplabv3plus", "deeplabv3plus-cat", "fc-siam-diff")
MODEL_NAMES = ANODFD_NAMES + BASELINE_NAMES
DEPTHS = (0, 1, 2, 4, 8)


@dataclass
class DataConfig:
    data: str = ""  # dataset folder; named datasets (OL, FB, Diff) are resolved to a folder before this
    layout: str = "auto"  # auto | paper (cur,hist,gt lists) | abl (A/ B/ label/ list/)
    image_size: int = 256  # square side the pair is resized to (the paper: 256)
    augment: str = "paper"  # none | paper (flips, 180 rotation) | strong (+ scale/shift, photometric)
    misregister: float = 0.0  # max independent shift/rotation/scale of history, as a fraction (0.03 = 3%)
    val_fraction: float = 0.2  # used only when a dataset ships no validation list (the paper's 8:2)
    cache_dir: str = ""  # on-disk decode cache; "" = $ANODFD_CACHE_DIR or ~/.cache/anodfd
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    name: str = "paper"  # one of MODEL_NAMES
    # AnoDFDNet only, like image_size, hidden, heads and mlp: the baselines ignore them (depth is still
    # checked against DEPTHS for every model).
    depth: int = 2  # Transformer layers over the deepest difference map; 0 = no Transformer
    image_size: int = 256  # grid the position embedding is learned for (interpolated for other sizes)
    hidden: int = 0  # Transformer width; 0 = the variant's default (paper: 1024)
    heads: int = 0  # 0 = the variant's default (paper: 16)
    mlp: int = 0  # 0 = the variant's default (paper: 2048)
    pretrained: bool = False  # ImageNet encoder (timm variants, smp baselines); opt-in, downloads weights

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"unknown model {self.name!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.depth not in DEPTHS:
            raise ConfigError(f"depth {self.depth} is not one of {DEPTHS}")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 4  # per worker; the global batch is batch_size * workers
    lr: float = 2e-4
    beta1: float = 0.5  # the official code's Adam betas
    beta2: float = 0.999
    weight_decay: float = 0.0
    bce_weight: float = 1.0
    dice_weight: float = 0.0
    focal_weight: float = 0.0
    pos_weight: float = 1.0  # BCE weight of anomalous pixels (they are often under 1%)
    threshold: float = 0.5  # the paper's fixed threshold; a calibrated one is stored beside it
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 0  # print a progress line every N steps inside an epoch; 0 = once per epoch
    max_steps_per_epoch: int = 0  # 0 = whole epoch; small values make smoke runs and tests quick


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(
            data=_build(DataConfig, d.get("data", {})),
            model=_build(ModelConfig, d.get("model", {})),
            train=_build(TrainConfig, d.get("train", {})),
        )

    def flat(self) -> dict[str, Any]:
        """`{"model.depth": 2, ...}`: the form MLflow params and search spaces use."""
        return {f"{k}.{kk}": vv for k, v in self.to_dict().items() for kk, vv in v.items()}

    def with_flat(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted overrides applied (`{"train.lr": 1e-4}`); unknown keys are an error."""
        d = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in d or name not in d[section]:
                raise ConfigError(f"unknown config key {key!r}")
            d[section][name] = value
        return Config.from_dict(d)


def _build(cls: type, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe is the dataclass defaults; presets are dotted overrides on top of them.
    "paper": {},
    # Small enough to finish in a minute or two on a 2-core laptop.
    "smoke": {
        "model.name": "tiny",
        "model.image_size": 96,
        "data.image_size": 96,
        "train.epochs": 15,
        "train.batch_size": 4,
        "train.lr": 3e-3,
        "train.bce_weight": 1.0,
        "train.dice_weight": 1.0,
        "train.pos_weight": 20.0,
    },
}

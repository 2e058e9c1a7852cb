"""One typed config flows from the command line (or a search space) down to data, model and loop.

The whole `Config` is logged to MLflow and saved in every checkpoint, so `Config.from_dict(ckpt["config"])`
is all it takes to rebuild the run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad setting, phrased for the person who has to fix it."""


ANODFD_NAMES = ("paper", "tiny", "resnet18", "resnet34", "efficientnet_b0", "convnext_atto")
# Networks to compare with (see anodfd.model.baselines); they take the same (history, current) pair.
BASELINE_NAMES = ("unet", "unet-cat", "deeplabv3plus", "deeplabv3plus-cat", "fc-siam-diff")
MODEL_NAMES = ANODFD_NAMES + BASELINE_NAMES
DEPTHS = (0, 1, 2, 4, 8)
ALIGN_METHODS = ("none", "ecc", "features")  # anodfd.data.align
CONFIRM_METHODS = ("none", "diff")  # anodfd.confirm
SCHEDULES = ("constant", "cosine")  # anodfd.train.loop.epoch_lr
CALIBRATIONS = ("pixel", "defect")  # what the served threshold maximises on validation (anodfd.train.loop)
# The deepest feature map's stride of each AnoDFDNet variant: its input side must be a multiple of it.
STRIDES = {"paper": 16, "tiny": 16}  # the timm variants: 32; the baselines pad any size themselves
# Bounds that catch a slipped digit before a run starts: the paper trains 100 epochs at batch 4.
MAX_EPOCHS = 10_000
MAX_BATCH = 1024  # per worker; a batch is also refused when larger than the train split (`anodfd.train.launch`)
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit and must not be negative
DEVICES = r"auto|cpu|mps|cuda(:\d+)?"


def _require(key: str, value: Any, ok: bool, rule: str) -> None:
    """One line naming the flag, the value and the allowed range, before anything runs."""
    if not ok:
        flag = "--" + key.split(".")[-1].replace("_", "-")
        raise ConfigError(f"{flag} {value!r} ({key}): {rule}")


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def check_output(path: str | Path, flag: str, folder: bool = True) -> None:
    """Refuse an output path that cannot be written, before any compute is spent; creates nothing. A file's folder
    must exist already: a mistyped folder fails here, not after the work."""
    p = Path(path).expanduser().absolute()
    if p.exists() and p.is_dir() != folder:
        raise ConfigError(f"{flag} {path}: is {'a file' if folder else 'a folder'}; pass "
                          f"{'a folder' if folder else 'a file name'} to write to")
    parent = p if folder else p.parent
    if not folder and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {parent} does not exist; create it first, or pass another path")
    existing = next(a for a in (parent, *parent.parents) if a.exists())
    try:  # what the process may do, which for root differs from the permission bits os.access reads
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file, not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {existing} ({e.strerror}); pass a path you can write "
                          "to") from None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class DataConfig:
    data: str = ""  # dataset folder; named datasets (OL, FB, Diff) are resolved to a folder before this
    layout: str = "auto"  # auto | paper (cur,hist,gt lists) | abl (A/ B/ label/ list/)
    # How the network sees a pair (see anodfd.data.cache.View): squashed to resize x resize, the paper's way, or,
    # with resize 0, scaled by `scale` keeping its aspect ratio, so small defects keep their pixels.
    resize: int = 256  # square side every pair is resized to (the paper: 256); 0 = keep the aspect ratio
    scale: float = 1.0  # with resize 0: the factor both sides are scaled by (1 = native pixels)
    # Train on random crop x crop windows of that view; validation and inference then slide the same window over
    # the whole view and blend the tiles (anodfd.inference). 0 = whole pairs (resize must then be set).
    crop: int = 0
    crop_pos_fraction: float = 0.0  # share of training crops placed around a defect, each defect equally likely
    # Register history onto current before the network (anodfd.data.align): none | ecc | features.
    align: str = "none"
    relight: bool = False  # then match history's local lighting to current's (anodfd.data.align.match_lighting)
    # Keep a detected region only where the (registered) pair's grey difference also fires inside it
    # (anodfd.confirm): none | diff. Validation calibrates the threshold on confirmed maps; serving confirms too.
    confirm: str = "none"
    augment: str = "paper"  # none | paper (flips, 180 rotation) | strong (+ scale/shift, photometric)
    misregister: float = 0.0  # max independent shift/rotation/scale of history, as a fraction (0.03 = 3%)
    val_fraction: float = 0.2  # used only when a dataset ships no validation list (the paper's 8:2)
    group_regex: str = ""  # a pair's group (board, part, site): this regex's first group on its name; "" = none
    val_groups: str = ""  # comma-separated groups validation holds, taken from train; "" = cut by val_fraction
    cache_dir: str = ""  # on-disk decode cache; "" = $ANODFD_CACHE_DIR or ~/.cache/anodfd
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        _require("data.resize", self.resize, _whole(self.resize) and (self.resize == 0 or self.resize >= 32),
                 "must be a whole number of pixels, at least 32, or 0 to keep the aspect ratio (with --crop)")
        _require("data.scale", self.scale, _number(self.scale) and 0 < self.scale <= 4,
                 "must be in (0, 4]: the factor both image sides are scaled by")
        _require("data.scale", self.scale, self.resize == 0 or self.scale == 1,
                 f"applies only with --resize 0; --resize {self.resize} squashes every pair to {self.resize}x{self.resize}")
        _require("data.crop", self.crop, _whole(self.crop) and (self.crop == 0 or self.crop >= 32),
                 "must be 0 (whole pairs) or a whole number of pixels, at least 32")
        _require("data.crop", self.crop, self.crop > 0 or self.resize > 0,
                 "--resize 0 keeps each image's own size, which cannot be batched whole: pass --crop N (e.g. 256)")
        _require("data.crop", self.crop, self.resize == 0 or self.crop <= self.resize,
                 f"is larger than the --resize {self.resize} view it is cut from")
        _require("data.crop_pos_fraction", self.crop_pos_fraction,
                 _number(self.crop_pos_fraction) and 0 <= self.crop_pos_fraction <= 1, "must be in [0, 1]")
        _require("data.crop_pos_fraction", self.crop_pos_fraction, self.crop > 0 or self.crop_pos_fraction == 0,
                 "applies to training crops: pass --crop N as well")
        _require("data.align", self.align, self.align in ALIGN_METHODS,
                 f"must be one of {', '.join(ALIGN_METHODS)}: how history is registered onto current")
        _require("data.relight", self.relight, isinstance(self.relight, bool), "must be true or false")
        _require("data.confirm", self.confirm, self.confirm in CONFIRM_METHODS,
                 f"must be one of {', '.join(CONFIRM_METHODS)}: whether registered differencing confirms detections")
        _require("data.misregister", self.misregister, _number(self.misregister) and 0 <= self.misregister < 0.5,
                 "must be in [0, 0.5): a fraction of the image side")
        _require("data.val_fraction", self.val_fraction, _number(self.val_fraction) and 0 < self.val_fraction < 1,
                 "must be in (0, 1)")
        _require("data.group_regex", self.group_regex, isinstance(self.group_regex, str) and _compiles(self.group_regex),
                 "must be a Python regular expression whose first group (or whole match) names a pair's group")
        _require("data.val_groups", self.val_groups, isinstance(self.val_groups, str)
                 and (not self.val_groups or bool(self.group_regex)), "needs --group-regex: groups come from it")
        _require("data.num_workers", self.num_workers, isinstance(self.num_workers, int) and self.num_workers >= 0,
                 "must be 0 (load in the training process) or more")

    @property
    def window(self) -> int:
        """The side of the square the network sees: a training crop and an inference tile, or the resized pair."""
        return self.crop or self.resize


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
        for key in ("hidden", "heads", "mlp"):
            _require(f"model.{key}", getattr(self, key), _whole(getattr(self, key)) and getattr(self, key) >= 0,
                     "must be 0 (the variant's default) or a positive whole number")
        if self.name in ANODFD_NAMES:
            stride = STRIDES.get(self.name, 32)
            _require("model.image_size", self.image_size,
                     isinstance(self.image_size, int) and self.image_size >= 2 * stride and self.image_size % stride == 0,
                     f"model {self.name} needs a size divisible by its stride {stride}, at least {2 * stride}")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 4  # per worker; the global batch is batch_size * workers
    lr: float = 2e-4
    schedule: str = "constant"  # constant (the paper's) | cosine: lr decays to 0 by the last epoch
    beta1: float = 0.5  # the official code's Adam betas
    beta2: float = 0.999
    weight_decay: float = 0.0
    bce_weight: float = 1.0
    dice_weight: float = 0.0
    focal_weight: float = 0.0
    pos_weight: float = 1.0  # BCE weight of anomalous pixels (they are often under 1%)
    threshold: float = 0.5  # the paper's fixed threshold; a calibrated one is stored beside it
    calibrate: str = "pixel"  # the calibrated threshold maximises validation pixel F1, or defect F (on a 0.05 grid)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 0  # print a progress line every N steps inside an epoch; 0 = once per epoch
    max_steps_per_epoch: int = 0  # 0 = whole epoch; small values make smoke runs and tests quick

    def __post_init__(self) -> None:
        def whole(key: str, low: int, rule: str, high: float = math.inf) -> None:
            value = getattr(self, key)
            _require(f"train.{key}", value, _whole(value) and low <= value <= high, rule)

        whole("epochs", 1, f"must be 1 or more (at most {MAX_EPOCHS})", MAX_EPOCHS)
        whole("batch_size", 1, f"must be 1 or more (at most {MAX_BATCH} pairs per worker)", MAX_BATCH)
        whole("seed", 0, f"must be 0 or more (at most {MAX_SEED})", MAX_SEED)
        _require("train.device", self.device, isinstance(self.device, str) and bool(re.fullmatch(DEVICES, self.device)),
                 "must be auto, cpu, cuda, cuda:N or mps")
        whole("max_steps_per_epoch", 0, "must be 0 (whole epochs) or more")
        whole("log_every", 0, "must be 0 (once per epoch) or more")
        _require("train.lr", self.lr, _number(self.lr) and 0 < self.lr <= 1, "must be in (0, 1]")
        _require("train.schedule", self.schedule, self.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}")
        _require("train.calibrate", self.calibrate, self.calibrate in CALIBRATIONS,
                 f"must be one of {', '.join(CALIBRATIONS)}: what the served threshold maximises on validation")
        for key in ("beta1", "beta2"):
            _require(f"train.{key}", getattr(self, key), _number(getattr(self, key)) and 0 <= getattr(self, key) < 1,
                     "must be in [0, 1)")
        _require("train.weight_decay", self.weight_decay, _number(self.weight_decay) and self.weight_decay >= 0,
                 "must be 0 or more")
        weights = {"bce_weight": self.bce_weight, "dice_weight": self.dice_weight, "focal_weight": self.focal_weight}
        for key, value in weights.items():
            _require(f"train.{key}", value, _number(value) and value >= 0, "must be 0 or more")
        _require("train.bce_weight", self.bce_weight, sum(weights.values()) > 0,
                 "the BCE, Dice and focal weights are all 0: give at least one loss a weight above 0")
        _require("train.pos_weight", self.pos_weight, _number(self.pos_weight) and self.pos_weight > 0,
                 "must be above 0")
        _require("train.threshold", self.threshold, _number(self.threshold) and 0 < self.threshold < 1,
                 "must lie strictly between 0 and 1")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.name in ANODFD_NAMES:
            stride = STRIDES.get(self.model.name, 32)
            key = "data.crop" if self.data.crop else "data.resize"
            _require(key, self.data.window, self.data.window % stride == 0,
                     f"model {self.model.name} sees {self.data.window}x{self.data.window} windows, which must be "
                     f"divisible by its stride {stride}")

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


def with_window(config: Config, overrides: dict[str, Any]) -> Config:
    """``config`` with dotted ``overrides``, and the model's position grid set to the window the network sees
    (a training crop and inference tile, or the whole resized pair): it follows the data, never set on its own."""
    config = config.with_flat(overrides)  # a bad view fails here, naming the data flag
    return config.with_flat({"model.image_size": config.data.window})


# Keys renamed since checkpoints and registry versions were first written: old name -> new name.
_RENAMED = {DataConfig: {"image_size": "resize"}}


def _build(cls: type, values: dict[str, Any]):
    values = {_RENAMED.get(cls, {}).get(k, k): v for k, v in values.items()}
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
        "data.resize": 96,
        "train.epochs": 15,
        "train.batch_size": 4,
        "train.lr": 3e-3,
        "train.bce_weight": 1.0,
        "train.dice_weight": 1.0,
        "train.pos_weight": 20.0,
    },
}

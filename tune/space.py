"""The search space, in one editable place: the decisions a user faces, as dotted config keys.

A preset's `Space` lists the choices; `Space.suggest` asks Optuna for them define-by-run, so that a dimension that
only means something under another (scale, crop size and crop placement under native crops) is sampled only
there. Dimensions the user fixed on the command line (`--resize`, `--align`, `--confirm`, `--model`, ...) are not searched.
Each range stands on a measurement in `docs/results/` (named beside it); `docs/guides/search-and-registry.md`
says how to add a dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

# The view decides what the network can see at all: squashing 640 px boards to 256 costs the thin tracks that
# native crops keep (resolution.md: pixel F1 0.83 against 0.90 on DeepPCB, 0.35 against 0.82 on small defects).
VIEW_KEYS = ("data.resize", "data.scale", "data.crop", "data.crop_pos_fraction")


@dataclass(frozen=True)
class Space:
    """One preset's choices. ``resize`` 0 stands for native crops, which then choose ``scale``, ``crop`` and the
    share of crops placed on a defect."""

    resize: tuple[int, ...]
    scale: tuple[float, ...]
    crop: tuple[int, ...]
    models: tuple[str, ...]
    # robustness.md: without registration F1 falls from 0.82 to 0.21 at a 2% shift; with ECC it holds 0.82.
    align: tuple[str, ...] = ("none", "ecc")
    # generalization.md: on held-out boards confirming by the registered difference cuts false alarms per pair
    # from 0.35 to 0.07 (DeepPCB); where changes are faint tints it can remove true detections, so both are tried.
    confirm: tuple[str, ...] = ("none", "diff")
    # robustness.md: 0.02 keeps 0.71 at a 2% shift unregistered; 0.005 on top of ECC holds best at 4%.
    misregister: tuple[float, ...] = (0.0, 0.005, 0.02)
    # demo.md tried paper and strong by hand; none is the floor they are measured against.
    augment: tuple[str, ...] = ("none", "paper", "strong")
    # paper-tables.md (table 3): depth 0-8 on the stand-ins, the paper's own sweep.
    depths: tuple[int, ...] = (0, 1, 2, 4, 8)
    lr: tuple[float, float] = (1e-5, 3e-3)  # the paper's 2e-4 and the smoke preset's 3e-3 inside, log-uniform
    # resolution.md trains with cosine; the paper with a constant rate.
    schedules: tuple[str, ...] = ("constant", "cosine")
    # demo.md: pos_weight 1-50 tried by hand; anomalous pixels are often under 1% of a pair.
    pos_weight: tuple[float, float] = (1.0, 50.0)
    # A fixed dimension (a flag on the command line) is left out; filled in by `without`.
    fixed: frozenset[str] = field(default_factory=frozenset)

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter any trial may have, with its distribution, in the order trials sample them (the summary
        table's columns). A new dimension is one more entry here."""
        d = {
            "model.depth": CategoricalDistribution(list(self.depths)),
            "train.lr": FloatDistribution(*self.lr, log=True),
            "data.resize": CategoricalDistribution(list(self.resize)),
            "data.scale": CategoricalDistribution(list(self.scale)),
            "data.crop": CategoricalDistribution(list(self.crop)),
            "data.crop_pos_fraction": FloatDistribution(0.0, 0.75),
            "data.align": CategoricalDistribution(list(self.align)),
            "data.confirm": CategoricalDistribution(list(self.confirm)),
            "data.misregister": CategoricalDistribution(list(self.misregister)),
            "data.augment": CategoricalDistribution(list(self.augment)),
            "model.name": CategoricalDistribution(list(self.models)),
            "train.schedule": CategoricalDistribution(list(self.schedules)),
            # BCE is kept above zero so every sampled loss has a term that is defined on all-normal batches.
            "train.bce_weight": FloatDistribution(0.1, 1.0),
            "train.dice_weight": FloatDistribution(0.0, 1.0),
            "train.focal_weight": FloatDistribution(0.0, 1.0),
            "train.pos_weight": FloatDistribution(*self.pos_weight, log=True),
        }
        return {k: v for k, v in d.items() if k not in self.fixed and not (k == "model.name" and len(self.models) < 2)}

    def without(self, keys: set[str]) -> Space:
        """This space less the dimensions the user fixed; any view flag fixes the whole view."""
        fixed = set(keys)
        if fixed & set(VIEW_KEYS):
            fixed |= set(VIEW_KEYS)
        return Space(**{**self.__dict__, "fixed": frozenset(fixed | self.fixed)})

    def suggest(self, trial) -> None:
        """Optuna define-by-run (an `optuna.Trial`, or Ray's captor of one): a trial's config overrides, in
        `distributions` order, the crop settings only under native crops."""
        crops = False
        for key, d in self.distributions().items():
            if key in VIEW_KEYS[1:] and not crops:
                continue
            if isinstance(d, CategoricalDistribution):
                value = trial.suggest_categorical(key, d.choices)
            else:
                value = trial.suggest_float(key, d.low, d.high, log=d.log)
            if key == "data.resize":
                crops = value == 0

    def point(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """A recipe's values for the dimensions this space searches (its first trials): those it fixes and those
        that its view leaves out are dropped."""
        dist = self.distributions()
        crops = recipe.get("data.resize") == 0
        point = {k: recipe[k] for k in dist if k in recipe and (crops or k not in VIEW_KEYS[1:])}
        for k, v in point.items():
            d = dist[k]
            if isinstance(d, CategoricalDistribution) and v not in d.choices:
                raise ValueError(f"first point {k}={v!r} is not among the space's choices {d.choices}")
        return point


# The smoke preset: minutes on a 2-core laptop, so small views (native crops of quarter- and half-scale images).
SMOKE = Space(resize=(96, 128, 0), scale=(0.25, 0.5), crop=(96,), models=("tiny",))
# The paper's network at the paper's size, or native crops as the benchmarks recommend (resolution.md: 256 px crops of
# the native image); the tiny variant beside it (generalization.md's recipe).
PAPER = Space(resize=(256, 0), scale=(0.5, 1.0), crop=(256,), models=("paper", "tiny"))

# The recipe the held-out-board benchmark measured best (generalization.md: defect F 0.987 and 0.989 over two seeds
# on boards it never saw, at the pixel-F1 threshold):
# tiny, native 256 px crops, half of them on a defect, ECC registration, confirmed by the registered difference,
# cosine schedule, BCE + Dice, pos_weight 20.
BENCHMARK_RECIPE = {
    "model.name": "tiny", "model.depth": 2, "train.lr": 3e-3, "train.schedule": "cosine",
    "data.resize": 0, "data.scale": 1.0, "data.crop": 256, "data.crop_pos_fraction": 0.5, "data.align": "ecc",
    "data.confirm": "diff",
    "data.misregister": 0.0, "data.augment": "paper",
    "train.bce_weight": 1.0, "train.dice_weight": 1.0, "train.focal_weight": 0.0, "train.pos_weight": 20.0,
}
# The paper's configuration: its network squashed to 256 px, 2 Transformer layers, lr 2e-4, BCE only.
PAPER_RECIPE = {
    "model.name": "paper", "model.depth": 2, "train.lr": 2e-4, "train.schedule": "constant",
    "data.resize": 256, "data.align": "none", "data.confirm": "none", "data.misregister": 0.0, "data.augment": "paper",
    "train.bce_weight": 1.0, "train.dice_weight": 0.0, "train.focal_weight": 0.0, "train.pos_weight": 1.0,
}

"""The search space, in one editable place: dotted config keys -> Optuna distributions.

Any key of `anodfd.config.Config.flat()` can be searched; add a line here and the search, the summary table
and the MLflow logging pick it up.
"""

from optuna.distributions import CategoricalDistribution, FloatDistribution

SPACE = {
    "model.depth": CategoricalDistribution([0, 1, 2, 4, 8]),
    "train.lr": FloatDistribution(1e-5, 3e-3, log=True),
    # BCE is kept above zero so every sampled loss has a term that is defined on all-normal batches.
    "train.bce_weight": FloatDistribution(0.1, 1.0),
    "train.dice_weight": FloatDistribution(0.0, 1.0),
    "train.focal_weight": FloatDistribution(0.0, 1.0),
}

# The first trial of preset paper: the paper's configuration (2 Transformer layers, lr 2e-4, BCE only).
PAPER_POINT = {
    "model.depth": 2,
    "train.lr": 2e-4,
    "train.bce_weight": 1.0,
    "train.dice_weight": 0.0,
    "train.focal_weight": 0.0,
}

"""The network: tensors in, tensors out (no files, Ray or MLflow).

Example: `build_model(ModelConfig(name="paper", depth=2))(hist, cur)` maps two Bx3xHxW images in
[-1, 1] to Bx1xHxW anomaly logits.
"""

from anodfd.model.anodfdnet import (
    TRANSFORMER_DEFAULTS,
    AnoDFDNet,
    build_model,
    count_parameters,
    optimize_for_inference,
)

__all__ = ["TRANSFORMER_DEFAULTS", "AnoDFDNet", "build_model", "count_parameters", "optimize_for_inference"]

"""The network: tensors in, tensors out (no files, Ray or MLflow).

    model = build_model(ModelConfig(name="paper", depth=2))
    logits = model(hist, cur)  # Bx3xHxW in [-1, 1] -> Bx1xHxW logits
"""

from anodfd.model.anodfdnet import (
    TRANSFORMER_DEFAULTS,
    AnoDFDNet,
    build_model,
    count_parameters,
    optimize_for_inference,
)

__all__ = ["TRANSFORMER_DEFAULTS", "AnoDFDNet", "build_model", "count_parameters", "optimize_for_inference"]

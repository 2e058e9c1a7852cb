"""Pixel losses on logits (B x 1 x H x W) against float masks with values in {0, 1}.

Every loss works on logits rather than probabilities so that it stays finite for any logit value, and
computes in float32 even under bf16/fp16 autocast: a mean over 65k pixels per image loses too much
precision in a 16-bit format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anodfd.config import TrainConfig


def _check(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    # Same shape is required: B x 1 x H x W against B x H x W would silently broadcast to B x B x H x W.
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    return logits.float(), target.float()


def bce_loss(logits: Tensor, target: Tensor, pos_weight: float = 1.0) -> Tensor:
    """Mean binary cross-entropy; `pos_weight` multiplies the term of anomalous pixels (often under 1%)."""
    logits, target = _check(logits, target)
    weight = torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss on sigmoid probabilities, pooled over the whole batch.

    Pooling all pixels of the batch (rather than averaging per image) makes it the soft version of the
    pooled F1 the paper reports, and keeps pairs with tiny or no anomalies from dominating the gradient.
    `eps` smooths the ratio so that an empty mask predicted empty costs 0 instead of 0/0.
    """
    logits, target = _check(logits, target)
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum()
    return 1.0 - (2.0 * intersection + eps) / (probs.sum() + target.sum() + eps)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Mean sigmoid focal loss (Lin et al. 2017), the same value as torchvision's `sigmoid_focal_loss`.

    Written in log space: with z = +logit for positives and -logit for negatives, the cross-entropy is
    softplus(-z) and the modulating factor (1 - p_t)^gamma is exp(gamma * logsigmoid(-z)). Both stay finite,
    with finite gradients, for any logit and any gamma >= 0 (a plain pow() has an infinite gradient at 0
    when gamma < 1). `alpha` < 0 disables class weighting, as in torchvision.
    """
    logits, target = _check(logits, target)
    z = logits * (2.0 * target - 1.0)
    loss = F.softplus(-z) * torch.exp(gamma * F.logsigmoid(-z))
    if alpha >= 0:
        loss = loss * (alpha * target + (1.0 - alpha) * (1.0 - target))
    return loss.mean()


class CombinedLoss(nn.Module):
    """bce_weight * BCE + dice_weight * Dice + focal_weight * focal; terms with weight 0 are not computed."""

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 0.0,
        focal_weight: float = 0.0,
        pos_weight: float = 1.0,
    ) -> None:
        super().__init__()
        weights = {"bce_weight": bce_weight, "dice_weight": dice_weight, "focal_weight": focal_weight}
        negative = {name: w for name, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError("all loss weights are zero: set at least one of bce/dice/focal weight > 0")
        if pos_weight <= 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.focal_weight = float(focal_weight)
        self.pos_weight = float(pos_weight)

    @classmethod
    def from_config(cls, train: TrainConfig) -> CombinedLoss:
        return cls(
            bce_weight=train.bce_weight,
            dice_weight=train.dice_weight,
            focal_weight=train.focal_weight,
            pos_weight=train.pos_weight,
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        if self.bce_weight > 0:
            total = total + self.bce_weight * bce_loss(logits, target, self.pos_weight)
        if self.dice_weight > 0:
            total = total + self.dice_weight * dice_loss(logits, target)
        if self.focal_weight > 0:
            total = total + self.focal_weight * focal_loss(logits, target)
        return total

    def extra_repr(self) -> str:
        return (
            f"bce_weight={self.bce_weight}, dice_weight={self.dice_weight}, "
            f"focal_weight={self.focal_weight}, pos_weight={self.pos_weight}"
        )

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from anodfd.config import TrainConfig
from anodfd.losses import CombinedLoss, bce_loss, dice_loss, focal_loss

torch.set_num_threads(1)

# logits [0, 2, -1] against targets [1, 0, 0], shaped as a 1 x 1 x 1 x 3 map.
LOGITS = torch.tensor([0.0, 2.0, -1.0]).view(1, 1, 1, 3)
TARGET = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)
# Per-pixel BCE, written out: -log(sigmoid(0)), -log(1 - sigmoid(2)), -log(1 - sigmoid(-1)).
BCE_TERMS = (0.6931472, 2.1269280, 0.3132617)


def test_bce_hand_computed():
    assert bce_loss(LOGITS, TARGET).item() == pytest.approx(sum(BCE_TERMS) / 3, abs=1e-6)  # 1.0444456


def test_pos_weight_scales_only_the_positive_term():
    expected = (3 * BCE_TERMS[0] + BCE_TERMS[1] + BCE_TERMS[2]) / 3  # 1.5065437
    assert bce_loss(LOGITS, TARGET, pos_weight=3.0).item() == pytest.approx(expected, abs=1e-6)
    # With no positive pixel, pos_weight changes nothing.
    zeros = torch.zeros_like(TARGET)
    assert bce_loss(LOGITS, zeros, pos_weight=5.0).item() == pytest.approx(bce_loss(LOGITS, zeros).item())


def test_dice_hand_computed():
    # probs = [0.5, 0.8807971, 0.2689414]; intersection 0.5; sum(probs) 1.6497385; sum(target) 1; eps 1.
    expected = 1 - (2 * 0.5 + 1) / (1.6497385 + 1 + 1)  # 0.4520155
    assert dice_loss(LOGITS, TARGET).item() == pytest.approx(expected, abs=1e-6)


def test_dice_perfect_and_totally_wrong():
    target = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    confident = (target * 2 - 1) * 50  # +50 on anomalies, -50 elsewhere
    assert dice_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-confident, target).item() > 0.99
    # An empty mask predicted empty costs nothing (eps avoids 0/0).
    assert dice_loss(torch.full((1, 1, 8, 8), -50.0), torch.zeros(1, 1, 8, 8)).item() == pytest.approx(0.0)


def test_focal_hand_computed():
    # alpha_t * BCE * (1 - p_t)^2 per pixel, alpha = 0.25 for the positive, 0.75 for the negatives.
    p = (0.5, 0.8807971, 0.2689414)
    terms = (
        0.25 * BCE_TERMS[0] * (1 - p[0]) ** 2,
        0.75 * BCE_TERMS[1] * p[1] ** 2,
        0.75 * BCE_TERMS[2] * p[2] ** 2,
    )
    assert focal_loss(LOGITS, TARGET).item() == pytest.approx(sum(terms) / 3, abs=1e-6)  # 0.4326246


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.5), (1.5, -1.0), (0.5, 0.9)])
def test_focal_matches_torchvision(gamma, alpha):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 20, 20, generator=g) * 4
    target = (torch.rand(3, 1, 20, 20, generator=g) > 0.8).float()
    ours = focal_loss(logits, target, gamma=gamma, alpha=alpha)
    reference = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="mean")
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)


def test_combined_is_the_weighted_sum():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 12, 12, generator=g)
    target = (torch.rand(2, 1, 12, 12, generator=g) > 0.9).float()
    loss = CombinedLoss(bce_weight=0.5, dice_weight=2.0, focal_weight=3.0, pos_weight=4.0)
    expected = (
        0.5 * bce_loss(logits, target, pos_weight=4.0)
        + 2.0 * dice_loss(logits, target)
        + 3.0 * focal_loss(logits, target)
    )
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # The default is the paper's plain BCE.
    assert CombinedLoss()(logits, target).item() == pytest.approx(bce_loss(logits, target).item())


def test_from_config():
    train = TrainConfig(bce_weight=0.0, dice_weight=1.0, focal_weight=2.0, pos_weight=7.0)
    loss = CombinedLoss.from_config(train)
    assert (loss.bce_weight, loss.dice_weight, loss.focal_weight, loss.pos_weight) == (0.0, 1.0, 2.0, 7.0)
    assert loss(LOGITS, TARGET).item() == pytest.approx(
        dice_loss(LOGITS, TARGET).item() + 2 * focal_loss(LOGITS, TARGET).item(), rel=1e-6
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bce_weight": 0.0}, "all loss weights are zero"),
        ({"dice_weight": -1.0}, "must be >= 0"),
        ({"pos_weight": 0.0}, "pos_weight"),
    ],
)
def test_invalid_weights_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CombinedLoss(**kwargs)


def test_shape_mismatch_raises():
    # B x 1 x H x W against B x H x W would otherwise broadcast silently inside the Dice sums.
    with pytest.raises(ValueError, match="differ in shape"):
        dice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))


@pytest.mark.parametrize("name", ["bce", "dice", "focal", "combined"])
def test_gradients_finite_for_extreme_logits(name):
    losses = {
        "bce": lambda x, t: bce_loss(x, t, pos_weight=10.0),
        "dice": dice_loss,
        "focal": lambda x, t: focal_loss(x, t, gamma=0.5),  # gamma < 1: a plain pow() would give NaN
        "combined": CombinedLoss(1.0, 1.0, 1.0, pos_weight=10.0),
    }
    # Right and wrong at ±100, for both classes.
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0]).view(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    loss = losses[name](logits, target)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(logits.grad).all()
    # Confidently wrong pixels must still get a push in the right direction (no saturated zero gradient).
    if name in ("bce", "combined"):
        assert logits.grad.view(-1)[1] < 0 and logits.grad.view(-1)[2] > 0


def test_finite_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    x = torch.randn(2, 3, 16, 16, generator=g) * 10
    target = (torch.rand(2, 1, 16, 16, generator=g) > 0.9).float()
    loss = CombinedLoss(1.0, 1.0, 1.0, pos_weight=5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        value = loss(logits, target)
    assert logits.dtype == torch.bfloat16
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    # Computed in float32 from the bf16 logits: close to the full-precision loss.
    assert value.item() == pytest.approx(loss(conv(x), target).item(), rel=0.05)

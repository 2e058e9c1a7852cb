"""Baselines with AnoDFDNet's interface: `forward(hist, cur)` maps two Bx3xHxW images to Bx1xHxW logits.

- `unet`, `deeplabv3plus`: segmentation_models_pytorch U-Net / DeepLabV3+ (resnet18 encoder) on the current
  image alone, history ignored: what single-image segmentation gets without a reference.
- `unet-cat`, `deeplabv3plus-cat`: the same networks on history and current stacked into 6 channels
  (early fusion).
- `fc-siam-diff`: Daudt, Le Saux & Boulch, "Fully Convolutional Siamese Networks for Change Detection"
  (ICIP 2018).

Inputs of any size work: they are padded up to the network's stride and the logits cropped back.
"""

from __future__ import annotations

from itertools import pairwise

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPPPooling
from torch import Tensor, nn

from anodfd.config import ModelConfig

# timm's resnet18 is AnoDFDNet's "resnet18" variant: the same family and size keeps the comparison about the
# architecture rather than the backbone.
SMP_ENCODER = "resnet18"
SMP_ARCHITECTURES: dict[str, type[smp.base.SegmentationModel]] = {
    "unet": smp.Unet,
    "deeplabv3plus": smp.DeepLabV3Plus,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def padded_size(n: int, stride: int) -> int:
    """`n` rounded up to a multiple of `stride`, and at least two deepest cells: a 1x1 deepest map has one
    value per channel at batch size one, which train-mode BatchNorm refuses."""
    return max(-(-n // stride), 2) * stride


class PairSegmenter(nn.Module):
    """Base of the baselines: pads the pair up to `stride`, runs `segment`, crops the logits back."""

    stride: int

    def forward(self, hist: Tensor, cur: Tensor) -> Tensor:
        if hist.shape != cur.shape:
            raise ValueError(f"history {tuple(hist.shape)} and current {tuple(cur.shape)} differ in shape")
        h, w = hist.shape[-2:]
        pad_h, pad_w = padded_size(h, self.stride) - h, padded_size(w, self.stride) - w
        if pad_h or pad_w:
            # Replicate rather than reflect (which needs the pad smaller than the image) or zeros (a flat
            # mid-grey border is an edge the network could learn to flag).
            hist, cur = (F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") for x in (hist, cur))
        return self.segment(hist, cur)[..., :h, :w]

    def segment(self, hist: Tensor, cur: Tensor) -> Tensor:
        raise NotImplementedError


class _BatchOfOneBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for DeepLabV3+'s image-pooling branch (a 1x1 map): a training batch of one has a single value
    per channel, which BatchNorm cannot normalise, so that batch uses the running statistics, as eval mode
    does. Larger batches behave exactly as nn.BatchNorm2d."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
            )
        return super().forward(x)


class SmpBaseline(PairSegmenter):
    """A segmentation_models_pytorch network on the current image, or on history and current stacked."""

    def __init__(self, architecture: str, use_history: bool, pretrained: bool = False) -> None:
        super().__init__()
        images = 2 if use_history else 1
        self.use_history = use_history
        self.net = SMP_ARCHITECTURES[architecture](
            encoder_name=SMP_ENCODER,
            encoder_weights="imagenet" if pretrained else None,  # opt-in: "imagenet" downloads
            in_channels=3 * images,
            classes=1,
        )
        self.stride = self.net.encoder.output_stride  # U-Net 32; DeepLabV3+ 16 (its last stage is dilated)
        pools = [m for m in self.net.modules() if isinstance(m, ASPPPooling)]
        for pool in pools:
            pool[2] = _as_batch_of_one_safe(pool[2])
        if architecture == "deeplabv3plus" and not pools:
            raise RuntimeError("segmentation_models_pytorch moved ASPPPooling: the batch-of-one fix is lost")
        # As TimmEncoder does: [-1, 1] inputs to the ImageNet statistics the encoder expects.
        mean = torch.tensor(IMAGENET_MEAN * images).view(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD * images).view(1, -1, 1, 1)
        self.register_buffer("scale", 0.5 / std, persistent=False)
        self.register_buffer("shift", (0.5 - mean) / std, persistent=False)

    def segment(self, hist: Tensor, cur: Tensor) -> Tensor:
        x = torch.cat([hist, cur], dim=1) if self.use_history else cur
        return self.net(x * self.scale + self.shift)


def _as_batch_of_one_safe(bn: nn.Module) -> _BatchOfOneBatchNorm2d:
    if type(bn) is not nn.BatchNorm2d:
        raise RuntimeError(f"expected a BatchNorm2d in smp's ASPPPooling, found {type(bn).__name__}")
    safe = _BatchOfOneBatchNorm2d(bn.num_features, bn.eps, bn.momentum)
    safe.load_state_dict(bn.state_dict())
    return safe


def _conv_bn_relu(channels: list[int], dropout: float) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU, Dropout2d for each consecutive pair of `channels`."""
    layers: list[nn.Module] = []
    for cin, cout in pairwise(channels):
        # No conv bias: the BatchNorm after it cancels it (the official code has them, 1,216 parameters).
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
        if dropout:
            layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class FCSiamDiff(PairSegmenter):
    """FC-Siam-diff (Daudt et al. 2018, the official `SiamUnet_diff`), with one logit per pixel.

    A U-Net encoder of four stages (2, 2, 3, 3 convolutions at 16, 32, 64, 128 channels, each stage ending
    in a 2x2 max-pool) shared by both images; the decoder upsamples with stride-2 transposed convolutions and
    concatenates, at each stage, |f_hist - f_cur| of that stage's encoder features. As in the official code
    the bottleneck fed to the decoder is the current image's pooled deepest map, not a difference, and
    every conv-BatchNorm-ReLU is followed by Dropout2d(0.2) (`dropout=0` removes them). The decoder's
    stride-1 transposed convolutions are written as the equivalent ordinary convolutions.
    """

    widths = (16, 32, 64, 128)
    convs = (2, 2, 3, 3)

    def __init__(self, in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.stride = 2 ** len(self.widths)
        w, n = self.widths, self.convs
        self.down = nn.ModuleList(
            _conv_bn_relu([cin] + [cout] * k, dropout) for cin, cout, k in zip((in_channels, *w[:-1]), w, n)
        )
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1) for c in reversed(w)
        )
        up = []
        for i in reversed(range(len(w))):
            # [upsampled, skip] (2c) -> c ... -> the next, shallower width (the first stage: `head`).
            up.append(_conv_bn_relu([2 * w[i]] + [w[i]] * (n[i] - 1) + ([w[i - 1]] if i else []), dropout))
        self.up = nn.ModuleList(up)
        self.head = nn.Conv2d(w[0], 1, 3, padding=1)

    def segment(self, hist: Tensor, cur: Tensor) -> Tensor:
        # One encoder pass over both images, as AnoDFDNet does: train-mode BatchNorm then normalises them with
        # the same statistics (the official code runs two passes).
        x = torch.cat([hist, cur])
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(torch.sub(*x.chunk(2)).abs())
            x = F.max_pool2d(x, 2)
        x = x.chunk(2)[1]
        for upsample, stage, skip in zip(self.upsample, self.up, reversed(skips)):
            x = stage(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def build_baseline(config: ModelConfig) -> PairSegmenter:
    """The baseline named `config.name`; depth, image_size and the Transformer widths do not apply."""
    if config.name == "fc-siam-diff":
        return FCSiamDiff()  # trained from scratch: there are no pretrained weights (`pretrained` is ignored)
    architecture, _, fusion = config.name.partition("-")
    if architecture not in SMP_ARCHITECTURES or fusion not in ("", "cat"):
        raise ValueError(f"unknown baseline {config.name!r}")
    return SmpBaseline(architecture, use_history=fusion == "cat", pretrained=config.pretrained)

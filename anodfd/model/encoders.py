"""Encoders: one network run on both images, returning feature maps from shallow to deep.

Every encoder exposes `channels` and `strides` (one entry per returned feature map) so the rest of the
network can be sized without running it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TIMM_ENCODERS = ("resnet18", "resnet34", "efficientnet_b0", "convnext_atto")


def conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    act: nn.Module | None = None,
    transpose: bool = False,
) -> nn.Sequential:
    """Conv (or transposed conv) without bias, BatchNorm, activation: the unit of the paper's CNN.

    Kept as a flat `nn.Sequential` so `optimize_for_inference` can fold the BatchNorm into the conv.
    """
    conv_cls = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = [
        conv_cls(in_ch, out_ch, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class PaperEncoder(nn.Module):
    """The official CNN: five scales of 4x4/2 convolutions plus one extra 3x3 layer at 1/2.

    `width=64, latent=1024` is the paper; `tiny` divides both by 8. As in the official code the stem
    uses ReLU, the other layers LeakyReLU(0.2), and the last 3x3 convolution `latent` (the deepest
    features, fed to the Transformer) has neither BatchNorm nor activation.

    Because `latent` is linear, |latent(a) - latent(b)| = |latent(a - b)|: `forward` stops before it and
    returns five maps, and the network applies `latent` once to the difference of the last one, which
    halves the cost of the largest encoder layer. `channels` and `strides` still list all six levels.
    """

    def __init__(self, width: int = 64, latent: int = 1024) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn_act(3, w, 4, 2, 1, nn.ReLU(inplace=True))  # 1/2
        self.extra = conv_bn_act(w, w, 3, 1, 1, nn.LeakyReLU(0.2, inplace=True))  # 1/2
        self.down2 = conv_bn_act(w, 2 * w, 4, 2, 1, nn.LeakyReLU(0.2, inplace=True))  # 1/4
        self.down3 = conv_bn_act(2 * w, 4 * w, 4, 2, 1, nn.LeakyReLU(0.2, inplace=True))  # 1/8
        self.down4 = conv_bn_act(4 * w, 8 * w, 4, 2, 1, nn.LeakyReLU(0.2, inplace=True))  # 1/16
        self.latent = nn.Conv2d(8 * w, latent, 3, 1, 1, bias=False)  # 1/16
        self.channels = [w, w, 2 * w, 4 * w, 8 * w, latent]
        self.strides = [2, 2, 4, 8, 16, 16]

    def forward(self, x: Tensor) -> list[Tensor]:
        """The five maps before `latent` (1/2, 1/2, 1/4, 1/8, 1/16)."""
        e1 = self.stem(x)
        e_extra = self.extra(e1)
        e2 = self.down2(e_extra)
        e3 = self.down3(e2)
        e4 = self.down4(e3)
        return [e1, e_extra, e2, e3, e4]


class TimmEncoder(nn.Module):
    """A timm backbone returning every feature level of its `feature_info` (strides 2..32 or 4..32).

    timm's `features_only` wrappers of some models (efficientnet, mobilenetv3) keep layers that never
    feed the returned features; under DDP those parameters get no gradient and the reducer fails
    ("Expected to have finished reduction"). So the full model is built, the layers after the deepest
    tap (head conv, norm, classifier) are pruned with `prune_intermediate_layers`, and features come from
    `forward_intermediates`.
    """

    def __init__(self, name: str, pretrained: bool = False) -> None:
        super().__init__()
        if name not in TIMM_ENCODERS:
            raise ValueError(f"unknown timm encoder {name!r}; choose one of {', '.join(TIMM_ENCODERS)}")
        import timm  # here, not at the top: importing it (and torchvision) costs every process ~2 s on 2 cores

        self.body = timm.create_model(name, pretrained=pretrained)
        info = self.body.feature_info
        self.indices = list(range(len(info)))
        self.body.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.channels = [int(level["num_chs"]) for level in info]
        self.strides = [int(level["reduction"]) for level in info]
        # Inputs are in [-1, 1]; the backbones (pretrained or not) expect ImageNet-normalised [0, 1] images.
        cfg = self.body.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        # x01 = (x + 1) / 2, then (x01 - mean) / std, folded into one multiply-add.
        self.register_buffer("scale", 0.5 / std, persistent=False)
        self.register_buffer("shift", (0.5 - mean) / std, persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = x * self.scale + self.shift
        return self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)


def build_encoder(name: str, pretrained: bool = False) -> PaperEncoder | TimmEncoder:
    """The encoder of a model variant (see `anodfd.config.MODEL_NAMES`)."""
    if name == "paper":
        return PaperEncoder(width=64, latent=1024)
    if name == "tiny":
        return PaperEncoder(width=8, latent=128)
    return TimmEncoder(name, pretrained=pretrained)

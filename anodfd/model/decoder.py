"""Decoders: from the deepest (Transformer-refined) difference map back to 1-channel logits at input size.

Both concatenate the feature differences of the earlier scales as skip connections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anodfd.model.encoders import conv_bn_act


class PaperDecoder(nn.Module):
    """The official decoder: transposed convolutions, each fed the previous output concatenated with the
    difference map of the matching encoder scale.

    `skip_channels` are the channels of the five shallower difference maps of `PaperEncoder`
    (1/2, 1/2 extra, 1/4, 1/8, 1/16). Unlike the official code the last layer has a bias and no sigmoid:
    it returns logits.
    """

    def __init__(self, in_channels: int, skip_channels: Sequence[int], width: int = 64) -> None:
        super().__init__()
        s1, s_extra, s2, s3, s4 = skip_channels
        w = width

        def up(cin: int, cout: int) -> nn.Sequential:
            return conv_bn_act(cin, cout, 4, 2, 1, nn.ReLU(inplace=True), transpose=True)

        self.bottleneck = conv_bn_act(in_channels, 8 * w, 3, 1, 1, nn.ReLU(inplace=True), transpose=True)
        self.up4 = up(8 * w + s4, 4 * w)  # 1/16 -> 1/8
        self.up3 = up(4 * w + s3, 2 * w)  # 1/8 -> 1/4
        self.up2 = up(2 * w + s2, w)  # 1/4 -> 1/2
        self.extra = conv_bn_act(w + s_extra, w, 3, 1, 1, nn.ReLU(inplace=True))  # 1/2
        self.head = nn.ConvTranspose2d(w + s1, 1, 4, 2, 1)  # 1/2 -> 1

    def forward(self, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
        d1, d_extra, d2, d3, d4 = skips
        x = self.bottleneck(x)
        x = self.up4(torch.cat([x, d4], 1))
        x = self.up3(torch.cat([x, d3], 1))
        x = self.up2(torch.cat([x, d2], 1))
        x = self.extra(torch.cat([x, d_extra], 1))
        return self.head(torch.cat([x, d1], 1))


class UpBlock(nn.Module):
    """Bilinear upsampling, optional skip concatenation, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv1 = conv_bn_act(in_ch + skip_ch, out_ch, 3, 1, 1, nn.ReLU(inplace=True))
        self.conv2 = conv_bn_act(out_ch, out_ch, 3, 1, 1, nn.ReLU(inplace=True))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """U-Net style decoder for the timm encoders.

    One `UpBlock` per skip level, then plain upsampling blocks until full resolution (which covers
    encoders whose first features are at stride 4, like convnext), and a 1x1 convolution for the logits.
    The width at output stride s is 16 * s, at most 256 (256, 128, 64, 32, 16 from stride 16 to 1, as
    in the common U-Net decoders): full-resolution layers are the expensive ones, so they stay thin.
    """

    def __init__(
        self, in_channels: int, skip_channels: Sequence[int], skip_strides: Sequence[int], deepest_stride: int
    ) -> None:
        super().__init__()
        ch, stride = in_channels, deepest_stride
        stages = []
        for skip_ch, skip_stride in reversed(list(zip(skip_channels, skip_strides))):
            out = self.width(skip_stride)
            stages.append(UpBlock(ch, skip_ch, out, stride // skip_stride))
            ch, stride = out, skip_stride
        self.stages = nn.ModuleList(stages)
        tail = []
        while stride > 1:
            out = self.width(stride // 2)
            tail.append(UpBlock(ch, 0, out, 2))
            ch, stride = out, stride // 2
        self.tail = nn.ModuleList(tail)
        self.head = nn.Conv2d(ch, 1, 1)

    @staticmethod
    def width(stride: int) -> int:
        return min(16 * stride, 256)

    def forward(self, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
        for stage, skip in zip(self.stages, reversed(skips)):
            x = stage(x, skip)
        for stage in self.tail:
            x = stage(x)
        return self.head(x)


class SubPixelConvTranspose2d(nn.Module):
    """Inference-only stand-in for a thin `ConvTranspose2d(kernel 4, stride 2, padding 1)`.

    Each of the four output phases (even/odd row, even/odd column) of such a transposed convolution is
    a 2x2 convolution of the (zero-padded) input; all four run as one ordinary convolution with 4x the
    output channels, and the phases are interleaved back. Same result, but oneDNN runs ordinary
    convolutions with few output channels much faster than transposed ones (the decoder head: 128 -> 1).
    """

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        shape = (deconv.kernel_size, deconv.stride, deconv.padding, deconv.groups)
        if shape != ((4, 4), (2, 2), (1, 1), 1):
            raise ValueError("only ConvTranspose2d(kernel_size=4, stride=2, padding=1) is supported")
        w = deconv.weight.detach()  # (in, out, 4, 4)
        self.out_channels = w.shape[1]
        # Output row 2i + a reads input rows i + a - 1 + u (u = 0, 1) through kernel row 3 - a - 2u
        # (the same for columns); tap u of the padded 2x2 window is input row i + a - 1 + u.
        taps = torch.tensor([[3, 1], [2, 0]])  # taps[a, u] = kernel row
        weight = w[:, :, taps[:, None, :, None], taps[None, :, None, :]]  # (in, out, a, b, u, v)
        weight = weight.permute(1, 2, 3, 0, 4, 5).reshape(4 * self.out_channels, w.shape[0], 2, 2)
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        bias = deconv.bias.detach().repeat_interleave(4) if deconv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)  # (B, 4 * out, H + 1, W + 1)
        y = y.view(b, self.out_channels, 2, 2, h + 1, w + 1)
        out = y.new_empty(b, self.out_channels, h, 2, w, 2)
        for row in range(2):
            for col in range(2):
                out[:, :, :, row, :, col] = y[:, :, row, col, row : row + h, col : col + w]
        return out.view(b, self.out_channels, 2 * h, 2 * w)

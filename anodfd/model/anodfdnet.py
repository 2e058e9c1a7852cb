"""AnoDFDNet: shared encoder, feature differences, Transformer on the deepest one, U-shaped decoder."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from anodfd.config import ModelConfig
from anodfd.model.decoder import PaperDecoder, SubPixelConvTranspose2d, UNetDecoder
from anodfd.model.encoders import PaperEncoder, TimmEncoder, build_encoder
from anodfd.model.transformer import DifferenceTransformer

# Transformer (hidden, heads, mlp) used when the config leaves them at 0.
TRANSFORMER_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "paper": (1024, 16, 2048),
    "tiny": (128, 4, 256),
    "resnet18": (256, 8, 512),
    "resnet34": (256, 8, 512),
    "efficientnet_b0": (256, 8, 512),
    "convnext_atto": (256, 8, 512),
}


class AnoDFDNet(nn.Module):
    """Pairwise anomaly segmentation: `forward(hist, cur)` -> Bx1xHxW logits (apply a sigmoid for scores).

    1. One weight-shared encoder runs once on `cat([hist, cur])`; with BatchNorm in training mode this
       normalises both images with the same statistics, so the network stays symmetric in (hist, cur).
       (The official code runs two passes, so its train-mode BatchNorm statistics differ per image.)
       The paper encoder's last convolution is linear and runs once, on the difference (see
       `PaperEncoder`). The network runs channels_last internally (faster convolutions on CPU and GPU).
    2. At every scale the absolute difference |f_hist - f_cur| is taken, so swapping the images gives the
       same map, and identical images give the same map whatever they show.
    3. `config.depth` pre-norm Transformer blocks refine the deepest difference map (depth 0: none).
    4. The decoder upsamples, concatenating the earlier differences (skip connections), to input size.

    Differences from the official code: its attention computes the output projection and then discards
    it (a bug); here the projection is used (the parameter count is the same). The last layer has a
    bias and no sigmoid, and the network returns logits.

    Inputs are Bx3xHxW in [-1, 1] with H and W divisible by `self.stride` (16 for paper/tiny, 32 for the
    timm encoders); sizes other than `config.image_size` interpolate the position embedding.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder: PaperEncoder | TimmEncoder = build_encoder(config.name, config.pretrained)
        channels, strides = self.encoder.channels, self.encoder.strides
        self.stride = strides[-1]
        if config.image_size % self.stride:
            raise ValueError(f"image_size {config.image_size} is not divisible by the stride {self.stride}")

        hidden, heads, mlp = TRANSFORMER_DEFAULTS[config.name]
        hidden, heads, mlp = config.hidden or hidden, config.heads or heads, config.mlp or mlp
        self.transformer: DifferenceTransformer | None = None
        deep_channels = channels[-1]
        if config.depth > 0:
            grid = config.image_size // self.stride
            self.transformer = DifferenceTransformer(
                channels[-1], hidden, config.depth, heads, mlp, (grid, grid)
            )
            deep_channels = hidden

        self.decoder: PaperDecoder | UNetDecoder
        if isinstance(self.encoder, PaperEncoder):
            self.decoder = PaperDecoder(deep_channels, channels[:-1], width=channels[0])
            # The official DCGAN-style initialisation of the convolutions and BatchNorms.
            for module in [self.encoder, self.decoder]:
                module.apply(_dcgan_init)
        else:
            self.decoder = UNetDecoder(deep_channels, channels[:-1], strides[:-1], self.stride)

    def forward(self, hist: Tensor, cur: Tensor) -> Tensor:
        if hist.shape != cur.shape:
            raise ValueError(f"history {tuple(hist.shape)} and current {tuple(cur.shape)} differ in shape")
        if hist.shape[-2] % self.stride or hist.shape[-1] % self.stride:
            raise ValueError(f"input size {tuple(hist.shape[-2:])} is not divisible by {self.stride}")
        # channels_last: oneDNN (CPU) and cuDNN (GPU) convolutions run faster on NHWC; same result.
        features = self.encoder(torch.cat([hist, cur]).contiguous(memory_format=torch.channels_last))
        # f_hist - f_cur per scale; split, not f[:b] / f[b:], so the backward is one cat, not two scatters. Explicit
        # sizes rather than chunk(2), whose chunk arithmetic pins the batch size when exported (torch.export, ONNX).
        b = hist.shape[0]
        signed = [torch.sub(*f.split([b, b])) for f in features]
        if isinstance(self.encoder, PaperEncoder):
            signed.append(self.encoder.latent(signed[-1]))  # linear: latent(a) - latent(b) = latent(a - b)
        diffs = [d.abs() for d in signed]
        deepest = diffs[-1]
        if self.transformer is not None:
            deepest = self.transformer(deepest)
        return self.decoder(deepest, diffs[:-1])


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_model(config: ModelConfig) -> AnoDFDNet:
    """The network described by `config` (randomly initialised unless `config.pretrained`)."""
    return AnoDFDNet(config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------- inference


def optimize_for_inference(model: AnoDFDNet) -> AnoDFDNet:
    """An eval-mode copy for fast inference; the model itself is left alone.

    BatchNorm is folded into the preceding convolutions, the paper decoder's stride-1 transposed conv and
    its thin transposed-conv head become equivalent ordinary convolutions (oneDNN runs those faster), and
    the weights are stored channels_last. Use it under `torch.inference_mode()`. Outputs match
    `model.eval()` up to float rounding.
    """
    fast = copy.deepcopy(model).eval()
    _fold_sequential_batchnorm(fast)
    if isinstance(fast.decoder, PaperDecoder):
        fast.decoder.head = SubPixelConvTranspose2d(fast.decoder.head)
        fast.decoder.bottleneck[0] = _stride_one_deconv_as_conv(fast.decoder.bottleneck[0])
    if isinstance(fast.encoder, TimmEncoder):
        # timm blocks keep conv and BatchNorm as sibling attributes, not in a Sequential: find the
        # conv -> BatchNorm pairs in the traced graph instead.
        fast.encoder = _fold_traced_batchnorm(fast.encoder)
    return fast.to(memory_format=torch.channels_last)


def _stride_one_deconv_as_conv(deconv: nn.ConvTranspose2d) -> nn.Conv2d:
    """The ordinary convolution equal to a stride-1 transposed one (oneDNN runs it faster): the kernel is
    flipped, its in/out axes swapped, and the padding becomes kernel - 1 - padding."""
    assert deconv.stride == (1, 1) and deconv.groups == 1 and deconv.dilation == (1, 1)
    k, p = deconv.kernel_size, deconv.padding
    conv = nn.Conv2d(
        deconv.in_channels,
        deconv.out_channels,
        k,
        padding=(k[0] - 1 - p[0], k[1] - 1 - p[1]),
        bias=deconv.bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(deconv.weight.transpose(0, 1).flip(2, 3))
        if deconv.bias is not None:
            conv.bias.copy_(deconv.bias)
    return conv


def _fold_sequential_batchnorm(root: nn.Module) -> None:
    """Fold each BatchNorm2d that directly follows a conv inside an nn.Sequential (in place, eval only)."""
    for seq in root.modules():
        if type(seq) is not nn.Sequential:  # subclasses may not run their children in order
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if type(bn) is nn.BatchNorm2d and isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                seq[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
                seq[i + 1] = nn.Identity()


def _fold_traced_batchnorm(module: nn.Module) -> nn.Module:
    """Trace `module` with torch.fx and fold every BatchNorm whose only input is a conv used nowhere else.

    timm's BatchNormAct2d (BatchNorm + activation in one module) is replaced by its activation.
    Returns the module unchanged if it cannot be traced.
    """
    tracer = _BatchNormLeafTracer()
    try:
        traced = fx.GraphModule(module, tracer.trace(module))
    except Exception:  # noqa: BLE001 - an untraceable backbone simply stays unfolded
        return module
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = modules[src.target], modules[node.target]
        if type(conv) is not nn.Conv2d or not bn.track_running_stats:
            continue
        _set_submodule(traced, src.target, fuse_conv_bn_eval(conv, bn))
        rest = nn.Sequential(*(getattr(bn, name) for name in ("drop", "act") if hasattr(bn, name)))
        _set_submodule(traced, node.target, rest if len(rest) else nn.Identity())
    traced.recompile()
    return traced


class _BatchNormLeafTracer(fx.Tracer):
    """Keeps BatchNorm subclasses (timm's BatchNormAct2d) as single graph nodes instead of tracing inside."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, module_qualified_name)


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)

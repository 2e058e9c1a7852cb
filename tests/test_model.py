"""The networks: shapes, gradients, symmetry, parameter counts, input sizes, inference optimisation."""

from __future__ import annotations

import functools
import socket

import pytest
import torch
from conftest import load_benchmark
from torch import nn

from anodfd.config import ANODFD_NAMES, BASELINE_NAMES, DEPTHS, MODEL_NAMES, ModelConfig
from anodfd.model import AnoDFDNet, build_model, count_parameters, optimize_for_inference
from anodfd.model.baselines import PairSegmenter, _BatchOfOneBatchNorm2d
from anodfd.model.decoder import SubPixelConvTranspose2d
from anodfd.model.encoders import build_encoder

TIMM_NAMES = [n for n in ANODFD_NAMES if n not in ("paper", "tiny")]
# Every variant at depth 0 and 2, tiny at every depth; paper only at 0 and 2 (it is large).
CASES = sorted({(n, d) for n in ANODFD_NAMES for d in (0, 2)} | {("tiny", d) for d in DEPTHS})
# The baselines have no Transformer: depth does not apply, so each is built once.
BASELINE_CASES = [(n, 2) for n in BASELINE_NAMES]
HISTORY_BLIND = ("unet", "deeplabv3plus")


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
    eval_baseline.cache_clear()


def make(name: str, depth: int = 2, image_size: int = 64, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, depth=depth, image_size=image_size, **kw))


def pair(b: int = 2, h: int = 64, w: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1, torch.rand(b, 3, h, w, generator=g) * 2 - 1


def settle_batchnorm(model: nn.Module, steps: int = 3) -> None:
    """Give BatchNorm non-trivial running statistics and affine weights, so eval mode is a real test."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
            m.momentum = 0.5
    model.train()
    with torch.no_grad():
        for s in range(steps):
            model(*pair(seed=100 + s))
    model.eval()


@pytest.mark.parametrize("name,depth", CASES + BASELINE_CASES)
def test_logits_shape_and_every_parameter_gets_a_gradient(name: str, depth: int) -> None:
    model = make(name, depth)
    hist, cur = pair()
    out = model(hist, cur)
    assert out.shape == (2, 1, 64, 64)
    assert torch.isfinite(out).all()
    mask = (torch.rand(2, 1, 64, 64) > 0.9).float()
    nn.functional.binary_cross_entropy_with_logits(out, mask).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient (would break DDP): {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if not isinstance(model, AnoDFDNet):  # a baseline: no Transformer
        return
    assert (model.transformer is None) == (depth == 0)
    if depth:
        assert len(model.transformer.blocks) == depth


@pytest.mark.parametrize("name", ["tiny", "paper", "resnet18"])
def test_one_encoder_run_once_on_both_images(name: str) -> None:
    model = make(name, depth=1)
    parts = sum(count_parameters(m) for m in (model.encoder, model.transformer, model.decoder))
    assert parts == count_parameters(model)  # no second (history / current) encoder anywhere
    assert count_parameters(model.encoder) == count_parameters(build_encoder(name))
    batches: list[int] = []
    model.encoder.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    model(*pair(b=3))
    assert batches == [6]


@pytest.mark.parametrize("name", ANODFD_NAMES)
def test_swapping_history_and_current_gives_the_same_map(name: str) -> None:
    model = make(name, depth=2 if name == "tiny" else 1)
    settle_batchnorm(model)
    a, b = pair()
    with torch.no_grad():
        ab, ba = model(a, b), model(b, a)
    assert ab.abs().max() > 0
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ANODFD_NAMES)
def test_identical_images_give_the_same_map_whatever_they_show(name: str) -> None:
    model = make(name, depth=2 if name == "tiny" else 1)
    settle_batchnorm(model)
    a, b = pair()
    with torch.no_grad():
        same_a, same_b, differ = model(a, a), model(b, b), model(a, b)
    torch.testing.assert_close(same_a, same_b, rtol=0, atol=1e-6)
    assert (differ - same_a).abs().max() > 1e-3  # and the map does react to a real difference


def test_paper_parameter_count_matches_the_official_network() -> None:
    model = make("paper", depth=2, image_size=256)
    n = count_parameters(model)
    assert abs(n - 35.93e6) / 35.93e6 < 0.01, n
    # Each extra layer adds one 1024-wide block: attention (4 x 1024^2) + MLP (2 x 1024 x 2048) + norms.
    per_block = 4 * (1024 * 1024 + 1024) + (1024 * 2048 + 2048) + (2048 * 1024 + 1024) + 4 * 1024
    assert count_parameters(make("paper", depth=4, image_size=256)) - n == 2 * per_block


def test_tiny_is_the_paper_network_eight_times_narrower() -> None:
    paper, tiny = make("paper", depth=2, image_size=64), make("tiny", depth=2, image_size=64)
    assert tiny.encoder.channels == [c // 8 for c in paper.encoder.channels]
    assert tiny.transformer.hidden == paper.transformer.hidden // 8
    assert count_parameters(tiny) < count_parameters(paper) / 40


@pytest.mark.parametrize("name", ["tiny", "paper", "resnet18", "convnext_atto"])
def test_other_input_sizes_interpolate_the_position_embedding(name: str) -> None:
    model = make(name, depth=1, image_size=64).eval()
    hist, cur = pair(b=1, h=96, w=128)
    with torch.no_grad():
        out = model(hist, cur)
    assert out.shape == (1, 1, 96, 128) and torch.isfinite(out).all()
    tr = model.transformer
    h, w = 96 // model.stride, 128 // model.stride
    pos = tr.position_embedding(h, w)
    assert pos.shape == (1, h * w, tr.hidden)
    assert tr.position_embedding(*tr.grid) is tr.pos_embed  # native grid: no interpolation
    # Bicubic interpolation keeps a constant embedding constant.
    with torch.no_grad():
        tr.pos_embed.fill_(0.25)
    torch.testing.assert_close(tr.position_embedding(h, w), torch.full_like(pos, 0.25))


def test_sizes_not_divisible_by_the_stride_are_rejected() -> None:
    model = make("tiny", depth=1)
    with pytest.raises(ValueError, match="divisible"):
        model(*pair(h=72, w=64))
    with pytest.raises(ValueError, match="divisible"):
        make("resnet18", image_size=80)


def test_same_seed_builds_the_same_model() -> None:
    for name in ["tiny", "resnet18", "unet-cat"]:
        a, b = make(name, seed=3).state_dict(), make(name, seed=3).state_dict()
        assert list(a) == list(b)
        for key in a:
            assert a[key].shape == b[key].shape
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        c = make(name, seed=4).state_dict()
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_width_overrides_and_defaults() -> None:
    model = make("tiny", depth=1, hidden=64, heads=2, mlp=96)
    block = model.transformer.blocks[0]
    assert (model.transformer.hidden, block.attn.heads, block.mlp.fc1.out_features) == (64, 2, 96)
    model = make("resnet18", depth=1)
    block = model.transformer.blocks[0]
    assert (model.transformer.hidden, block.attn.heads, block.mlp.fc1.out_features) == (256, 8, 512)
    assert model.transformer.embed.in_features == 512  # 1x1 projection from resnet18's deepest channels
    with pytest.raises(ValueError, match="divisible"):
        make("tiny", depth=1, hidden=100, heads=3)


def test_the_network_returns_logits() -> None:
    model = make("tiny", depth=1)
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())
    with torch.no_grad():
        model.decoder.head.bias.fill_(5.0)
        out = model(*pair())
    assert out.min() > 1.0  # a sigmoid would have capped this at 1


@pytest.mark.parametrize("name", ["tiny", "paper", "resnet18"])
def test_channels_last_inputs_give_the_same_map(name: str) -> None:
    model = make(name, depth=1)
    settle_batchnorm(model)
    hist, cur = pair()
    cl = torch.channels_last
    with torch.no_grad():
        ref = model(hist, cur)
        out = model(hist.contiguous(memory_format=cl), cur.contiguous(memory_format=cl))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ANODFD_NAMES)
def test_optimize_for_inference_folds_batchnorm_and_keeps_the_output(name: str) -> None:
    model = make(name, depth=1)
    settle_batchnorm(model)
    model.train()
    hist, cur = pair()
    fast = optimize_for_inference(model)
    assert model.training  # the original is left alone
    assert not fast.training
    if name != "convnext_atto":  # convnext has LayerNorm only
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    cl = torch.channels_last
    with torch.inference_mode():
        ref = model.eval()(hist, cur)
        out = fast(hist.contiguous(memory_format=cl), cur.contiguous(memory_format=cl))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "unet"])
def test_inference_paths_load_checkpoints_folded(name: str) -> None:
    """`inference_model`, which eval, predict, the pyfunc and score load checkpoints with: an AnoDFDNet comes back
    with its BatchNorm folded and the same output as the eval-mode model; a baseline comes back as it was."""
    from anodfd.checkpoint import inference_model, model_from_checkpoint
    from anodfd.config import Config

    config = Config().with_flat({"model.name": name, "model.depth": 1, "model.image_size": 64})
    model = build_model(config.model)
    settle_batchnorm(model)
    ckpt = {"config": config.to_dict(), "model": model.state_dict()}
    fast, _ = inference_model(ckpt)
    plain, _ = model_from_checkpoint(ckpt)
    folded = not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert folded == (name == "tiny")
    hist, cur = pair()
    with torch.inference_mode():
        torch.testing.assert_close(fast(hist, cur), plain(hist, cur), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,depth", [("tiny", 0), ("tiny", 2), ("paper", 2)])
def test_paper_variants_compute_the_official_architecture(name: str, depth: int) -> None:
    """Loaded with our weights, a plain re-implementation of the official network gives the same map."""
    model = make(name, depth)
    settle_batchnorm(model)
    reference = load_benchmark("bench_model").official_style_like(model).eval()
    hist, cur = pair()
    with torch.no_grad():
        ours, theirs = torch.sigmoid(model(hist, cur)), reference(hist, cur)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_sub_pixel_head_equals_the_transposed_convolution(bias: bool) -> None:
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(6, 2, 4, 2, 1, bias=bias)
    fast = SubPixelConvTranspose2d(deconv)
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        ref = deconv(x)
        assert fast(x).shape == ref.shape == (2, 2, 10, 14)
        torch.testing.assert_close(fast(x), ref, rtol=1e-5, atol=1e-5)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fast(x_cl), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        SubPixelConvTranspose2d(nn.ConvTranspose2d(6, 2, 3, 1, 1))


# --- baselines -----------------------------------------------------------------------------------------


@functools.cache
def eval_baseline(name: str) -> nn.Module:
    """One eval-mode instance per baseline, shared by the tests that only run it under no_grad."""
    return make(name).eval()


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baselines_use_the_history_exactly_when_they_should(name: str) -> None:
    model = eval_baseline(name)
    hist, cur = pair()
    other_hist, _ = pair(seed=5)
    with torch.no_grad():
        a, b = model(hist, cur), model(other_hist, cur)
    if name in HISTORY_BLIND:  # the current image alone
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baselines_take_any_input_size(name: str) -> None:
    """Padded up to the network's stride inside the model, and the logits cropped back."""
    model = eval_baseline(name)
    for h, w in [(100, 72), (20, 36)]:
        hist, cur = pair(b=1, h=h, w=w)
        with torch.no_grad():
            out = model(hist, cur)
        assert out.shape == (1, 1, h, w) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_a_training_step_on_a_batch_of_one(name: str) -> None:
    """An epoch's last batch can hold one pair (the loader keeps it); DeepLabV3+'s image pooling must cope."""
    model = make(name).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist, cur = pair(b=1, h=20, w=30)  # U-Net: padded to 32x32 only, its deepest map would be 1x1
    loss = nn.functional.binary_cross_entropy_with_logits(model(hist, cur), torch.zeros(1, 1, 20, 30))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_deeplab_batch_of_one_changes_nothing_for_larger_batches() -> None:
    """The image-pooling BatchNorm falls back to running statistics for a single value per channel only."""
    model = make("deeplabv3plus").train()
    pooling_bn = [m for m in model.modules() if isinstance(m, _BatchOfOneBatchNorm2d)]
    assert len(pooling_bn) == 1
    bn = pooling_bn[0]
    ref = nn.BatchNorm2d(bn.num_features).train()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(3, bn.num_features, 1, 1)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    stats = bn.running_mean.clone(), bn.running_var.clone()
    one = torch.randn(1, bn.num_features, 1, 1)
    torch.testing.assert_close(bn(one), ref.eval()(one))
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])


def test_every_baseline_builds_without_the_network(monkeypatch) -> None:
    """`pretrained=False` (the default) downloads nothing: training runs on machines without internet."""

    def no_network(*args, **kwargs):
        raise AssertionError("network access while building a model")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    assert MODEL_NAMES == ANODFD_NAMES + BASELINE_NAMES
    for name in BASELINE_NAMES:
        assert isinstance(make(name, pretrained=False), PairSegmenter)


def test_fc_siam_diff_has_the_official_layer_sizes() -> None:
    """1,350,146 parameters in the official SiamUnet_diff(3, 2): ours drops the conv biases BatchNorm cancels
    (1,216) and has one output channel instead of two (145 fewer)."""
    assert count_parameters(make("fc-siam-diff")) == 1_350_146 - 1_216 - 145


def test_a_baseline_state_dict_rebuilds_the_same_network() -> None:
    """What `model_from_checkpoint` does; DeepLabV3+ has the replaced image-pooling BatchNorm."""
    a, b = make("deeplabv3plus", seed=1), make("deeplabv3plus", seed=2)
    settle_batchnorm(a)
    b.load_state_dict(a.state_dict())
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(*pair()), b(*pair()), rtol=0, atol=0)

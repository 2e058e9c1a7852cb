"""Model speed on CPU: our AnoDFDNet against a plain re-implementation of the official network.

    python benchmarks/bench_model.py --iters 1 --rounds 5 --threads 2
    python benchmarks/bench_model.py --threads 2 --skip-resnet18 --anodfd-train   # + `anodfd train`, same run
    python benchmarks/bench_model.py --threads 2 --skip-resnet18 --openvino --batch 1   # + OpenVINO FP32, INT8
    python benchmarks/bench_model.py --threads 2 --openvino --checkpoint best.pt --calib-data DIR --batch 4

Measures pairs/s of a training step (forward, BCE, backward, Adam step) and of inference, for variant
`paper` at 256x256 and batch 4, against `OfficialStyleNet` below: the official architecture written the
way the official code is (two encoder passes, hand-written softmax attention, contiguous fp32, eval under
`torch.no_grad`). Our side runs the shared encoder once on both images (and its linear last layer once,
on the difference), uses `scaled_dot_product_attention` and channels_last, and for inference
`optimize_for_inference` (BatchNorm folded, sub-pixel head) under `torch.inference_mode`. Also times the
`resnet18` variant, and the same `paper` weights exported by `anodfd export` in ONNX Runtime (CPU, uint8 pairs in,
probabilities out: its graph also normalises and applies the sigmoid); with ``--openvino``, that file in OpenVINO,
FP32 and INT8 (NNCF post-training quantisation on 16 random pairs, or with ``--checkpoint`` on ``--calib-pairs``
training pairs of ``--calib-data``, as `anodfd export --int8` calibrates). ``--checkpoint`` times a trained model
(its variant at its window) as it is served: folded PyTorch, ONNX Runtime and OpenVINO only. Before timing, the reference is loaded with our weights and must give the same
eval-mode logits, so both sides compute the same function.
Prints a Markdown table; rounds alternate between the two sides and the best round is reported.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anodfd.config import Config, ModelConfig, with_window
from anodfd.export import OnnxModel, export_onnx
from anodfd.model import AnoDFDNet, build_model, optimize_for_inference

# ------------------------------------------------------------------ the official network, official style


class OfficialCNN(nn.Module):
    def __init__(self, ndf: int, nz: int) -> None:
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf), nn.ReLU(True))
        self.e_extra = nn.Sequential(
            nn.Conv2d(ndf, ndf, 3, 1, 1, bias=False), nn.BatchNorm2d(ndf), nn.LeakyReLU(0.2, True)
        )
        self.e2 = nn.Sequential(
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True)
        )
        self.e3 = nn.Sequential(
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, True)
        )
        self.e4 = nn.Sequential(
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, True)
        )
        self.e5 = nn.Sequential(nn.Conv2d(ndf * 8, nz, 3, 1, 1, bias=False))

    def forward(self, x: Tensor) -> list[Tensor]:
        e1 = self.e1(x)
        e_extra = self.e_extra(e1)
        e2 = self.e2(e_extra)
        e3 = self.e3(e2)
        e4 = self.e4(e3)
        return [e1, e_extra, e2, e3, e4, self.e5(e4)]


class OfficialAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def split(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        context = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        context = context.view(*context.shape[:-2], -1)
        # The official code discards this projection (a bug); the reference uses it, as our model does.
        return self.out(context)


class OfficialBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = OfficialAttention(hidden, heads)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(hidden, mlp), nn.Linear(mlp, hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attention_norm(x))
        h = self.dropout(F.gelu(self.fc1(self.ffn_norm(x))))
        return x + self.dropout(self.fc2(h))


class OfficialTransformer(nn.Module):
    def __init__(self, nz: int, hidden: int, heads: int, mlp: int, depth: int, grid: int) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv2d(nz, hidden, 1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid, hidden))
        self.dropout = nn.Dropout(0.2)
        self.layer = nn.ModuleList(OfficialBlock(hidden, heads, mlp) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embeddings(x).flatten(2).transpose(-1, -2)
        x = self.dropout(x + self.position_embeddings)
        for block in self.layer:
            x = block(x)
        return self.encoder_norm(x)


class OfficialStyleNet(nn.Module):
    """The official AnoDFDNet (encoder, differences, Transformer, transposed-conv decoder, sigmoid)."""

    def __init__(
        self,
        ndf: int = 64,
        nz: int = 1024,
        hidden: int = 1024,
        heads: int = 16,
        mlp: int = 2048,
        depth: int = 2,
        image_size: int = 256,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.cnn = OfficialCNN(ndf, nz)
        self.tr = OfficialTransformer(nz, hidden, heads, mlp, depth, image_size // 16) if depth else None

        def up(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
            )

        self.d5 = nn.Sequential(
            nn.ConvTranspose2d(hidden if depth else nz, ndf * 8, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.ReLU(True),
        )
        self.d4, self.d3, self.d2 = up(ndf * 16, ndf * 4), up(ndf * 8, ndf * 2), up(ndf * 4, ndf)
        self.d_extra = nn.Sequential(
            nn.Conv2d(ndf * 2, ndf, 3, 1, 1, bias=False), nn.BatchNorm2d(ndf), nn.ReLU(True)
        )
        self.d1 = nn.ConvTranspose2d(ndf * 2, 1, 4, 2, 1)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        f1, f2 = self.cnn(x1), self.cnn(x2)
        e1, e_extra, e2, e3, e4, e5 = [torch.abs(a - b) for a, b in zip(f1, f2)]
        if self.tr is not None:
            b, _, h, w = e5.shape
            e5 = self.tr(e5).permute(0, 2, 1).reshape(b, self.hidden, h, w)
        d = self.d5(e5)
        d = self.d4(torch.cat((d, e4), 1))
        d = self.d3(torch.cat((d, e3), 1))
        d = self.d2(torch.cat((d, e2), 1))
        d = self.d_extra(torch.cat((d, e_extra), 1))
        return torch.sigmoid(self.d1(torch.cat((d, e1), 1)))


def official_style_like(model: AnoDFDNet) -> OfficialStyleNet:
    """An `OfficialStyleNet` with the same sizes as a paper/tiny `model`, loaded with its weights."""
    cfg, enc = model.config, model.encoder
    tr = model.transformer
    ref = OfficialStyleNet(
        ndf=enc.channels[0],
        nz=enc.channels[-1],
        hidden=tr.hidden if tr else enc.channels[-1],
        heads=tr.blocks[0].attn.heads if tr and len(tr.blocks) else 1,
        mlp=tr.blocks[0].mlp.fc1.out_features if tr and len(tr.blocks) else 1,
        depth=cfg.depth,
        image_size=cfg.image_size,
    )
    ours = model.state_dict()
    renames = {
        "encoder.stem.": "cnn.e1.",
        "encoder.extra.": "cnn.e_extra.",
        "encoder.down2.": "cnn.e2.",
        "encoder.down3.": "cnn.e3.",
        "encoder.down4.": "cnn.e4.",
        "encoder.latent.": "cnn.e5.0.",
        "decoder.bottleneck.": "d5.",
        "decoder.up4.": "d4.",
        "decoder.up3.": "d3.",
        "decoder.up2.": "d2.",
        "decoder.extra.": "d_extra.",
        "decoder.head.": "d1.",
        "transformer.pos_embed": "tr.position_embeddings",
        "transformer.norm.": "tr.encoder_norm.",
    }
    block_renames = {
        "norm1.": "attention_norm.",
        "norm2.": "ffn_norm.",
        "attn.proj.": "attn.out.",
        "mlp.fc1.": "fc1.",
        "mlp.fc2.": "fc2.",
    }
    new: dict[str, Tensor] = {}
    for key, value in ours.items():
        if key.startswith("transformer.embed."):
            new[key.replace("transformer.embed.", "tr.patch_embeddings.")] = (
                value[..., None, None] if value.dim() == 2 else value
            )
        elif key.startswith("transformer.blocks."):
            _, _, i, rest = key.split(".", 3)
            if rest.startswith("attn.qkv."):
                for part, name in zip(value.chunk(3), ("query", "key", "value")):
                    new[f"tr.layer.{i}.attn.{name}.{rest.rsplit('.', 1)[1]}"] = part
                continue
            for a, b in block_renames.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
            new[f"tr.layer.{i}.{rest}"] = value
        else:
            for a, b in renames.items():
                if key.startswith(a):
                    key = b + key[len(a) :]
                    break
            new[key] = value
    ref.load_state_dict(new)
    return ref


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine weights (fresh ones are the identity in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in [(m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1)]:
                    t.uniform_(lo, hi, generator=g)
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


# ---------------------------------------------------------------------------------------------- timing


def time_per_call(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def interleaved(fns: dict[str, Callable[[], object]], iters: int, rounds: int) -> dict[str, float]:
    """Best (lowest) seconds per call of each fn over `rounds`; rounds alternate between the fns so that
    load from other processes hits all of them alike, and the best round is the least disturbed one."""
    for fn in fns.values():  # warm-up (allocator, oneDNN primitive caches)
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_per_call(fn, iters))
    return {name: min(s) for name, s in samples.items()}


def train_step_fn(
    model: nn.Module, hist: Tensor, cur: Tensor, mask: Tensor, logits: bool
) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    model.train()

    def step() -> None:
        out = model(hist, cur)
        if logits:
            loss = F.binary_cross_entropy_with_logits(out, mask)
        else:
            loss = F.binary_cross_entropy(out, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3, help="calls per timing round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--skip-resnet18", action="store_true")
    parser.add_argument("--anodfd-train", action="store_true",
                        help="also run `anodfd train` (local Ray, default CPUs) on an OL stand-in at the same size and "
                             "batch, and compare its pairs/s with the in-process train step")
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs of that run; epoch 1 (decoding) is left out")
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO FP32 and INT8 (anodfd[openvino])")
    parser.add_argument("--checkpoint", default=None, help="time this trained model as served (no reference)")
    parser.add_argument("--calib-data", default=None, help="with --checkpoint: dataset whose train split calibrates")
    parser.add_argument("--calib-pairs", type=int, default=300)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        return served_rows(args)

    b, s = args.batch, args.size
    hist, cur = torch.rand(b, 3, s, s) * 2 - 1, torch.rand(b, 3, s, s) * 2 - 1
    mask = (torch.rand(b, 1, s, s) > 0.95).float()

    ours = build_model(ModelConfig(name="paper", depth=args.depth, image_size=s))
    randomize_batchnorm(ours)  # so that the equality check below also covers the BatchNorm layers
    ref = official_style_like(ours)
    ours.eval(), ref.eval()
    with torch.no_grad():
        ref_logits = torch.logit(ref(hist, cur).double())
        err = (ours(hist, cur) - ref_logits).abs().max().item()
    fast = optimize_for_inference(ours)
    with torch.inference_mode():
        err_fast = (fast(hist, cur) - ref_logits).abs().max().item()
    if max(err, err_fast) > 1e-4:
        raise SystemExit(f"reference and ours disagree: {err:.2e} (eval), {err_fast:.2e} (optimised)")

    def infer_ref() -> None:
        with torch.no_grad():
            ref(hist, cur)

    def infer_ours() -> None:
        with torch.inference_mode():
            fast(hist, cur)

    def infer_plain() -> None:  # eval mode, BatchNorm not folded: the network `anodfd export` writes out
        with torch.inference_mode():
            ours(hist, cur)

    # The same weights exported by `anodfd export`, run by ONNX Runtime on uint8 pairs (its graph normalises).
    config = with_window(Config().with_flat({"model.name": "paper", "model.depth": args.depth}), {"data.resize": s})
    onnx_path = export_onnx(ours, config, 0.5, tempfile.mkdtemp())
    session = OnnxModel(onnx_path, threads=torch.get_num_threads()).session
    h8, c8 = (((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy() for x in (hist, cur))

    def infer_onnx() -> None:
        session.run(None, {"history": h8, "current": c8})

    rows = []
    openvino = openvino_fns(onnx_path, config, random_tiles(s), h8, c8) if args.openvino else {}
    infer = interleaved({"ref": infer_ref, "ours": infer_ours, "plain": infer_plain, "onnx": infer_onnx, **openvino},
                        args.iters, args.rounds)
    train = interleaved(
        {
            "ref": train_step_fn(ref, hist, cur, mask, logits=False),
            "ours": train_step_fn(ours, hist, cur, mask, logits=True),
        },
        args.iters,
        args.rounds,
    )
    rows.append(("paper", "official-style reference", b / train["ref"], b / infer["ref"], ""))
    rows.append(
        (
            "paper",
            "ours",
            b / train["ours"],
            b / infer["ours"],
            f"train {train['ref'] / train['ours']:.2f}x, inference {infer['ref'] / infer['ours']:.2f}x",
        )
    )
    rows.append(("paper", "ours, eval mode (BatchNorm not folded)", None, b / infer["plain"],
                 f"inference {infer['ref'] / infer['plain']:.2f}x"))
    rows.append(("paper", "ONNX Runtime (`anodfd export`)", None, b / infer["onnx"],
                 (f"inference {infer['ours'] / infer['onnx']:.2f}x ours (as `predict` runs it), "
                  f"{infer['plain'] / infer['onnx']:.2f}x eval mode")))
    for name in openvino:
        rows.append(("paper", OPENVINO_ROWS[name], None, b / infer[name], f"inference {infer['ours'] / infer[name]:.2f}x ours"))
    if not args.skip_resnet18:
        r18 = build_model(ModelConfig(name="resnet18", depth=args.depth, image_size=s))
        r18_fast = optimize_for_inference(r18)

        def infer_r18() -> None:
            with torch.inference_mode():
                r18_fast(hist, cur)

        r18_train = train_step_fn(r18, hist, cur, mask, logits=True)
        r18_times = interleaved({"train": r18_train, "infer": infer_r18}, args.iters, args.rounds)
        rows.append(("resnet18", "ours", b / r18_times["train"], b / r18_times["infer"], ""))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    agree = max(err, err_fast)
    print(
        f"\nCPU, {torch.get_num_threads()} threads (machine load average {load}), {s}x{s}, batch {b}, "
        f"depth {args.depth}, best of {args.rounds} rounds x {args.iters} calls; "
        f"eval logits agree to {agree:.1e}\n"
    )
    print("| variant | implementation | train step pairs/s | inference pairs/s | speed-up |")
    print("|---|---|---|---|---|")
    for variant, impl, tr, inf, note in rows:
        print(f"| {variant} | {impl} | {'-' if tr is None else f'{tr:.2f}'} | {inf:.2f} | {note} |")
    if args.anodfd_train:
        in_process = b / train["ours"]
        on_ray = anodfd_train_rate(s, b, args.depth, args.train_epochs)
        print(f"\n| `anodfd train`, 1 local worker, paper at {s}x{s}, batch {b} | pairs/s |\n|---|---|")
        print(f"| in-process train step, {torch.get_num_threads()} threads (above) | {in_process:.2f} |")
        print(f"| `anodfd train`, epochs 2-{args.train_epochs} (data, loss and step; validation excluded) | "
              f"{on_ray:.2f} ({on_ray / in_process:.0%} of in-process) |")


OPENVINO_ROWS = {"ov_fp32": "OpenVINO FP32 (`export --format openvino`)",
                 "ov_int8": "OpenVINO INT8 (`export --format openvino --int8`)"}


def random_tiles(size: int, n: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{k: rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8) for k in ("history", "current")}
            for _ in range(n)]


def openvino_fns(onnx_path, config: Config, tiles: list[dict], h8, c8) -> dict[str, Callable[[], object]]:
    """The exported .onnx in OpenVINO, FP32 and quantised to INT8 on ``tiles``, each as a timed call."""
    import openvino as ov

    from anodfd.openvino_ir import OpenVinoModel, quantize, with_metadata

    fp32 = with_metadata(ov.convert_model(onnx_path), config, 0.5)
    models = {"ov_fp32": fp32, "ov_int8": quantize(fp32, tiles)}
    runners = {k: OpenVinoModel(m, threads=torch.get_num_threads()) for k, m in models.items()}
    return {k: (lambda r=r: r.run(h8, c8)) for k, r in runners.items()}


def served_rows(args: argparse.Namespace) -> None:
    """--checkpoint: the trained model at its window as `predict` runs it (folded), in ONNX Runtime and OpenVINO."""
    import dataclasses

    from anodfd.checkpoint import inference_model, load_checkpoint, model_from_checkpoint
    from anodfd.openvino_ir import calibration_tiles

    ckpt = load_checkpoint(args.checkpoint)
    plain, config = model_from_checkpoint(ckpt)
    fast, _ = inference_model(ckpt)
    b, s = args.batch, config.data.window
    rng = np.random.default_rng(0)
    h8, c8 = (rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8) for _ in range(2))
    hist, cur = (torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1) for x in (h8, c8))
    onnx_path = export_onnx(plain, config, 0.5, tempfile.mkdtemp())
    session = OnnxModel(onnx_path, threads=torch.get_num_threads()).session
    data = dataclasses.replace(config.data, data=args.calib_data or config.data.data, layout="auto")
    tiles = calibration_tiles(data, args.calib_pairs)

    def infer_ours() -> None:
        with torch.inference_mode():
            fast(hist, cur)

    fns = {"ours": infer_ours, "onnx": lambda: session.run(None, {"history": h8, "current": c8}),
           **openvino_fns(onnx_path, config, tiles, h8, c8)}
    infer = interleaved(fns, args.iters, args.rounds)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.checkpoint}: {config.model.name} at {s}x{s}, batch {b}, CPU, {torch.get_num_threads()} threads "
          f"(load average {load}), INT8 calibrated on {len(tiles)} training pairs, best of {args.rounds} rounds x "
          f"{args.iters} calls\n")
    print("| implementation | inference pairs/s | x folded PyTorch |\n|---|---|---|")
    names = {"ours": "folded PyTorch (as `predict` runs it)", "onnx": "ONNX Runtime", **OPENVINO_ROWS}
    for k, name in names.items():
        print(f"| {name} | {b / infer[k]:.2f} | {infer['ours'] / infer[k]:.2f} |")


def anodfd_train_rate(size: int, batch: int, depth: int, epochs: int) -> float:
    """Mean training pairs/s of a real `anodfd train` run after its first epoch, as the CLI runs it."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from anodfd.checkpoint import load_checkpoint
    from anodfd.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="anodfd-bench-train-") as tmp:
        data = Path(tmp) / "OL"
        synthesize("OL", data, pairs=40, seed=0, size=(512, 384))
        cmd = [sys.executable, "-m", "anodfd", "train", "--data", str(data), "--preset", "paper",
               "--image-size", str(size), "--batch-size", str(batch), "--depth", str(depth), "--epochs", str(epochs),
               "--keep", str(epochs), "--out", f"{tmp}/run", "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db", "--cache-dir", f"{tmp}/cache"]
        with open(Path(tmp) / "train.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode:
                raise SystemExit((Path(tmp) / "train.log").read_text()[-3000:])
        rates = [load_checkpoint(p)["metrics"]["pairs_per_s"] for p in sorted(Path(tmp, "run").glob("epoch_*/*.pt"))]
        return sum(rates[1:]) / max(len(rates) - 1, 1)


if __name__ == "__main__":
    main()

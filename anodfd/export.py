"""ONNX export of a trained AnoDFDNet, and an ONNX Runtime model that `predict` and tiled inference can use.

The graph takes what a decoder hands any runtime: ``history`` and ``current``, uint8 RGB, B x H x W x 3, with the
batch, height and width dynamic (H and W multiples of the network's stride, 16 for `paper` and `tiny`). It returns
``probs``, float32 B x H x W anomaly probabilities. Normalisation to [-1, 1] and the sigmoid are inside the graph, so
a runtime outside Python needs nothing but the image. The view, window and calibrated threshold a pair must be
brought to (`anodfd.inference.pair_map`) travel in the file's metadata (``anodfd.config``, ``anodfd.threshold``):
`OnnxModel` reads them, so ``anodfd predict --onnx model.onnx`` needs no checkpoint. Registration and ``--confirm
diff`` (`anodfd.confirm`) run outside the graph, as the config in the metadata says: a runtime other than anodfd has
to apply them too.

Exported with PyTorch's `torch.export`-based exporter (``dynamo=True``), which needs ``onnx`` and ``onnxscript``;
inference needs ``onnxruntime`` only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anodfd.config import Config, ConfigError
from anodfd.data.dataset import normalize

EXPORT_FILE = "model.onnx"
INPUTS = ("history", "current")
STRIDE = 16  # AnoDFDNet paper and tiny; the timm variants (32) and baselines are not exported
MAX_SIDE_STEPS = 512  # height and width up to 512 x stride = 8192 px
PARITY_TOLERANCE = 1e-4


class _Graph(nn.Module):
    """uint8 BxHxWx3 RGB pair -> BxHxW probabilities: the network with its input and output ends inside."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, history: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        h, c = (normalize(x.permute(0, 3, 1, 2)) for x in (history, current))
        return torch.sigmoid(self.net(h, c))[:, 0]


def check_exportable(config: Config, fmt: str = "onnx") -> None:
    """One line for a model the export does not cover, before any tracing."""
    if config.model.name not in ("paper", "tiny"):
        raise ConfigError(f"model {config.model.name}: --format {fmt} covers AnoDFDNet paper and tiny; serve this "
                          "checkpoint itself (`predict --checkpoint`, the registry)")


def export_checked(model: nn.Module, config: Config, threshold: float, out: str | Path,
                   tolerance: float = PARITY_TOLERANCE) -> tuple[Path, float]:
    """`export_onnx` under a temporary name, `parity`, then renamed to ``out``/model.onnx: an export that fails
    either leaves nothing behind (not even ``out`` if it made it) and replaces no earlier model.onnx. Returns the
    path and the parity."""
    out = Path(out).absolute()
    made = next((a for a in reversed((out, *out.parents)) if not a.exists()), None)
    final = out / EXPORT_FILE
    tmp = out / f".{EXPORT_FILE}.tmp"
    try:
        export_onnx(model, config, threshold, out, tmp.name)
        worst = parity(model, tmp, tolerance=tolerance)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(e, ConfigError):
            raise ConfigError(f"{final}: not written, {e}") from None
        raise
    tmp.replace(final)
    return final, worst


def export_onnx(model: nn.Module, config: Config, threshold: float, out: str | Path, name: str = EXPORT_FILE) -> Path:
    """Write ``model`` (eval mode, CPU) to ``out``/``name`` with dynamic batch, height and width; returns the path.
    Unchecked: `export_checked` is what `anodfd export` runs."""
    if config.model.name not in ("paper", "tiny"):
        raise ConfigError(f"model {config.model.name}: ONNX export covers AnoDFDNet paper and tiny")
    import onnx  # noqa: F401  (the exporter needs it; fail here with a clear ImportError if absent)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    graph = _Graph(model.cpu().eval()).eval()
    # The example is neither batch 1 nor the training size: torch.export specialises sizes 0 and 1, and the input
    # size the position embedding was learned for takes a shortcut (the interpolation is traced instead).
    # Two distinct tensors: one object passed twice is traced as one input, and the graph would ignore `current`.
    example = tuple(torch.randint(0, 256, (2, 3 * STRIDE, 5 * STRIDE, 3), dtype=torch.uint8) for _ in INPUTS)
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=2, max=MAX_SIDE_STEPS)
    width = torch.export.Dim("width", min=2, max=MAX_SIDE_STEPS)
    dims = {0: batch, 1: STRIDE * height, 2: STRIDE * width}
    program = torch.onnx.export(graph, example, dynamo=True, input_names=list(INPUTS),
                                output_names=["probs"], dynamic_shapes={"history": dims, "current": dims},
                                verbose=False)
    program.save(str(path))
    _set_metadata(path, {"anodfd.config": json.dumps(config.to_dict()), "anodfd.threshold": repr(float(threshold))})
    return path


def _set_metadata(path: Path, values: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


class OnnxModel:
    """An exported graph in ONNX Runtime (CPU), in place of the network for `anodfd.inference` (``sliding_probs``,
    ``pair_map``) and `predict`: `probs` takes what ``predict_probs`` feeds a network."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such ONNX file; write one with `anodfd export`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime's error types derive from Exception alone)
            raise ConfigError(f"{path}: ONNX Runtime cannot load it ({e}); export it again with `anodfd export`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "anodfd.config" not in meta:
            raise ConfigError(f"{path}: not an `anodfd export` file (no anodfd.config metadata)")
        self.config = Config.from_dict(json.loads(meta["anodfd.config"]))
        self.threshold = float(meta["anodfd.threshold"])

    def probs(self, hist: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        """uint8 Bx3xHxW pairs -> Bx1xHxW probabilities, as `anodfd.inference.predict_probs` returns them."""
        feed = {name: np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()) for name, x in zip(INPUTS, (hist, cur))}
        return torch.from_numpy(self.session.run(None, feed)[0])[:, None]


def parity_diffs(model: nn.Module, run, sizes: tuple[tuple[int, int, int], ...] = ((1, 256, 256), (2, 96, 160)),
                 seed: int = 0) -> list[float]:
    """|``run`` - PyTorch| at worst, over random uint8 pairs of each (batch, height, width) in ``sizes``; ``run``
    maps BxHxWx3 history and current arrays to BxHxW probabilities (a runtime's session)."""
    graph = _Graph(model.cpu().eval()).eval()
    rng = np.random.default_rng(seed)
    diffs = []
    for b, h, w in sizes:
        pair = [rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8) for _ in INPUTS]
        with torch.inference_mode():
            expected = graph(*(torch.from_numpy(x) for x in pair)).numpy()
        diffs.append(float(np.abs(run(*pair) - expected).max()))
    return diffs


def parity(model: nn.Module, path: str | Path, sizes: tuple[tuple[int, int, int], ...] = ((1, 256, 256), (2, 96, 160)),
           seed: int = 0, tolerance: float = PARITY_TOLERANCE) -> float:
    """The largest |ONNX Runtime - PyTorch| probability over random pairs of each (batch, height, width) in
    ``sizes``; raises if it exceeds ``tolerance``, so a broken export never leaves `anodfd export`."""
    session = OnnxModel(path).session
    diffs = parity_diffs(model, lambda h, c: session.run(None, dict(zip(INPUTS, (h, c))))[0], sizes, seed)
    worst = float(np.max(diffs))  # NaN stays NaN: max() would drop it
    if not worst <= tolerance:
        raise ConfigError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (more than {tolerance:g}) on the "
                          "probability maps; serve the checkpoint itself (`predict --checkpoint`, the registry)")
    return worst

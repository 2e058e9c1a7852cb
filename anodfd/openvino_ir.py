"""OpenVINO IR of an exported graph, FP32 and INT8, and an OpenVINO model that `predict`, `eval` and the pyfunc run.

`anodfd export --format openvino` converts the ONNX file `anodfd.export` writes (same inputs: uint8 NHWC
``history`` and ``current``, dynamic batch, height and width; same output ``probs``) to ``model.xml``/``.bin``,
kept in FP32, and stores the ONNX file's metadata (``anodfd.config``, ``anodfd.threshold``) in the IR's rt_info
under ``anodfd``. With ``--int8``, NNCF's post-training quantisation calibrates on window tiles of training pairs,
brought to the model's view and registered as inference brings them, and writes ``model-int8.xml`` only if the
INT8 model scores the validation split no more than `INT8_MAX_LOSS` below FP32 in pixel F1 (at the calibrated
threshold), AUC and defect-level F. Both sets of figures go in the rt_info (``anodfd.int8``) of what is written.

Needs the optional extra ``anodfd[openvino]`` (``openvino``, ``nncf``); nothing else in anodfd imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anodfd.config import Config, ConfigError, DataConfig
from anodfd.export import INPUTS, PARITY_TOLERANCE, parity_diffs

IR_FILE = "model.xml"
INT8_FILE = "model-int8.xml"
INT8_MAX_LOSS = 0.005  # the most any validation figure may fall below FP32 for the INT8 model to be kept
CALIB_PAIRS = 300
FIGURES = ("f1", "auc", "defect_f")
_KEYS = ("config", "threshold", "int8")  # rt_info entries under "anodfd"


def _ov():
    try:
        import openvino
    except ImportError:
        raise ConfigError("OpenVINO is not installed: pip install 'anodfd[openvino]' (openvino, nncf)") from None
    return openvino


def check_installed() -> None:
    """Fails with one line when the extra is missing: `anodfd export` calls it before any work."""
    _ov()
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise ConfigError("NNCF is not installed: pip install 'anodfd[openvino]' (openvino, nncf)") from None


def write_ir(source, config: Config, threshold: float, path: Path, int8: dict | None = None) -> Path:
    """An ONNX file (or an `openvino.Model`) -> IR at ``path`` in the precision it has, with anodfd's metadata."""
    ov = _ov()
    model = ov.convert_model(str(source)) if isinstance(source, (str, Path)) else source
    with_metadata(model, config, threshold, int8)
    # FP32 weights: save_model halves them by default, which would break parity with the ONNX file.
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def with_metadata(model, config: Config, threshold: float, int8: dict | None = None):
    """``model`` (an `openvino.Model`) with anodfd's metadata in its rt_info, as `read_metadata` reads it."""
    for key, value in (("config", json.dumps(config.to_dict())), ("threshold", repr(float(threshold))),
                       ("int8", json.dumps(int8 or {}))):
        model.set_rt_info(value, ["anodfd", key])
    return model


class OpenVinoModel:
    """An IR written by `anodfd export --format openvino` on the CPU, in place of the network for
    `anodfd.inference` (like `anodfd.export.OnnxModel`): ``config``, ``threshold`` and `probs`."""

    def __init__(self, source, threads: int = 0) -> None:
        """``source``: the IR's .xml (or its folder), or an `openvino.Model` in memory (the export's checks)."""
        ov = _ov()
        core = ov.Core()
        if isinstance(source, ov.Model):
            path, model = Path("<in memory>"), source
        else:
            path = Path(source) / IR_FILE if Path(source).is_dir() else Path(source)
            if not path.is_file() or not path.with_suffix(".bin").is_file():
                raise ConfigError(f"{path}: no such OpenVINO IR (.xml and .bin); write one with "
                                  "`anodfd export --format openvino`")
            try:
                model = core.read_model(str(path))
            except Exception as e:  # noqa: BLE001  (OpenVINO raises RuntimeError and plain Exception alike)
                raise ConfigError(f"{path}: OpenVINO cannot read it ({str(e).splitlines()[0]}); export it "
                                  "again") from None
        self.path, self.config, self.threshold, self.int8 = path, *read_metadata(model, path)
        # f32 even where the CPU has bf16 or AMX: OpenVINO would otherwise lower the FP32 model's precision.
        options = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.compiled = core.compile_model(model, "CPU", options)
        self.request = self.compiled.create_infer_request()

    def run(self, history: np.ndarray, current: np.ndarray) -> np.ndarray:
        """uint8 BxHxWx3 pairs -> BxHxW float32 probabilities."""
        return self.request.infer(dict(zip(INPUTS, (history, current))))[0].copy()

    def probs(self, hist: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        """uint8 Bx3xHxW pairs -> Bx1xHxW probabilities, as `anodfd.inference.predict_probs` returns them."""
        nhwc = (np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()) for x in (hist, cur))
        return torch.from_numpy(self.run(*nhwc))[:, None]


def ir_for(path: str | Path, config: Config, threads: int = 0) -> OpenVinoModel:
    """The IR at ``path`` to run in place of a checkpoint's network: refused unless exported from that config."""
    ir = OpenVinoModel(path, threads)
    if ir.config.to_dict() != config.to_dict():
        raise ConfigError(f"{ir.path}: exported from another model's config than the checkpoint's; export this "
                          "checkpoint with `anodfd export --format openvino`")
    return ir


def read_metadata(model, path: Path) -> tuple[Config, float, dict]:
    """(config, threshold, INT8 figures) from an IR's rt_info; one clear error when they are missing or foreign."""
    if not all(model.has_rt_info(["anodfd", key]) for key in _KEYS):
        raise ConfigError(f"{path}: not an `anodfd export --format openvino` IR (no anodfd metadata); "
                          "export the checkpoint again")
    text = {key: model.get_rt_info(["anodfd", key]).astype(str) for key in _KEYS}
    try:
        config = Config.from_dict(json.loads(text["config"]))
        threshold = float(text["threshold"])
        int8 = json.loads(text["int8"])
    except (ValueError, TypeError, KeyError, ConfigError) as e:
        raise ConfigError(f"{path}: its anodfd metadata is not this version's ({e}); export the checkpoint "
                          "again") from None
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"{path}: metadata threshold {threshold} is not a probability; export it again")
    return config, threshold, int8


def ir_parity(model: nn.Module, path: Path, tolerance: float = PARITY_TOLERANCE) -> float:
    """`anodfd.export.parity` for an IR: the largest |OpenVINO - PyTorch| probability; raises above ``tolerance``."""
    worst = float(np.max(parity_diffs(model, OpenVinoModel(path).run)))
    if not worst <= tolerance:
        raise ConfigError(f"OpenVINO differs from PyTorch by {worst:.2e} (more than {tolerance:g}) on the "
                          "probability maps; serve the checkpoint or the ONNX file instead")
    return worst


def calibration_tiles(data: DataConfig, pairs: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One ``window`` x ``window`` tile from each of up to ``pairs`` training pairs, at a seeded place, in the
    view and registration inference gives them (the decode cache's `arrays`), as the IR's inputs."""
    from anodfd.data.dataset import make_dataset

    dataset = make_dataset(data, "train", check=False)
    rng = np.random.default_rng(seed)
    tiles = []
    for i in rng.permutation(len(dataset))[:pairs]:
        hist, cur, _ = dataset.arrays(int(i))
        tiles.append(dict(zip(INPUTS, _tile(hist, cur, data.window, rng))))
    return tiles


def _tile(hist: np.ndarray, cur: np.ndarray, window: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same 1 x window x window x 3 place of both images; reflected first where smaller than a window, as
    `anodfd.inference.sliding_probs` pads."""
    pad = ((0, max(0, window - cur.shape[0])), (0, max(0, window - cur.shape[1])), (0, 0))
    hist, cur = np.pad(hist, pad, mode="reflect"), np.pad(cur, pad, mode="reflect")
    y, x = (int(rng.integers(0, n - window + 1)) for n in cur.shape[:2])
    return [np.ascontiguousarray(img[None, y:y + window, x:x + window]) for img in (hist, cur)]


def quantize(fp32, tiles: list[dict[str, np.ndarray]]):
    """NNCF post-training quantisation of the FP32 `openvino.Model` (left as it is) on ``tiles``: the INT8 one."""
    import nncf

    return nncf.quantize(fp32.clone(), nncf.Dataset(tiles), subset_size=len(tiles),
                         target_device=nncf.TargetDevice.CPU)


def validation_figures(model, data: DataConfig, threshold: float, batch: int = 8) -> dict[str, float]:
    """Pixel F1 at ``threshold``, AUC and defect-level F of ``model`` over the validation split at native size."""
    from anodfd.data.dataset import make_dataset
    from anodfd.evaluation import evaluate

    pixels, _, defects = evaluate(model, make_dataset(data, "val"), torch.device("cpu"), data.window, threshold,
                                  batch=batch, confirm=data.confirm, progress="scoring val for the INT8 check")
    m = pixels.compute(threshold)
    return {"f1": float(m["f1"]), "auc": float(m["auc"]), "defect_f": float(defects.compute()["defect_f"])}


@dataclass
class Int8Verdict:
    fp32: dict[str, float]
    int8: dict[str, float]
    max_loss: float = INT8_MAX_LOSS

    @property
    def losses(self) -> dict[str, float]:
        return {k: self.fp32[k] - self.int8[k] for k in FIGURES}

    @property
    def accepted(self) -> bool:
        # NaN (an AUC on a split without both kinds of pixel) compares False: never accepted on a figure it lacks.
        return all(loss <= self.max_loss for loss in self.losses.values())

    def as_dict(self) -> dict:
        return {"fp32": self.fp32, "int8": self.int8, "max_loss": self.max_loss, "accepted": self.accepted}

    def line(self) -> str:
        figures = ", ".join(f"{k} {self.fp32[k]:.4f} -> {self.int8[k]:.4f}" for k in FIGURES)
        if self.accepted:
            return f"INT8 kept: validation {figures} (none more than {self.max_loss:g} below FP32)"
        worst = max(FIGURES, key=lambda k: self.losses[k] if self.losses[k] == self.losses[k] else np.inf)
        return (f"INT8 not kept: validation {worst} falls {self.losses[worst]:.4f} below FP32 (more than "
                f"{self.max_loss:g}; {figures}); wrote FP32 alone")


def export_openvino(model: nn.Module, config: Config, threshold: float, onnx_path: Path,
                    int8_data: DataConfig | None = None,
                    calib_pairs: int = CALIB_PAIRS,
                    max_loss: float = INT8_MAX_LOSS) -> tuple[Path, float, Int8Verdict | None]:
    """FP32 IR beside ``onnx_path``, checked against PyTorch; with ``int8_data``, an INT8 IR calibrated on its
    training pairs and kept only at parity on its validation split. Written under temporary names and renamed
    once all is done: a failure leaves no IR and replaces no earlier one. Returns (FP32 IR, parity, verdict)."""
    out = onnx_path.parent
    tmp, tmp8 = out / f".{IR_FILE}.tmp.xml", out / f".{INT8_FILE}.tmp.xml"
    try:
        fp32 = _ov().convert_model(str(onnx_path))
        write_ir(fp32, config, threshold, tmp)
        worst = ir_parity(model, tmp)  # the file as written, not the model in memory
        verdict = _int8(fp32, config, threshold, int8_data, calib_pairs, tmp8, max_loss) if int8_data else None
        if verdict is not None:
            write_ir(fp32, config, threshold, tmp, verdict.as_dict())
    except BaseException:
        _remove_ir(tmp)
        _remove_ir(tmp8)
        raise
    _rename_ir(tmp, out / IR_FILE)
    if verdict is not None and verdict.accepted:
        _rename_ir(tmp8, out / INT8_FILE)
    else:
        _remove_ir(out / INT8_FILE)  # an earlier export's INT8 is not this FP32's
    return out / IR_FILE, worst, verdict


def _int8(fp32, config: Config, threshold: float, data: DataConfig, calib_pairs: int, path: Path,
          max_loss: float) -> Int8Verdict:
    """Quantise, score both on the validation split, and write the INT8 IR to ``path`` only if it is kept."""
    print(f"quantising to INT8 on one tile of each of {calib_pairs} training pairs (NNCF) ...", flush=True)
    with_metadata(fp32, config, threshold)  # read by OpenVinoModel below, as a file's would be
    int8 = quantize(fp32, calibration_tiles(data, calib_pairs))
    verdict = Int8Verdict(validation_figures(OpenVinoModel(fp32), data, threshold),
                          validation_figures(OpenVinoModel(int8), data, threshold), max_loss)
    if verdict.accepted:
        write_ir(int8, config, threshold, path, verdict.as_dict())
    return verdict


def _rename_ir(src: Path, dst: Path) -> None:
    src.with_suffix(".bin").replace(dst.with_suffix(".bin"))
    src.replace(dst)  # the .xml last: a reader never finds an .xml without its weights


def _remove_ir(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".bin").unlink(missing_ok=True)

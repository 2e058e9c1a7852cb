"""Bad input, one table: every row is a command line (every `anodfd` subcommand, `tune/search.py`) or a served
request and the files it finds, and each must end in one line on stderr naming the input and the fix, exit 2, no
traceback, and nothing written: no new file or folder, nothing existing changed. A new subcommand adds rows.

The rule is stated in docs/guides/data.md ("Bad input"). Rows run in-process and fail before Ray, MLflow or any
training starts, so the table takes seconds; the one that exports a model is marked slow.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from anodfd.checkpoint import checkpoint_dict, load_checkpoint, model_from_checkpoint, save_checkpoint
from anodfd.cli import main as anodfd
from anodfd.config import PRESETS, Config, ConfigError
from anodfd.data.layouts import read_split
from anodfd.model import build_model
from tune.search import main as search

UNWRITABLE = Path("/sys/anodfd-bad-input")  # sysfs refuses new entries even to root, for whom chmod means nothing


@pytest.fixture(scope="module")
def ckpt(synth_ol, tmp_path_factory) -> Path:
    """A real checkpoint of the smoke model (untrained: these rows never get as far as scoring)."""
    config = Config().with_flat({**PRESETS["smoke"], "data.data": str(synth_ol)})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    save_checkpoint(checkpoint_dict(build_model(config.model), None, 1, config, {"calibrated_threshold": 0.5},
                                    (0.0, 0.0)), path)
    return path


@pytest.fixture(scope="module")
def served(ckpt):
    from anodfd.serving import AnomalyMapModel

    model = AnomalyMapModel()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(ckpt)}))
    return model


class Env:
    """What a row sets up: its files go in ``tmp`` (also the working directory), inputs come from the dataset."""

    def __init__(self, tmp: Path, data: Path, ckpt: Path, served) -> None:
        self.tmp, self.data, self.served = tmp, data, served
        self.good = torch.load(ckpt, weights_only=True)
        self.ckpt, self.out = str(ckpt), str(tmp / "out")
        self.test = read_split(data, "test")
        self.pair = ["--hist", str(self.test[0].hist), "--cur", str(self.test[0].cur)]

    def write(self, name: str, content: bytes) -> str:
        (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / name).write_bytes(content)
        return str(self.tmp / name)

    def mkdir(self, name: str) -> str:
        (self.tmp / name).mkdir(parents=True)
        return str(self.tmp / name)

    def save(self, name: str, obj) -> str:
        torch.save(obj, self.tmp / name)
        return str(self.tmp / name)

    def folders(self, names: list[str], cur: dict[str, bytes] | None = None) -> list[str]:
        """hist/ and cur/ holding the test pairs under ``names``; ``cur`` replaces some current images' bytes."""
        for i, name in enumerate(names):
            p = self.test[i % len(self.test)]
            self.write(f"hist/{name}", p.hist.read_bytes())
            self.write(f"cur/{name}", (cur or {}).get(name, p.cur.read_bytes()))
        return ["--hist", str(self.tmp / "hist"), "--cur", str(self.tmp / "cur")]


def bad_checkpoints(e: Env) -> dict[str, object]:
    config, model = e.good["config"], e.good["config"]["model"]
    return {
        "without-config": {k: v for k, v in e.good.items() if k != "config"},
        "a-tensor": torch.zeros(3),
        "another-variant": {**e.good, "config": {**config, "model": {**model, "name": "paper"}}},
        "negative-size": {**e.good, "config": {**config, "model": {**model, "hidden": -8}}},
    }


def command(e: Env, name: str, ckpt: str) -> list[str]:
    return {
        "predict": ["predict", "--checkpoint", ckpt, *e.pair, "--out", e.out],
        "eval": ["eval", "--checkpoint", ckpt, "--data", str(e.data)],
        "export": ["export", "--checkpoint", ckpt, "--out", e.out],
        "score": ["score", "--checkpoint", ckpt, *e.pair, "--out", e.out],
    }[name]


def checkpoint_row(kind: str, cmd: str) -> Callable[[Env], tuple]:
    def setup(e: Env):
        path = e.save(f"{kind}.pt", bad_checkpoints(e)[kind])
        return command(e, cmd, path), path

    return setup


def pyfunc_checkpoint_row(kind: str) -> Callable[[Env], tuple]:
    def setup(e: Env):
        from anodfd.serving import AnomalyMapModel

        path = e.save(f"{kind}.pt", bad_checkpoints(e)[kind])
        return lambda: AnomalyMapModel().load_context(SimpleNamespace(artifacts={"checkpoint": path})), path

    return setup


def half_jpeg(e: Env) -> tuple:
    cur = e.write("half.jpg", e.test[0].cur.read_bytes()[: e.test[0].cur.stat().st_size // 2])
    return ["predict", "--checkpoint", e.ckpt, "--hist", str(e.test[0].hist), "--cur", cur, "--out", e.out], cur


def existing_dataset(e: Env) -> tuple:
    shutil.copytree(e.data, e.tmp / "OL")
    return ["synth", "OL", "--out", str(e.tmp / "OL"), "--pairs", "3", "--size", "64x64"], str(e.tmp / "OL")


def failed_export(e: Env) -> tuple:
    """A real export that fails its parity check (no export meets a negative tolerance) over an earlier one."""
    from anodfd.export import export_checked

    earlier = e.write("out/model.onnx", b"an earlier, good export")
    model, config = model_from_checkpoint(load_checkpoint(e.ckpt))
    return lambda: export_checked(model, config, 0.5, e.out, tolerance=-1.0), earlier


def unexportable(e: Env) -> tuple:
    """A real checkpoint of a baseline (U-Net), which no export covers."""
    config = Config().with_flat({**PRESETS["smoke"], "model.name": "unet"})
    path = e.save("unet.pt", checkpoint_dict(build_model(config.model), None, 1, config,
                                             {"calibrated_threshold": 0.5}, (0.0, 0.0)))
    return ["export", "--checkpoint", path, "--format", "openvino", "--out", e.out], "model unet: --format openvino"


def ir(e: Env, metadata: dict[str, str], named: str) -> tuple:
    """`predict --openvino` on a real IR (one ReLU) whose anodfd metadata is ``metadata``."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 3], np.float32)
    model = ov.Model([ops.relu(x)], [x])
    for key, value in metadata.items():
        model.set_rt_info(value, ["anodfd", key])
    ov.save_model(model, str(e.tmp / "ir" / "model.xml"))
    return ["predict", "--openvino", str(e.tmp / "ir" / "model.xml"), *e.pair, "--out", e.out], f"model.xml: {named}"


def png(width: int, height: int) -> bytes:
    """A real PNG of ``width`` x ``height``, black, 1 bit: kilobytes on disk, megapixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def request(e: Env, body) -> Callable[[], object]:
    return lambda: e.served.predict(None, body)


def image(height: int, width: int) -> np.ndarray:
    return np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (height, width, 3))  # no memory however large


a = "anodfd"
ROWS = [
    # 6. checkpoints that load but are no model, in every command that builds one, and in the served model
    *[pytest.param(a, checkpoint_row(kind, cmd), id=f"{cmd}-checkpoint-{kind}")
      for kind in ("without-config", "a-tensor", "another-variant", "negative-size")
      for cmd in ("predict", "eval", "export", "score")],
    *[pytest.param("call", pyfunc_checkpoint_row(kind), id=f"pyfunc-checkpoint-{kind}")
      for kind in ("without-config", "a-tensor", "another-variant", "negative-size")],
    # 7. files and folders
    pytest.param(a, lambda e: (["predict", "--checkpoint", e.ckpt, "--list", "missing.txt", "--out", e.out],
                               "--list missing.txt"), id="predict-list-missing"),
    pytest.param(a, lambda e: (["predict", "--checkpoint", e.ckpt, "--list", e.write("l.txt", b"\xff\xfe\x00bad"),
                                "--out", e.out], "l.txt: not UTF-8"), id="predict-list-not-utf8"),
    pytest.param(a, lambda e: (["predict", "--checkpoint", e.ckpt, "--list", str(e.data), "--out", e.out],
                               f"--list {e.data}: a folder"), id="predict-list-a-folder"),
    *[pytest.param(a, lambda e, cmd=cmd: ([*command(e, cmd, e.ckpt)[:-1], e.write("file", b"x")],
                                          f"--out {e.tmp / 'file'}: is a file"), id=f"{cmd}-out-an-existing-file")
      for cmd in ("predict", "score", "export")],
    pytest.param(a, lambda e: (["synth", "OL", "--out", e.write("file", b"x"), "--pairs", "3"],
                               f"--out {e.tmp / 'file'}: is a file"), id="synth-out-an-existing-file"),
    *[pytest.param(a, lambda e, cmd=cmd: ([*command(e, cmd, e.ckpt)[:-1], str(UNWRITABLE / "out")],
                                          f"--out {UNWRITABLE / 'out'}: cannot write in /sys"),
                   id=f"{cmd}-out-unwritable", marks=pytest.mark.skipif(not Path("/sys").is_dir(), reason="no /sys"))
      for cmd in ("predict", "score", "export")],
    pytest.param(a, lambda e: ([*command(e, "eval", e.ckpt), "--json", "missing/metrics.json"],
                               "--json missing/metrics.json: folder"), id="eval-json-into-a-missing-folder"),
    pytest.param(a, lambda e: ([*command(e, "eval", e.ckpt), "--plot", "missing/roc.png"],
                               "--plot missing/roc.png: folder"), id="eval-plot-into-a-missing-folder"),
    pytest.param(a, lambda e: ([*command(e, "eval", e.ckpt), "--device", "foo"], "--device 'foo'"),
                 id="eval-device-foo"),
    pytest.param(a, lambda e: ([*command(e, "eval", e.ckpt), "--batch-size", "0"], "--batch-size 0"),
                 id="eval-batch-size-0"),
    pytest.param(a, lambda e: ([*command(e, "eval", e.ckpt), "--batch-size", "-3"], "--batch-size -3"),
                 id="eval-batch-size-negative"),
    pytest.param(a, lambda e: (["synth", "OL", "--out", e.out, "--pairs", "0"], "--pairs 0"), id="synth-pairs-0"),
    pytest.param(a, lambda e: (["synth", "OL", "--out", e.out, "--pairs", "10", "--test-pairs", "9"], "--test-pairs 9"),
                 id="synth-test-pairs-leave-no-training"),
    # 8. predict checks every input before its first output
    pytest.param(a, lambda e: (["predict", "--checkpoint", e.ckpt, *e.folders(["p0.jpg", "p1.jpg", "p2.jpg"],
                                                                            {"p2.jpg": b"not an image"}),
                                "--out", e.out], str(e.tmp / "cur" / "p2.jpg")), id="predict-third-image-undecodable"),
    pytest.param(a, half_jpeg, id="predict-jpeg-cut-in-half"),
    pytest.param(a, lambda e: (["predict", "--checkpoint", e.ckpt, *e.folders(["a.jpg", "a.png"]), "--out", e.out],
                               str(e.tmp / "cur" / "a.png")), id="predict-same-stem"),
    # 9. score checks everything before it writes score-run.json or starts Ray
    pytest.param(a, lambda e: ([*command(e, "score", e.ckpt), "--actors", "-1"], "--actors -1"),
                 id="score-actors-negative"),
    pytest.param(a, lambda e: ([*command(e, "score", e.ckpt), "--cpus-per-actor", "nan"], "--cpus-per-actor nan"),
                 id="score-cpus-per-actor-nan"),
    pytest.param(a, lambda e: ([*command(e, "score", e.ckpt), "--gpus-per-actor", "-1"], "--gpus-per-actor -1"),
                 id="score-gpus-per-actor-negative"),
    pytest.param(a, lambda e: (["score", "--checkpoint", e.ckpt, *e.folders(["p0.jpg", "p1.jpg"],
                                                                          {"p1.jpg": b"not an image"}),
                                "--out", e.out], str(e.tmp / "cur" / "p1.jpg")), id="score-image-undecodable"),
    pytest.param(a, lambda e: (["score", "--checkpoint", e.ckpt, *e.folders(["a.jpg", "a.png"]), "--out", e.out],
                               str(e.tmp / "cur" / "a.png")), id="score-same-stem"),
    # 10. train and the search
    *[pytest.param(a, lambda e, flags=flags, named=named: (["train", "--data", str(e.data), "--preset", "smoke",
                                                           *flags], named), id=f"train{'-'.join(['', *flags])}")
      for flags, named in [(["--seed", "-1"], "--seed -1"), (["--epochs", "1000000000"], "--epochs 1000000000"),
                           (["--batch-size", "100000"], "--batch-size 100000"),
                           (["--batch-size", "1000"], "--batch-size 1000"),  # allowed, but larger than the split
                           (["--device", "foo"], "--device 'foo'"),
                           (["--storage", "NEW", "--name", "bad name"], "run name 'bad name'"),
                           (["--name", "."], "run name '.'"), (["--name", ".."], "run name '..'")]],
    *[pytest.param("search", lambda e, flags=flags, named=named: (["--data", str(e.data), "--preset", "smoke",
                                                                   *flags], named),
                   id=f"search{'-'.join(['', *flags])}")
      for flags, named in [(["--seed", "-1"], "--seed -1"), (["--max-epochs", "1000000000"], "--max-epochs 1000000000"),
                           (["--num-samples", "1000000"], "--num-samples 1000000"),
                           (["--calibrate", "pixel", "--metric", "calibrated_defect_f"], "add --calibrate defect"),
                           (["--storage", "NEW", "--name", "bad name"], "run name 'bad name'"),
                           (["--name", "."], "run name '.'"), (["--name", ".."], "run name '..'")]],
    # 11. synth
    pytest.param(a, lambda e: (["synth", "OL", "--out", e.out, "--size", "100000x100000"], "--size 100000x100000"),
                 id="synth-size-too-large"),
    pytest.param(a, existing_dataset, id="synth-over-an-existing-dataset"),
    # 12. a failed ONNX export replaces nothing and leaves nothing
    pytest.param("call", failed_export, id="export-parity-failure", marks=pytest.mark.slow),
    # 14. the OpenVINO export and its IRs (anodfd.openvino_ir), before any tracing or quantisation
    pytest.param(a, lambda e: ([*command(e, "export", e.ckpt), "--int8"], "--int8 quantises an OpenVINO IR"),
                 id="export-int8-without-openvino"),
    pytest.param(a, lambda e: ([*command(e, "export", e.ckpt), "--format", "openvino", "--int8", "--calib-data",
                                "missing"], "--calib-data missing: no such folder"), id="export-int8-calib-data-missing"),
    pytest.param(a, lambda e: ([*command(e, "export", e.ckpt), "--format", "openvino", "--int8", "--calib-data",
                                e.mkdir("empty")], "has no usable train split"), id="export-int8-no-training-pairs"),
    pytest.param(a, lambda e: ([*command(e, "export", e.ckpt), "--format", "openvino", "--int8", "--calib-pairs",
                                "0"], "--calib-pairs 0"), id="export-int8-calib-pairs-0"),
    pytest.param(a, unexportable, id="export-openvino-unet"),
    pytest.param(a, lambda e: ir(e, {}, "not an `anodfd export --format openvino` IR"), id="predict-openvino-ir-without-metadata"),
    pytest.param(a, lambda e: ir(e, {"config": '{"model": {"name": "yolo"}}', "threshold": "0.5", "int8": "{}"},
                                        "its anodfd metadata is not this version's"),
                 id="predict-openvino-ir-foreign-metadata"),
    pytest.param(a, lambda e: (["predict", "--openvino", "missing.xml", *e.pair, "--out", e.out],
                               "missing.xml: no such OpenVINO IR"), id="predict-openvino-ir-missing"),
    pytest.param(a, lambda e: ([*command(e, "predict", e.ckpt), "--ir"], "carries: add --model"),
                 id="predict-ir-without-model"),
    pytest.param(a, lambda e: (["score", "--checkpoint", e.ckpt, *e.folders(["p0.jpg"]), "--out", e.out, "--ir"],
                               "carries: add --model"), id="score-ir-without-model"),
    # the other subcommands
    pytest.param(a, lambda e: (["data", "check", str(e.tmp / "missing")], str(e.tmp / "missing")),
                 id="data-check-missing-folder"),
    pytest.param(a, lambda e: (["data", "shift", str(e.data), "--out", e.mkdir("taken"),
                                "--homography", "0.02"], f"{e.tmp / 'taken'} already exists"),
                 id="data-shift-out-exists"),
    pytest.param(a, lambda e: (["data", "boxmasks", str(e.data), "--out", e.out], f"{e.data}: no pair has a boxes"),
                 id="data-boxmasks-without-boxes"),
    *[pytest.param(a, lambda e, cmd=cmd: (["models", *cmd], str(e.tmp / "mlflow.db")), id=f"models-{cmd[0]}-no-store")
      for cmd in (["list", "--dataset", "OL"], ["show", "--dataset", "OL", "--version", "1"],
                  ["history", "--dataset", "OL"], ["promote", "--dataset", "OL", "--version", "1"],
                  ["gate", "--dataset", "OL", "--version", "1"])],
    # 13. serving: one request, one HTTP 400 (MLflow's INVALID_PARAMETER_VALUE)
    pytest.param("pyfunc", lambda e: (request(e, pd.DataFrame({"history": [png(10000, 6000)],
                                                                 "current": [png(10000, 6000)]})),
                                      "row 0, column 'history': 10000x6000 is 60 megapixels"), id="serve-png-too-large"),
    pytest.param("pyfunc", lambda e: (request(e, {"history": image(6000, 10000), "current": image(6000, 10000)}),
                                      "row 0, history: 10000x6000 is 60 megapixels"), id="serve-array-too-large"),
    pytest.param("pyfunc", lambda e: (request(e, pd.DataFrame(columns=["history", "current"])), "an empty batch"),
                 id="serve-empty-frame"),
    pytest.param("pyfunc", lambda e: (request(e, {"history": np.zeros((0, 64, 64, 3), np.uint8),
                                                  "current": np.zeros((0, 64, 64, 3), np.uint8)}),
                                      "history: an empty batch"), id="serve-empty-arrays"),
    pytest.param("pyfunc", lambda e: (request(e, pd.DataFrame({"history": [png(64, 64)], "current": [png(96, 64)]})),
                                      "row 0: history is 64x64 but current is 96x64"), id="serve-two-sizes-encoded"),
    pytest.param("pyfunc", lambda e: (request(e, {"history": image(64, 64), "current": image(64, 96)}),
                                      "row 0: history is 64x64 but current is 96x64"), id="serve-two-sizes-arrays"),
]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every folder under ``roots``, and every file with its size and modification time: a new, removed or
    rewritten entry changes it. (Not a folder's own time: a temporary file made and removed, as a checked export
    is, leaves no trace but that.)"""
    return {str(p): (True,) if p.is_dir() else (False, p.stat().st_size, p.stat().st_mtime_ns)
            for root in roots for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("runner, setup", ROWS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(runner, setup, synth_ol, ckpt, served, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # ./runs, ./mlflow.db and relative paths would land here
    for name in ("MLFLOW_TRACKING_URI", "ANODFD_STORAGE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    e = Env(tmp_path, synth_ol, ckpt, served)
    target, named = setup(e)
    before = snapshot(tmp_path, synth_ol, ckpt.parent)
    capsys.readouterr()
    if runner in ("anodfd", "search"):
        assert (anodfd if runner == "anodfd" else search)(target) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        line = err.strip()
    else:
        with pytest.raises(MlflowException if runner == "pyfunc" else ConfigError) as caught:
            target()
        if runner == "pyfunc":
            assert caught.value.error_code == "INVALID_PARAMETER_VALUE" and caught.value.get_http_status_code() == 400
        line = caught.value.message if runner == "pyfunc" else str(caught.value)
        assert "\n" not in line, line
    assert named in line, line
    assert snapshot(tmp_path, synth_ol, ckpt.parent) == before, "bad input must write nothing"

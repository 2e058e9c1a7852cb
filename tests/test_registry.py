"""The MLflow Model Registry against a real `mlflow server`: registration and its tags, the champion gate, the
pyfunc model, and the CLI's `models list/promote`, `predict --model` and `eval --model`."""

from __future__ import annotations

import importlib.metadata
import json
import re
import uuid

import cv2
import numpy as np
import pytest
import torch
from conftest import free_port

from anodfd import registry, tracking
from anodfd.cli import main
from anodfd.config import PRESETS, Config
from anodfd.data.cache import decode_image
from anodfd.data.dataset import to_chw
from anodfd.data.layouts import fingerprint, read_split
from anodfd.train.loop import fit, load_checkpoint, model_from_checkpoint, predict_probs, resize_probs

# The session's server is shared with other test files, which may register models too: use our own dataset name.
DATASET = f"OLreg{uuid.uuid4().hex[:6]}"
NAME = registry.model_name(DATASET)
METRICS = {"iou": 0.3, "auc": 0.8, "eer": 0.25, "precision": 0.6, "recall": 0.4, "oa": 0.97}


@pytest.fixture(scope="module")
def checkpoint(synth_ol, tmp_path_factory):
    config = Config().with_flat({**PRESETS["smoke"], "data.data": str(synth_ol), "train.epochs": 1,
                                 "train.max_steps_per_epoch": 2})
    return fit(config, tmp_path_factory.mktemp("reg") / "run", log=lambda s: None)["best"]


@pytest.fixture(scope="module")
def search_run(mlflow_server, tmp_path_factory):
    run_id, _ = tracking.start_run(mlflow_server, Config(), str(tmp_path_factory.mktemp("search")), "search")
    return run_id


def aliases(uri: str) -> dict[str, int]:
    return {a: int(v) for a, v in tracking.client(uri).get_registered_model(NAME).aliases.items()}


@pytest.fixture(scope="module")
def history(mlflow_server, checkpoint, search_run, synth_ol):
    """Five registrations of the same checkpoint with different test F1 / data: (Registration, aliases after)."""
    fp = fingerprint(synth_ol)
    steps = [(0.5, fp), (0.4, fp), (0.5, fp), (0.6, fp), (0.9, "0123456789abcdef")]
    out = []
    for trial, (f1, data) in enumerate(steps, 1):
        reg = registry.log_and_register(mlflow_server, checkpoint, DATASET, {"f1": f1, **METRICS}, data, search_run,
                                        tags={"trial": str(trial)})
        out.append((reg, aliases(mlflow_server)))
    return out


def test_first_registration_is_champion_with_tags(history, mlflow_server, search_run, synth_ol):
    reg, after = history[0]
    assert (reg.name, reg.version, reg.champion) == (NAME, 1, True)
    assert "no champion yet" in reg.reason
    assert after == {"champion": 1, "challenger": 1}
    c = tracking.client(mlflow_server)
    mv = c.get_model_version(NAME, "1")
    assert mv.run_id == search_run
    tags = mv.tags
    assert {k: tags[k] for k in ("test_f1", "test_iou", "test_auc", "test_eer", "test_precision", "test_recall",
                                 "test_oa")} == {"test_f1": "0.5", "test_iou": "0.3", "test_auc": "0.8",
                                                 "test_eer": "0.25", "test_precision": "0.6", "test_recall": "0.4",
                                                 "test_oa": "0.97"}
    assert tags["dataset"] == DATASET and tags["fingerprint"] == fingerprint(synth_ol)
    assert tags["search_run_id"] == search_run and tags["trial"] == "1"
    assert tags["code_version"] == importlib.metadata.version("anodfd")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"])  # the tests run from the git checkout
    # Logged into the search run as models (one per registration), without ending or altering that run.
    run = c.get_run(search_run)
    assert run.info.status == "RUNNING"
    assert len(run.outputs.model_outputs) == len(history)


def test_champion_gate(history):
    (worse, a2), (equal, a3), (better, a4), (other_data, a5) = history[1:]
    assert (worse.version, worse.champion) == (2, False)
    assert a2 == {"champion": 1, "challenger": 2}
    assert "0.4 does not beat champion v1's 0.5" in worse.reason
    assert (equal.version, equal.champion) == (3, False)  # a tie keeps the incumbent
    assert a3 == {"champion": 1, "challenger": 3}
    assert (better.version, better.champion) == (4, True)
    assert a4 == {"champion": 4, "challenger": 4}
    assert "0.6 beats champion v1's 0.5" in better.reason
    # Far higher F1, but on other data: not comparable, champion stays.
    assert (other_data.version, other_data.champion) == (5, False)
    assert a5 == {"champion": 4, "challenger": 5}
    assert "0123456789abcdef" in other_data.reason and "not comparable" in other_data.reason


def test_decide_champion_needs_strictly_better_f1_on_the_same_data():
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    def champion(**tags: str) -> ModelVersion:
        return ModelVersion(NAME, "7", 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])

    assert registry.decide_champion(0.5, "fp", champion(test_f1="0.5", fingerprint="fp"))[0] is False
    assert registry.decide_champion(0.5000001, "fp", champion(test_f1="0.5", fingerprint="fp"))[0] is True
    take, reason = registry.decide_champion(0.9, "fp", champion(fingerprint="fp"))  # promoted by hand, untagged
    assert not take and "no test_f1" in reason
    with pytest.raises(registry.RegistryError, match="needs an F1"):
        registry.log_and_register("http://unused", "unused.pt", DATASET, {"iou": 0.5}, "fp", "run")


def test_pyfunc_model_matches_checkpoint(history, mlflow_server, checkpoint, synth_ol, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert pyfunc.metadata.get_input_schema().input_names() == ["history", "current"]

    # Real pairs at sizes unlike the model's (and unlike each other), as RGB arrays and as lossless PNG files.
    pairs = read_split(synth_ol, "test")[:2]
    hists = [cv2.resize(cv2.imread(str(p.hist))[..., ::-1], (90, 70)) for p in pairs]
    curs = [cv2.resize(cv2.imread(str(p.cur))[..., ::-1], (61, 83)) for p in pairs]
    batch = pyfunc.predict({"history": np.stack(hists), "current": np.stack(curs)})
    assert batch.shape == (2, 83, 61) and batch.dtype == np.float32

    # The checkpoint directly, through the files-on-disk path that `anodfd predict` uses.
    ckpt = load_checkpoint(checkpoint)
    model, config = model_from_checkpoint(ckpt)
    size = config.data.image_size
    for i, (h, c) in enumerate(zip(hists, curs)):
        cv2.imwrite(str(tmp_path / f"h{i}.png"), h[..., ::-1])
        cv2.imwrite(str(tmp_path / f"c{i}.png"), c[..., ::-1])
        probs = predict_probs(model, to_chw(decode_image(tmp_path / f"h{i}.png", size))[None],
                              to_chw(decode_image(tmp_path / f"c{i}.png", size))[None], torch.device("cpu"))
        direct = resize_probs(probs, 83, 61)[0, 0].numpy()
        np.testing.assert_allclose(batch[i], direct, atol=1e-6)

    # A "ragged" batch: images of different sizes in one call, one map per current image at its own size.
    ragged = {k: np.empty(2, dtype=object) for k in ("history", "current")}
    ragged["history"][:] = [hists[0], curs[1]]
    ragged["current"][:] = [curs[0], hists[1]]
    maps = pyfunc.predict(ragged)
    assert [m.shape for m in maps] == [(83, 61), (70, 90)]
    np.testing.assert_allclose(maps[0], batch[0], atol=1e-6)


def test_load_checkpoint_from_registry(history, mlflow_server, checkpoint):
    original = load_checkpoint(checkpoint)
    for uri in (f"models:/{NAME}@champion", f"models:/{NAME}/2"):
        got = registry.load_checkpoint_from_registry(mlflow_server, uri)
        assert got["optimizer"] is None and got["threshold"] == original["threshold"]
        assert got["config"] == original["config"]
        assert all(torch.equal(got["model"][k], v) for k, v in original["model"].items())


@pytest.mark.parametrize("model_uri, message", [
    (f"models:/{NAME}@nosuch", "has no alias 'nosuch'"),
    (f"models:/{NAME}/99", "has no version 99"),
    ("models:/anodfdnet-NoSuchData@champion", "no registered model anodfdnet-NoSuchData"),
    (f"runs:/{NAME}", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
])
def test_bad_model_uri_is_one_clear_line(history, mlflow_server, model_uri, message):
    with pytest.raises(registry.RegistryError, match=re.escape(message)):
        registry.load_checkpoint_from_registry(mlflow_server, model_uri)


def test_models_list_and_promote_cli(history, mlflow_server, capsys):
    assert main(["models", "list", "--dataset", DATASET, "--mlflow-uri", mlflow_server]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(history)
    row = {int(line.split()[0]): line.split() for line in lines[1:]}
    assert row[4][1:3] == ["champion", "0.6000"] and row[5][1:3] == ["challenger", "0.9000"]
    assert row[1][1:5] == ["-", "0.5000", "0.3000", "0.8000"]

    assert main(["models", "promote", "--dataset", DATASET, "--version", "2", "--mlflow-uri", mlflow_server]) == 0
    assert aliases(mlflow_server)["champion"] == 2  # explicit promotion bypasses the F1 gate
    assert main(["models", "promote", "--dataset", DATASET, "--version", "99", "--mlflow-uri", mlflow_server]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{NAME} has no version 99; versions: [1, 2, 3, 4, 5]" in err
    assert aliases(mlflow_server)["champion"] == 2
    assert main(["models", "list", "--dataset", "NoSuchData", "--mlflow-uri", mlflow_server]) == 2
    assert "no registered model anodfdnet-NoSuchData" in capsys.readouterr().err


def test_predict_and_eval_from_registry_match_checkpoint(history, mlflow_server, checkpoint, synth_ol, tmp_path):
    pair = read_split(synth_ol, "test")[0]
    io = ["--hist", str(pair.hist), "--cur", str(pair.cur)]
    uri = ["--mlflow-uri", mlflow_server]
    assert main(["predict", "--model", f"models:/{NAME}@champion", *io, "--out", str(tmp_path / "reg"), *uri]) == 0
    assert main(["predict", "--checkpoint", str(checkpoint), *io, "--out", str(tmp_path / "file")]) == 0
    written = sorted(p.name for p in (tmp_path / "reg").iterdir())
    assert written == ["cur.json", "cur_map.png", "cur_overlay.jpg"]
    assert (tmp_path / "reg/cur_map.png").read_bytes() == (tmp_path / "file/cur_map.png").read_bytes()
    assert json.loads((tmp_path / "reg/cur.json").read_text()) == json.loads((tmp_path / "file/cur.json").read_text())

    data = ["--data", str(synth_ol), "--split", "test"]
    assert main(["eval", "--model", f"models:/{NAME}/1", *data, "--json", str(tmp_path / "reg.json"), *uri]) == 0
    assert main(["eval", "--checkpoint", str(checkpoint), *data, "--json", str(tmp_path / "file.json")]) == 0
    reg, file = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("reg", "file"))
    assert set(reg) == {"precision", "recall", "oa", "f1", "iou", "auc", "eer", "threshold"} and reg == file


def test_registry_errors_in_cli(history, mlflow_server, checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):  # --checkpoint and --model are mutually exclusive
        main(["predict", "--checkpoint", str(checkpoint), "--model", f"models:/{NAME}/1", "--hist", "h",
              "--cur", "c", "--out", str(tmp_path)])
    capsys.readouterr()
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["models", "list", "--dataset", DATASET, "--mlflow-uri", dead]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"MLflow tracking server {dead} is unreachable" in err

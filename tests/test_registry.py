"""The MLflow Model Registry against a real `mlflow server`: registration and its tags, the champion gate, the
pyfunc model, and the CLI's `models list/promote`, `predict --model` and `eval --model`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import card, free_port, same_state

from anodfd import gate, registry, tracking
from anodfd.card import model_card
from anodfd.checkpoint import load_checkpoint, model_from_checkpoint
from anodfd.cli import main
from anodfd.config import Config
from anodfd.data.cache import decode_image
from anodfd.data.dataset import to_chw
from anodfd.data.layouts import fingerprint, read_split
from anodfd.inference import predict_probs, resize_probs
from anodfd.scoring import Protocol, score_checkpoint

# The session's server is shared with other test files, which may register models too: use our own dataset name.
DATASET = f"OLreg{uuid.uuid4().hex[:6]}"
NAME = registry.model_name(DATASET)
METRICS = {"iou": 0.3, "auc": 0.8, "eer": 0.25, "precision": 0.6, "recall": 0.4, "oa": 0.97}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints[0]


@pytest.fixture(scope="module")
def search_run(mlflow_server, tmp_path_factory):
    run_id, _ = tracking.start_run(mlflow_server, Config(), str(tmp_path_factory.mktemp("search")), "search")
    return run_id


def aliases(uri: str) -> dict[str, int]:
    return {a: int(v) for a, v in tracking.client(uri).get_registered_model(NAME).aliases.items()}


@pytest.fixture(scope="module")
def weights(checkpoint, tmp_path_factory) -> list[Path]:
    """Six checkpoints with distinct weights (the trained one, nudged per version), so that a lookup returning the
    wrong version returns the wrong weights."""
    folder, original = tmp_path_factory.mktemp("versions"), load_checkpoint(checkpoint)
    paths = []
    for version in range(1, 7):
        gen = torch.Generator().manual_seed(version)
        model = {k: v + 2e-2 * torch.randn(v.shape, generator=gen) if v.is_floating_point() and "running_" not in k
                 else v for k, v in original["model"].items()}
        torch.save({**original, "model": model}, folder / f"v{version}.pt")
        paths.append(folder / f"v{version}.pt")
    return paths


def version_weights(weights: list[Path], version: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(weights[version - 1])["model"]


@pytest.fixture(scope="module")
def history(mlflow_server, weights, search_run, synth_ol):
    """Six registrations with chosen scores, version N holding ``weights[N - 1]``: (Registration, aliases after)."""
    fp = fingerprint(synth_ol)
    steps = [card(0.5, fp, **METRICS), card(0.4, fp, **METRICS), card(0.5, fp, **METRICS), card(0.6, fp, **METRICS),
             card(0.9, "0123456789abcdef", **METRICS), card(0.7, fp, **{**METRICS, "auc": 0.55})]
    out = []
    for trial, (scores, path) in enumerate(zip(steps, weights), 1):
        reg = gate.log_and_register(mlflow_server, path, DATASET, scores, search_run, tags={"trial": str(trial)})
        out.append((reg, aliases(mlflow_server)))
    return out


def test_first_registration_is_champion_with_tags(history, mlflow_server, search_run, synth_ol, checkpoint):
    reg, after = history[0]
    assert (reg.name, reg.version, reg.champion) == (NAME, 1, True)
    assert "no champion yet; test F1 0.5000 at its served threshold 0.5 clears the floor 0.1000" in reg.reason
    assert after == {"champion": 1, "challenger": 1}
    c = tracking.client(mlflow_server)
    mv = c.get_model_version(NAME, "1")
    assert mv.run_id == search_run
    tags = mv.tags
    assert {k: tags[k] for k in ("test_f1", "test_iou", "test_auc", "test_eer", "test_precision", "test_recall",
                                 "test_oa")} == {"test_f1": "0.5", "test_iou": "0.3", "test_auc": "0.8",
                                                 "test_eer": "0.25", "test_precision": "0.6", "test_recall": "0.4",
                                                 "test_oa": "0.97"}
    assert tags["test_f1_calibrated"] == "0.5" and tags["served_threshold"] == "0.5"
    protocol = Protocol.from_json(tags["protocol"])
    assert protocol.fingerprint == tags["fingerprint"] == fingerprint(synth_ol) and protocol.split == "test"
    assert tags["protocol_id"] == protocol.id and "native" in protocol.resolution
    assert (tags["floor_f1"], tags["split_train"], tags["split_test"]) == ("0.1", "30", "6")
    assert json.loads(tags["config"]) == load_checkpoint(checkpoint)["config"]
    assert tags["dataset"] == DATASET and tags["search_run_id"] == search_run and tags["trial"] == "1"
    assert tags["code_version"] == importlib.metadata.version("anodfd")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"])  # the tests run from the git checkout
    # Logged into the search run as models (one per registration), without ending or altering that run.
    run = c.get_run(search_run)
    assert run.info.status == "RUNNING"
    assert len(run.outputs.model_outputs) == len(history)


def test_registration_in_a_local_store_away_from_the_working_directory(checkpoint, tmp_path, monkeypatch):
    """A SQLite store that is not ./mlflow.db: MLflow's local registry finds the logged model through the process's
    tracking URI, so registration failed ("Logged model ... not found") unless the store sat in the working
    directory. The process's URI and MLFLOW_TRACKING_URI are left as they were."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the user's own, which must survive
    before = mlflow.get_tracking_uri()  # the environment's, unless an earlier test in this process set one
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    (tmp_path / "elsewhere").mkdir()
    run_id, _ = tracking.start_run(uri, Config(), str(tmp_path / "search"), "search")

    reg = gate.log_and_register(uri, checkpoint, "OLsqlite", card(0.5), run_id)

    assert (reg.version, reg.champion) == (1, True)
    served = registry.load_checkpoint_from_registry(uri, "models:/anodfdnet-OLsqlite@champion")
    assert same_state(served["model"], load_checkpoint(checkpoint)["model"])
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"
    assert mlflow.get_tracking_uri() == before
    assert not (tmp_path / "mlflow.db").exists()


def test_champion_gate(history):
    (worse, a2), (equal, a3), (better, a4), (other_data, a5), (weak_auc, a6) = history[1:]
    assert (worse.version, worse.champion) == (2, False)
    assert a2 == {"champion": 1, "challenger": 2}
    assert "0.4000 at its served threshold 0.5 does not beat champion v1's 0.5000" in worse.reason
    assert (equal.version, equal.champion) == (3, False)  # a tie keeps the incumbent
    assert a3 == {"champion": 1, "challenger": 3}
    assert (better.version, better.champion) == (4, True)
    assert a4 == {"champion": 4, "challenger": 4}
    assert "beats champion v1's 0.5000" in better.reason
    # Far higher F1, but under another protocol (other data) and no data to re-score with: champion stays.
    assert (other_data.version, other_data.champion) == (5, False)
    assert a5 == {"champion": 4, "challenger": 5}
    assert "not comparable" in other_data.reason and "anodfd models gate --data" in other_data.reason
    # Better F1 than the champion on the same data, but a pixel AUC barely above chance.
    assert (weak_auc.version, weak_auc.champion) == (6, False)
    assert a6 == {"champion": 4, "challenger": 6}
    assert "stays challenger: pixel AUC 0.5500 is 0.0500 short of 0.6" in weak_auc.reason


def test_decide_champion_floor_protocol_and_ties():
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    def version(**tags: str) -> ModelVersion:
        return ModelVersion(NAME, "7", 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])

    new = {"test_f1_calibrated": "0.5", "test_auc": "0.9", "floor_f1": "0.3", "protocol_id": "p1"}
    held = version(test_f1_calibrated="0.5", protocol_id="p1")
    assert gate.decide_champion(new, None)[0] is True
    assert gate.decide_champion(new, held)[0] is False  # a tie keeps the incumbent
    assert gate.decide_champion({**new, "test_f1_calibrated": "0.5000001"}, held)[0] is True
    take, reason = gate.decide_champion({**new, "test_f1_calibrated": "0.25"}, None)  # even with no champion at all
    assert not take and "test F1 0.2500 is 0.0500 short of the template-differencing floor 0.3000" in reason
    take, reason = gate.decide_champion({**new, "test_auc": "nan"}, None)
    assert not take and "pixel AUC nan" in reason
    take, reason = gate.decide_champion({k: v for k, v in new.items() if k != "floor_f1"}, None)
    assert not take and "no template-differencing floor" in reason
    take, reason = gate.decide_champion({**new, "test_f1_calibrated": "0.9"},
                                        version(test_f1_calibrated="0.5", protocol_id="p0"))
    assert not take and "protocol p0" in reason and "not comparable" in reason
    take, reason = gate.decide_champion(new, version(protocol_id="p1"))  # promoted by hand, untagged
    assert not take and "no test_f1_calibrated" in reason
    take, reason = gate.decide_champion({}, None)  # registered by hand: no scores at all
    assert not take and "no test F1 at its served threshold (tag test_f1_calibrated)" in reason
    # Judged as served: F1 at 0.5 does not count, neither against the floor nor against the champion.
    as_served = {**new, "test_f1": "0.9", "test_f1_calibrated": "0.2", "served_threshold": "0.62"}
    take, reason = gate.decide_champion(as_served, None)
    assert not take and "stays challenger: test F1 0.2000 at its served threshold 0.62 is 0.1000 short of the" in reason
    take, reason = gate.decide_champion({**as_served, "test_f1_calibrated": "0.45"}, held)
    assert not take and "test F1 0.4500 at its served threshold 0.62 does not beat champion v7's 0.5000" in reason
    take, reason = gate.decide_champion({**new, "test_f1": "0.1", "test_f1_calibrated": "0.6"}, held)
    assert take and "beats champion v7's 0.5000" in reason
    with pytest.raises(registry.RegistryError, match="needs a test F1"):
        gate.log_and_register("http://unused", "unused.pt", DATASET, card(float("nan")), "run")


def test_champion_under_another_protocol_is_rescored_before_the_comparison(mlflow_server, checkpoint, search_run,
                                                                          synth_ol, tmp_path, capsys):
    """A champion whose F1 was measured another way (here: an inflated 0.99 at training size) is scored again
    under the new version's protocol; the comparison then uses the new score, and the old one is kept."""
    dataset = f"{DATASET}rs"
    old = card(0.99, fingerprint(synth_ol))
    old = dataclasses.replace(old, protocol=dataclasses.replace(old.protocol, resolution="training size"))
    first = gate.log_and_register(mlflow_server, checkpoint, dataset, old, search_run)
    assert first.champion

    def rescore(ckpt: dict):
        return score_checkpoint(ckpt, synth_ol, "test", progress=False)

    real = score_checkpoint(load_checkpoint(checkpoint), synth_ol, "test", out=tmp_path / "card", progress=False)
    assert set(real.files) == {"roc.png", "overlays.jpg"} and real.protocol.id != old.protocol.id
    # Same checkpoint, so its true F1 is real.metrics["f1"]; the challenger is a hair better and clears its floor.
    better = dataclasses.replace(real, metrics={**real.metrics, "auc": 0.9}, floor_f1=0.0,
                                 calibrated={**real.calibrated, "f1": real.calibrated["f1"] + 0.01})
    second = gate.log_and_register(mlflow_server, checkpoint, dataset, better, search_run, rescore=rescore)
    assert "re-scoring it under this one" in capsys.readouterr().out
    assert second.champion, second.reason
    assert f"beats champion v1's {real.calibrated['f1']:.4f} under protocol {real.protocol.id}" in second.reason

    c = tracking.client(mlflow_server)
    name = registry.model_name(dataset)
    v1 = c.get_model_version(name, "1").tags
    assert v1["protocol_id"] == real.protocol.id and float(v1["test_f1"]) == pytest.approx(real.metrics["f1"])
    (kept,) = [json.loads(v) for k, v in v1.items() if k.startswith(gate.RESCORED_PREFIX)]
    assert kept["test_f1"] == "0.99" and kept["protocol_id"] == old.protocol.id

    # The model card: description, pictures among the model's artifacts, and `anodfd models show`.
    third = gate.log_and_register(mlflow_server, checkpoint, dataset, real, search_run,
                                      tags={"trial_run_id": search_run})
    location = c.get_model_version_download_uri(name, str(third.version))
    import mlflow

    roc = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/card/roc.png", dst_path=str(tmp_path / "dl"),
                                              tracking_uri=mlflow_server)
    assert Path(roc).read_bytes() == real.files["roc.png"].read_bytes()
    assert main(["models", "show", "--dataset", dataset, "--version", str(third.version),
                 "--mlflow-uri", mlflow_server]) == 0
    shown = capsys.readouterr().out
    cfg = load_checkpoint(checkpoint)["config"]
    for text in (f"## {name} v{third.version}", f"protocol `{real.protocol.id}`",
                 f"| 0.5 (paper) | {real.metrics['f1']:.4f} |", f"template differencing test F1 {real.floor_f1:.4f}",
                 f"{real.threshold:.4f} (calibrated, served)",
                 "train {train}, val {val}, test {test} pairs".format(**real.split_sizes),
                 "{name} depth {depth}, ".format(**cfg["model"]) + f"pairs resized to {cfg['data']['resize']}x",
                 "/#/experiments/", f"runs/{search_run})", "aliases: challenger",
                 "gate decision: ", "card/overlays.jpg"):
        assert text in shown, text


def test_pyfunc_model_matches_checkpoint(history, mlflow_server, weights, synth_ol, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    # No input schema (the model takes arrays or encoded images and checks them itself); the threshold param
    # defaults to the calibrated threshold the version serves with.
    assert pyfunc.metadata.get_input_schema() is None
    [param] = pyfunc.metadata.get_params_schema().params
    assert (param.name, param.default) == ("threshold", pytest.approx(float(pyfunc.metadata.metadata["threshold"])))
    # A ready request body for `mlflow models serve` travels with every version.
    assert pyfunc.metadata.saved_input_example_info["serving_input_path"] == "serving_input_example.json"

    # Real pairs at a size unlike the model's, as RGB arrays and as lossless PNG files.
    pairs = read_split(synth_ol, "test")[:2]
    hists = [cv2.resize(cv2.imread(str(p.hist))[..., ::-1], (61, 83)) for p in pairs]
    curs = [cv2.resize(cv2.imread(str(p.cur))[..., ::-1], (61, 83)) for p in pairs]
    batch = pyfunc.predict({"history": np.stack(hists), "current": np.stack(curs)})
    assert batch.shape == (2, 83, 61) and batch.dtype == np.float32
    # One pair: a batch of one, or a bare HxWx3 pair. Anything but uint8 RGB is refused, naming the input.
    one = pyfunc.predict({"history": hists[0][None], "current": curs[0][None]})
    assert one.shape == (1, 83, 61)
    np.testing.assert_allclose(one[0], batch[0], atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict({"history": hists[0], "current": curs[0]}), batch[0], atol=1e-6)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="current: expected HxWx3 uint8 RGB"):
        pyfunc.predict({"history": hists[0], "current": curs[0].astype(np.float32)})

    # The champion's checkpoint directly, through the files-on-disk path that `anodfd predict` uses.
    ckpt = load_checkpoint(weights[aliases(mlflow_server)["champion"] - 1])
    model, config = model_from_checkpoint(ckpt)
    size = config.data.resize
    for i, (h, c) in enumerate(zip(hists, curs)):
        cv2.imwrite(str(tmp_path / f"h{i}.png"), h[..., ::-1])
        cv2.imwrite(str(tmp_path / f"c{i}.png"), c[..., ::-1])
        probs = predict_probs(model, to_chw(decode_image(tmp_path / f"h{i}.png", size))[None],
                              to_chw(decode_image(tmp_path / f"c{i}.png", size))[None], torch.device("cpu"))
        direct = resize_probs(probs, 83, 61)[0, 0].numpy()
        np.testing.assert_allclose(batch[i], direct, atol=1e-6)

    # A "ragged" batch: pairs of different sizes in one call, one map per current image at its own size. The two
    # images of one pair must agree, as on the REST path.
    ragged = {k: np.empty(2, dtype=object) for k in ("history", "current")}
    ragged["history"][:] = [hists[0], cv2.resize(hists[1], (90, 70))]
    ragged["current"][:] = [curs[0], cv2.resize(curs[1], (90, 70))]
    maps = pyfunc.predict(ragged)
    assert [m.shape for m in maps] == [(83, 61), (70, 90)]
    with pytest.raises(MlflowException, match="row 0: history is 90x70 but current is 61x83"):
        pyfunc.predict({"history": cv2.resize(hists[0], (90, 70)), "current": curs[0]})
    np.testing.assert_allclose(maps[0], batch[0], atol=1e-6)


def test_load_checkpoint_from_registry(history, mlflow_server, weights):
    champion = aliases(mlflow_server)["champion"]
    other = 2 if champion != 2 else 1
    assert not same_state(version_weights(weights, champion), version_weights(weights, other))
    for uri, version in ((f"models:/{NAME}@champion", champion), (f"models:/{NAME}/{other}", other)):
        got, original = registry.load_checkpoint_from_registry(mlflow_server, uri), load_checkpoint(weights[version - 1])
        assert got["optimizer"] is None and got["threshold"] == original["threshold"]
        assert got["config"] == original["config"]
        assert same_state(got["model"], original["model"]), uri


@pytest.mark.parametrize("model_uri, message", [
    (f"models:/{NAME}@nosuch", "has no alias 'nosuch'"),
    (f"models:/{NAME}/99", "has no version 99"),
    ("models:/anodfdnet-NoSuchData@champion", "no registered model anodfdnet-NoSuchData"),
    (f"runs:/{NAME}", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
], ids=["no-alias", "no-version", "no-model", "runs-uri"])  # NAME is random: xdist workers must see the same ids
def test_bad_model_uri_is_one_clear_line(history, mlflow_server, model_uri, message):
    with pytest.raises(registry.RegistryError, match=re.escape(message)):
        registry.load_checkpoint_from_registry(mlflow_server, model_uri)


def test_models_list_and_promote_cli(history, mlflow_server, capsys):
    assert main(["models", "list", "--dataset", DATASET, "--mlflow-uri", mlflow_server]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(history)
    row = {int(line.split()[0]): line.split() for line in lines[1:]}
    assert row[4][1:3] == ["champion", "0.6000"] and row[6][1:3] == ["challenger", "0.7000"]
    assert row[1][1:6] == ["-", "0.5000", "0.5000", "0.3000", "0.8000"]  # F1 at 0.5 and as served, IoU, AUC

    assert main(["models", "promote", "--dataset", DATASET, "--version", "2", "--mlflow-uri", mlflow_server]) == 0
    assert aliases(mlflow_server)["champion"] == 2  # explicit promotion bypasses the F1 gate
    assert main(["models", "promote", "--dataset", DATASET, "--version", "99", "--mlflow-uri", mlflow_server]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{NAME} has no version 99; versions: [1, 2, 3, 4, 5, 6]" in err
    assert aliases(mlflow_server)["champion"] == 2
    assert main(["models", "list", "--dataset", "NoSuchData", "--mlflow-uri", mlflow_server]) == 2
    assert "no registered model anodfdnet-NoSuchData" in capsys.readouterr().err


def test_aliases_are_lower_case(history, mlflow_server, capsys):
    """MLflow's aliases are case-sensitive: `--alias Champion` used to add a second alias and leave champion where
    it was (a rollback that did nothing, with exit 0). It now means champion."""
    target = 1 if aliases(mlflow_server)["champion"] != 1 else 3
    assert main(["models", "promote", "--dataset", DATASET, "--version", str(target), "--alias", "Champion",
                 "--reason", "rollback", "--mlflow-uri", mlflow_server]) == 0
    assert f"{NAME}@champion -> version {target}" in capsys.readouterr().out
    now = aliases(mlflow_server)
    assert now["champion"] == target and set(now) == {"champion", "challenger"}
    gate.promote(mlflow_server, DATASET, target, alias="CHALLENGER")
    assert aliases(mlflow_server) == {"champion": target, "challenger": target}


def test_gate_judges_versions_without_anodfd_tags(mlflow_server, checkpoint, search_run, capsys):
    """`models gate` on a version whose dataset tag is gone, and on one registered by hand with no tags at all:
    each is judged like any other version (it crashed with KeyError: 'dataset')."""
    dataset = f"{DATASET}nt"
    assert gate.log_and_register(mlflow_server, checkpoint, dataset, card(0.5), search_run).champion
    name, v2 = registry.register_version(mlflow_server, checkpoint, dataset, card(0.7), search_run)
    c = tracking.client(mlflow_server)
    c.delete_model_version_tag(name, str(v2), "dataset")
    gate_cli = ["models", "gate", "--dataset", dataset, "--mlflow-uri", mlflow_server, "--version"]
    assert main([*gate_cli, str(v2)]) == 0
    assert "champion moved to it" in capsys.readouterr().out
    first = c.get_model_version(name, "1")
    bare = int(c.create_model_version(name, source=first.source, run_id=search_run,
                                      model_id=first.source.removeprefix("models:/")).version)
    assert not {k for k in c.get_model_version(name, str(bare)).tags if k.startswith("test_")}
    assert main([*gate_cli, str(bare)]) == 0
    out = capsys.readouterr().out
    assert "champion unchanged" in out and "no test F1 at its served threshold (tag test_f1_calibrated)" in out
    assert {k: int(v) for k, v in c.get_registered_model(name).aliases.items()} == {"champion": v2,
                                                                                      "challenger": bare}


def test_predict_and_eval_from_registry_match_checkpoint(history, mlflow_server, weights, synth_ol, tmp_path):
    pair = read_split(synth_ol, "test")[0]
    io = ["--hist", str(pair.hist), "--cur", str(pair.cur)]
    uri = ["--mlflow-uri", mlflow_server]
    champion = weights[aliases(mlflow_server)["champion"] - 1]
    assert main(["predict", "--model", f"models:/{NAME}@champion", *io, "--out", str(tmp_path / "reg"), *uri]) == 0
    assert main(["predict", "--checkpoint", str(champion), *io, "--out", str(tmp_path / "file")]) == 0
    written = sorted(p.name for p in (tmp_path / "reg").iterdir())
    assert written == ["cur.json", "cur_map.png", "cur_overlay.jpg"]
    assert (tmp_path / "reg/cur_map.png").read_bytes() == (tmp_path / "file/cur_map.png").read_bytes()
    assert json.loads((tmp_path / "reg/cur.json").read_text()) == json.loads((tmp_path / "file/cur.json").read_text())

    data = ["--data", str(synth_ol), "--split", "test"]
    assert main(["eval", "--model", f"models:/{NAME}/1", *data, "--json", str(tmp_path / "reg.json"), *uri]) == 0
    assert main(["eval", "--checkpoint", str(weights[0]), *data, "--json", str(tmp_path / "file.json")]) == 0
    reg, file = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("reg", "file"))
    assert set(reg) == {"precision", "recall", "oa", "f1", "iou", "auc", "eer", "threshold", "image_auroc",
                        "undefined", "resolution", "defect_threshold", "defects"} and reg == file


def test_registry_errors_in_cli(history, mlflow_server, checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):  # --checkpoint and --model are mutually exclusive
        main(["predict", "--checkpoint", str(checkpoint), "--model", f"models:/{NAME}/1", "--hist", "h",
              "--cur", "c", "--out", str(tmp_path)])
    capsys.readouterr()
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["models", "list", "--dataset", DATASET, "--mlflow-uri", dead]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"MLflow tracking server {dead} is unreachable" in err


def test_export_from_the_registry_lands_on_that_version(history, mlflow_server, weights, tmp_path):
    """`anodfd export --model models:/NAME@champion` exports the champion's own weights and attaches the file to
    that version (its run's onnx/v<N>/ folder, tag onnx): downloaded back, it answers as that version does, and not
    as another version."""
    import mlflow

    from anodfd.export import OnnxModel

    champion = aliases(mlflow_server)["champion"]
    assert main(["export", "--model", f"models:/{NAME}@champion", "--mlflow-uri", mlflow_server,
                 "--out", str(tmp_path / "export")]) == 0
    mv = tracking.client(mlflow_server).get_model_version(NAME, str(champion))
    assert mv.tags["onnx"] == f"runs:/{mv.run_id}/onnx/v{champion}/model.onnx"
    local = mlflow.artifacts.download_artifacts(artifact_uri=mv.tags["onnx"], dst_path=str(tmp_path / "dl"),
                                                tracking_uri=mlflow_server)
    exported = OnnxModel(local)
    rng = np.random.default_rng(0)
    hist, cur = (torch.from_numpy(rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)) for _ in range(2))
    got = exported.probs(hist, cur)
    other = 1 if champion != 1 else 2
    for version, close in ((champion, True), (other, False)):
        model, _ = model_from_checkpoint(load_checkpoint(weights[version - 1]))
        diff = float((predict_probs(model, hist, cur, torch.device("cpu")) - got).abs().max())
        assert (diff < 1e-4) == close, (version, diff)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_champion_served_over_http_with_encoded_images(history, mlflow_server, synth_ol, tmp_path):
    """`mlflow models serve -m models:/NAME@champion` on 127.0.0.1: a real pair posted as base64 JPEG files in JSON
    gets the map, score and boxes `anodfd predict` writes for the same files; the threshold param cuts the boxes;
    a bad request gets a 400 that says what is wrong and where."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    pair = read_split(synth_ol, "test")[0]
    assert main(["predict", "--model", f"models:/{NAME}@champion", "--mlflow-uri", mlflow_server, "--hist",
                 str(pair.hist), "--cur", str(pair.cur), "--out", str(tmp_path / "predict")]) == 0
    expected_map = cv2.imread(str(tmp_path / "predict/cur_map.png"), cv2.IMREAD_GRAYSCALE)
    expected = json.loads((tmp_path / "predict/cur.json").read_text())

    port = free_port()
    # `mlflow models serve` starts uvicorn through the shell: the venv's bin must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_REGISTRY_URI": mlflow_server,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - open for the server's whole life
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the model server did not answer /ping within 180 s"
            time.sleep(1)

        hist, cur = _b64(pair.hist.read_bytes()), _b64(pair.cur.read_bytes())
        # The served decoder sees the pixels `predict` reads from the files (a smoke model's map barely changes
        # when both images' channels are swapped, so the maps below alone would not catch a BGR/RGB slip).
        from anodfd.data.cache import read_rgb
        from anodfd.serving import decode_image

        for text, path in ((hist, pair.hist), (cur, pair.cur)):
            np.testing.assert_array_equal(decode_image(text, path.name), read_rgb(path))
        status, answer = post({"dataframe_split": {"columns": ["history", "current"], "data": [[hist, cur]]}})
        assert status == 200, answer
        [row] = answer["predictions"]
        import base64

        served_map = cv2.imdecode(np.frombuffer(base64.b64decode(row["map_png"]), np.uint8), cv2.IMREAD_GRAYSCALE)
        # The same weights, decoder and tiles: the same 8-bit map (float sums may round one level apart with
        # another thread count).
        assert served_map.shape == expected_map.shape
        assert np.abs(served_map.astype(int) - expected_map).max() <= 1
        assert row["score"] == pytest.approx(expected["score"], abs=1e-5)
        assert row["anomalous_fraction"] == pytest.approx(expected["anomalous_fraction"], abs=1e-3)
        assert [b["area"] for b in row["boxes"]] == [b["area"] for b in expected["boxes"]]

        # Records orient and the threshold param: a lower threshold flags at least as much.
        status, low = post({"dataframe_records": [{"history": hist, "current": cur}], "params": {"threshold": 0.05}})
        assert status == 200 and low["predictions"][0]["anomalous_fraction"] >= row["anomalous_fraction"]

        other_size = _b64(cv2.imencode(".png", cv2.resize(cv2.imread(str(pair.cur)), (100, 90)))[1].tobytes())
        bad = {
            "missing column 'current'": {"dataframe_split": {"columns": ["history"], "data": [[hist]]}},
            "row 0, column 'current': 12 bytes that OpenCV cannot decode": {
                "dataframe_split": {"columns": ["history", "current"], "data": [[hist, _b64(b"not an image")]]}},
            "row 1: history is 128x128 but current is 100x90": {
                "dataframe_split": {"columns": ["history", "current"], "data": [[hist, cur], [hist, other_size]]}},
            "threshold 1.5 must lie strictly between 0 and 1": {
                "dataframe_records": [{"history": hist, "current": cur}], "params": {"threshold": 1.5}},
        }
        for message, body in bad.items():
            status, answer = post(body)
            assert status == 400 and message in answer["message"], (status, answer)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and its uvicorn worker, by PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_the_card_reports_both_box_rules_when_the_test_split_has_boxes():
    tags = {"test_defect_f": "0.9", "test_box_f": "0.8125", "test_box_recall": "0.75", "test_box_precision": "0.9",
            "test_box_false_alarms_per_image": "0.25", "test_strict_f": "0.125", "test_strict_recall": "0.1",
            "test_strict_precision": "0.2"}
    text = model_card("sqlite:///x.db", "anodfdnet-X", 1, tags)
    (line,) = [line for line in text.splitlines() if "dataset's boxes" in line]
    assert "overlap rule F 0.8125, recall 0.7500, precision 0.9000, 0.2500 false alarms" in line
    assert "DeepPCB's rule (IoU > 0.33, one to one) F 0.1250, recall 0.1000, precision 0.2000" in line
    assert "dataset's boxes" not in model_card("sqlite:///x.db", "anodfdnet-X", 1, {"test_defect_f": "0.9"})


def test_the_card_says_when_detections_are_confirmed_by_differencing():
    """A `--confirm diff` model serves other regions than its network alone finds, and a `--calibrate defect` one
    at a threshold chosen for defect F: its card says so."""
    import json

    def serves(data: dict, train: dict | None = None) -> str:
        tags = {"served_threshold": "0.7", "config": json.dumps({"data": data, "train": train or {}})}
        return next(ln for ln in model_card("sqlite:///x.db", "anodfdnet-X", 1, tags).splitlines() if "Serves" in ln)

    assert "`--confirm diff`" in serves({"align": "ecc", "confirm": "diff"})
    assert "confirm" not in serves({"align": "ecc", "confirm": "none"}) and "confirm" not in serves({})
    assert "(calibrated on validation defect F, `--calibrate defect`)" in serves({}, {"calibrate": "defect"})
    assert "(calibrated on validation)" in serves({}, {"calibrate": "pixel"})

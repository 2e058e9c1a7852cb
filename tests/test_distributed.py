"""Ray Train: DDP on 2 CPU workers (gloo), exact metrics, MLflow logging, worker failures and resume.

Everything real: a local Ray instance, an `mlflow server` on 127.0.0.1, tiny models trained for a few epochs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from anodfd.config import PRESETS, Config, ConfigError
from anodfd.tracking import RUN_DIR_TAG, TrackingError, client
from anodfd.train.launch import RayOptions, train_on_ray
from anodfd.train.loop import fit

pytestmark = pytest.mark.usefixtures("ray_local")


def smoke(data, **overrides) -> Config:
    return Config().with_flat({**PRESETS["smoke"], "data.data": str(data), **overrides})


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def test_two_worker_ddp_run_logs_everything_to_mlflow(synth_ol, tmp_path, mlflow_server):
    # --align: the two workers split the registration, meet at a barrier, then count failures over every pair.
    config = smoke(synth_ol, **{"train.epochs": 3, "data.align": "ecc"})
    out = train_on_ray(config, RayOptions(workers=2, storage=str(tmp_path), name="ddp", mlflow_uri=mlflow_server))

    assert out.best_metrics["workers"] == 2
    run = client(mlflow_server).get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    # The whole config as params, as the config itself would print them.
    for key, value in config.flat().items():
        if key != "data.cache_dir":  # made absolute by the launcher
            assert run.data.params[key] == str(value), key
    assert run.data.tags["anodfd.global_batch"] == str(2 * config.train.batch_size)
    for key in ("train_loss", "precision", "recall", "oa", "f1", "iou", "auc", "eer", "pairs_per_s", "param_spread",
                "threads", "defect_f", "defect_recall", "false_alarms_per_image"):
        assert [s for s, _ in history(mlflow_server, out.mlflow_run_id, key)] == [1, 2, 3], key
    # Gradients are synchronised: every rank holds the same weights after every epoch.
    assert all(v == 0.0 for _, v in history(mlflow_server, out.mlflow_run_id, "param_spread"))
    # The failure count every epoch logs is the one a single process finds over both splits.
    from anodfd.data.dataset import make_dataset
    from anodfd.evaluation import register_pairs

    one_process = register_pairs([make_dataset(config.data, split, check=False) for split in ("train", "val")],
                                 lambda line: None)
    assert [v for _, v in history(mlflow_server, out.mlflow_run_id, "align_failed")] == [one_process] * 3
    # The 2 CPUs of this local instance shared out: one torch thread per worker.
    assert [v for _, v in history(mlflow_server, out.mlflow_run_id, "threads")] == [1.0, 1.0, 1.0]

    c = client(mlflow_server)
    artifacts = {a.path for a in c.list_artifacts(out.mlflow_run_id)}
    assert {"config.json", "roc", "overlays", "checkpoints"} <= artifacts
    assert [a.path for a in c.list_artifacts(out.mlflow_run_id, "overlays")] == [
        f"overlays/overlays_epoch_{e:04d}.png" for e in (1, 2, 3)]
    best = c.download_artifacts(out.mlflow_run_id, "checkpoints/best.pt", str(tmp_path / "dl"))
    ckpt = torch.load(best, weights_only=True)
    assert Config.from_dict(ckpt["config"]).model == config.model
    # Ray keeps the best 2 by F1 plus the latest.
    assert 2 <= len(list((tmp_path / "ddp").glob("epoch_*"))) <= 3


# --- DDP evaluation equals one process -------------------------------------------------------------------


def _eval_per_worker(loop_config: dict) -> None:
    """Evaluate one fixed model on this rank's shard; counts are summed across ranks inside `evaluate`."""
    import ray.train

    from anodfd.checkpoint import load_checkpoint, model_from_checkpoint
    from anodfd.data.dataset import make_dataset
    from anodfd.evaluation import evaluate
    from anodfd.train.loop import epoch_metrics, val_shard

    ctx = ray.train.get_context()
    model, config = model_from_checkpoint(load_checkpoint(loop_config["checkpoint"]))
    val = make_dataset(config.data, "val", check=False)
    pixels, images, defects = evaluate(model, val, torch.device("cpu"), config.data.window,
                                       indices=val_shard(val, ctx.get_world_rank(), ctx.get_world_size()))
    metrics = {**epoch_metrics(pixels, images, 0.5), **defects.compute(),
               "pixels": int(pixels.pos.sum() + pixels.neg.sum())}
    with tempfile.TemporaryDirectory() as d:  # Ray Train v2 attaches metrics to a result only with a checkpoint
        first = ctx.get_world_rank() == 0
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if first else None)


def test_two_worker_metrics_equal_one_process(synth_ol, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anodfd.checkpoint import load_checkpoint, model_from_checkpoint
    from anodfd.data.dataset import make_dataset
    from anodfd.evaluation import evaluate
    from anodfd.train.loop import epoch_metrics, fit

    config = smoke(synth_ol, **{"train.epochs": 2})
    fit(config, tmp_path / "run", log=lambda s: None)
    checkpoint = tmp_path / "run" / "last.pt"
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    val = make_dataset(config.data, "val")
    pixels, images, defects = evaluate(model, val, torch.device("cpu"), config.data.window)
    single = {**epoch_metrics(pixels, images, 0.5), **defects.compute()}

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    result = TorchTrainer(
        _eval_per_worker, train_loop_config={"checkpoint": str(checkpoint)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="eval", storage_path=str(tmp_path / "ray")),
    ).fit()
    # Every native mask pixel counted once, none twice.
    assert result.metrics["pixels"] == sum(val.native_mask(i).size for i in range(len(val)))
    for key in ("precision", "recall", "oa", "f1", "iou", "auc", "eer", "calibrated_f1", "image_auroc",
                "defect_precision", "defect_recall", "defect_f", "false_alarms_per_image", "all_found"):
        assert result.metrics[key] == pytest.approx(single[key], abs=1e-12), key


# --- failures and resume ---------------------------------------------------------------------------------


def test_killed_worker_restarts_from_checkpoint(synth_ol, tmp_path, mlflow_server, capfd):
    import ray
    from ray.util.state import list_actors

    config = smoke(synth_ol, **{"train.epochs": 6})
    opts = RayOptions(workers=2, storage=str(tmp_path), name="crash", mlflow_uri=mlflow_server, max_failures=2)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=train_on_ray(config, opts)), daemon=True)
    thread.start()

    # Kill once Ray has accepted 2 epochs (MLflow logs exactly those): a checkpoint folder on disk is not enough,
    # as reports still queued in a worker die with it.
    deadline, run_id = time.time() + 300, None
    while True:
        assert time.time() < deadline and thread.is_alive(), "the run never reached epoch 2"
        experiment = client(mlflow_server).get_experiment_by_name(opts.experiment)
        if run_id is None and experiment is not None:
            runs = client(mlflow_server).search_runs(
                [experiment.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{tmp_path}/crash'")
            run_id = runs[0].info.run_id if runs else None
        if run_id and len(history(mlflow_server, run_id, "train_loss")) >= 2:
            break
        time.sleep(0.2)
    # This Ray instance by address: another one on the host (a second test run) would make the default ambiguous.
    address = ray.get_runtime_context().gcs_address
    workers = [a for a in list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000)]
    victims = [a.pid for a in workers if a.state == "ALIVE"]
    assert len(victims) == 2
    os.kill(victims[1], signal.SIGKILL)
    accepted = max(step for step, _ in history(mlflow_server, run_id, "train_loss"))  # at least this was saved
    thread.join(timeout=600)
    assert "out" in box, "the run did not survive the killed worker"

    out = box["out"]
    assert out.best_metrics and client(mlflow_server).get_run(out.mlflow_run_id).info.status == "FINISHED"
    # A new group of 2 workers replaced the old one, and it started from the last checkpoint, not from scratch.
    after = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
    assert len(after) >= len(workers) + 2
    time.sleep(2)  # the last worker lines reach the driver through Ray's log monitor
    printed = capfd.readouterr()
    restored = [int(n) for n in re.findall(r"restored from the checkpoint of epoch (\d+)", printed.out + printed.err)]
    assert len(restored) == 1 and restored[0] >= accepted, (restored, accepted)
    # Each epoch is logged exactly once: completed epochs were not trained again after the restart.
    assert [s for s, _ in history(mlflow_server, out.mlflow_run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert max(p.name for p in (tmp_path / "crash").glob("epoch_*")) == "epoch_0006"


def test_rerun_with_same_name_resumes_bit_identically(synth_ol, tmp_path, mlflow_server):
    """2 epochs, then a rerun of the same name to 3: the same MLflow run continues, and the weights and optimizer
    state equal those of 3 epochs straight (the plain loop, no Ray). A single worker on this 2-CPU instance runs 2
    torch threads."""
    from conftest import same_state

    from anodfd.checkpoint import load_checkpoint
    from anodfd.train.launch import backfill_accepted_epochs

    opts = RayOptions(workers=1, storage=str(tmp_path), name="again", mlflow_uri=mlflow_server)
    first = train_on_ray(smoke(synth_ol, **{"train.epochs": 2}), opts)
    # A driver killed between Ray committing an epoch and MLflow logging it: here an MLflow run that never heard
    # of this run's epochs. They are logged from Ray's record of what it committed, once.
    c = client(mlflow_server)
    orphan = c.create_run(c.get_run(first.mlflow_run_id).info.experiment_id).info.run_id
    assert backfill_accepted_epochs(f"{tmp_path}/again", mlflow_server, orphan) == [1, 2]
    assert [s for s, _ in history(mlflow_server, orphan, "f1")] == [1, 2]
    assert {a.path for a in c.list_artifacts(orphan)} == {"roc", "overlays"}
    assert backfill_accepted_epochs(f"{tmp_path}/again", mlflow_server, orphan) == []
    assert backfill_accepted_epochs(f"{tmp_path}/never-ran", mlflow_server, orphan) == []
    second = train_on_ray(smoke(synth_ol, **{"train.epochs": 3}), opts)
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    assert [s for s, _ in history(mlflow_server, second.mlflow_run_id, "f1")] == [1, 2, 3]
    runs = client(mlflow_server).search_runs(
        [client(mlflow_server).get_run(first.mlflow_run_id).info.experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = '{tmp_path}/again'")
    assert len(runs) == 1
    assert [v for _, v in history(mlflow_server, second.mlflow_run_id, "threads")] == [2.0, 2.0, 2.0]

    # 3 epochs straight, in this process without Ray: a one-worker Ray run computes what the plain loop does.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit(smoke(synth_ol, **{"train.epochs": 3}), tmp_path / "straight", log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint(tmp_path / "again" / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert same_state(a["model"], b["model"]) and same_state(a["optimizer"], b["optimizer"])
    assert a["best"] == b["best"]


def test_two_local_runs_on_one_machine_run_side_by_side(synth_ol, tmp_path, mlflow_server):
    """Two `anodfd train` processes at once, each with its own local Ray instance (and this test module's a third):
    both finish, each in its own MLflow run, and no Ray process mistakes another instance for its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    procs = []
    for name in ("first", "second"):
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed below; a pipe could fill and block
        cmd = [sys.executable, "-m", "anodfd", "train", "--data", str(synth_ol), "--preset", "smoke", "--epochs", "2", "--max-steps-per-epoch", "3",
               "--out", str(tmp_path / name), "--mlflow-uri", mlflow_server]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True), log))
        time.sleep(3)  # the second starts while the first is starting Ray or training
    for proc, log in procs:
        assert proc.wait(timeout=900) == 0, (tmp_path / f"{log.name}").read_text()[-3000:]
        log.close()
    outputs = [(tmp_path / f"{n}.log").read_text() for n in ("first", "second")]
    for out in outputs:
        assert "multiple active Ray instances" not in out and "Failed to query Ray Train Controller" not in out, out
    run_ids = {re.search(r"MLflow run (\w+); to browse", out).group(1) for out in outputs}
    assert len(run_ids) == 2
    for run_id in run_ids:
        run = client(mlflow_server).get_run(run_id)
        assert run.info.status == "FINISHED" and [s for s, _ in history(mlflow_server, run_id, "f1")] == [1, 2]


def test_unreachable_tracking_server_fails_before_training(synth_ol, tmp_path):
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="unreachable"):
        train_on_ray(smoke(synth_ol), RayOptions(storage=str(tmp_path / "runs"), name="x", mlflow_uri=uri))
    assert not (tmp_path / "runs").exists()


def test_fewer_validation_pairs_than_workers_is_refused_up_front(synth_ol, tmp_path):
    """2 workers, 1 validation pair: one rank would have no validation shard. Refused before Ray or MLflow."""
    data = shutil.copytree(synth_ol, tmp_path / "OL")
    first = (data / "validation.txt").read_text().splitlines()[0]
    (data / "validation.txt").write_text(first + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"has 1 pair\(s\), fewer than the 2 DDP workers; use at most 1 worker"):
        train_on_ray(smoke(data), RayOptions(workers=2, storage=str(tmp_path / "runs"), name="x", mlflow_uri=uri))
    assert not (tmp_path / "runs").exists()

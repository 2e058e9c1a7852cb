"""Ray Train: DDP on 2 CPU workers (gloo), exact metrics, MLflow logging, worker failures and resume.

Everything real: a local Ray instance, an `mlflow server` on 127.0.0.1, tiny models trained for a few epochs.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import pytest
import torch

from anodfd.config import PRESETS, Config, ConfigError
from anodfd.tracking import RUN_DIR_TAG, TrackingError, client
from anodfd.train.launch import RayOptions, train_on_ray

pytestmark = pytest.mark.usefixtures("ray_local")


def smoke(data, **overrides) -> Config:
    return Config().with_flat({**PRESETS["smoke"], "data.data": str(data), **overrides})


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def test_two_worker_ddp_run_logs_everything_to_mlflow(synth_ol, tmp_path, mlflow_server):
    config = smoke(synth_ol, **{"train.epochs": 3})
    out = train_on_ray(config, RayOptions(workers=2, storage=str(tmp_path), name="ddp", mlflow_uri=mlflow_server))

    assert out.best_metrics["workers"] == 2
    run = client(mlflow_server).get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    # The whole config as params, as the config itself would print them.
    for key, value in config.flat().items():
        if key != "data.cache_dir":  # made absolute by the launcher
            assert run.data.params[key] == str(value), key
    assert run.data.tags["anodfd.global_batch"] == str(2 * config.train.batch_size)
    for key in ("train_loss", "precision", "recall", "oa", "f1", "iou", "auc", "eer", "pairs_per_s"):
        assert [s for s, _ in history(mlflow_server, out.mlflow_run_id, key)] == [1, 2, 3], key
    # Gradients are synchronised: every rank holds the same weights after every epoch.
    assert all(v == 0.0 for _, v in history(mlflow_server, out.mlflow_run_id, "param_spread"))

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

    from anodfd.data.dataset import make_dataset
    from anodfd.train.loop import (
        epoch_metrics,
        evaluate,
        load_checkpoint,
        make_loader,
        model_from_checkpoint,
        val_shard,
    )

    ctx = ray.train.get_context()
    model, config = model_from_checkpoint(load_checkpoint(loop_config["checkpoint"]))
    shard = val_shard(make_dataset(config.data, "val", check=False), ctx.get_world_rank(), ctx.get_world_size())
    pixels, images = evaluate(model, make_loader(shard, 3, shuffle=False), torch.device("cpu"))
    metrics = {**epoch_metrics(pixels, images, 0.5), "pixels": int(pixels.pos.sum() + pixels.neg.sum())}
    with tempfile.TemporaryDirectory() as d:  # Ray Train v2 attaches metrics to a result only with a checkpoint
        first = ctx.get_world_rank() == 0
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if first else None)


def test_two_worker_metrics_equal_one_process(synth_ol, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anodfd.data.dataset import make_dataset
    from anodfd.train.loop import (
        epoch_metrics,
        evaluate,
        fit,
        load_checkpoint,
        make_loader,
        model_from_checkpoint,
    )

    config = smoke(synth_ol, **{"train.epochs": 2})
    fit(config, tmp_path / "run", log=lambda s: None)
    checkpoint = tmp_path / "run" / "last.pt"
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    val = make_dataset(config.data, "val")
    pixels, images = evaluate(model, make_loader(val, 4, shuffle=False), torch.device("cpu"))
    single = epoch_metrics(pixels, images, 0.5)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    result = TorchTrainer(
        _eval_per_worker, train_loop_config={"checkpoint": str(checkpoint)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="eval", storage_path=str(tmp_path / "ray")),
    ).fit()
    assert result.metrics["pixels"] == len(val) * config.data.image_size**2  # every pixel counted once, none twice
    for key in ("precision", "recall", "oa", "f1", "iou", "auc", "eer", "calibrated_f1", "image_auroc"):
        assert result.metrics[key] == pytest.approx(single[key], abs=1e-12), key


# --- failures and resume ---------------------------------------------------------------------------------


def test_killed_worker_restarts_from_checkpoint(synth_ol, tmp_path, mlflow_server):
    import ray
    from ray.util.state import list_actors

    config = smoke(synth_ol, **{"train.epochs": 6})
    opts = RayOptions(workers=2, storage=str(tmp_path), name="crash", mlflow_uri=mlflow_server, max_failures=2)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=train_on_ray(config, opts)), daemon=True)
    thread.start()

    deadline = time.time() + 300
    while not (tmp_path / "crash" / "epoch_0002" / "checkpoint.pt").exists():
        assert time.time() < deadline and thread.is_alive(), "the run never reached epoch 2"
        time.sleep(0.2)
    # This Ray instance by address: another one on the host (a second test run) would make the default ambiguous.
    address = ray.get_runtime_context().gcs_address
    victims = [a.pid for a in list_actors(address=address,
                                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(victims) == 2
    os.kill(victims[1], signal.SIGKILL)
    thread.join(timeout=600)
    assert "out" in box, "the run did not survive the killed worker"

    out = box["out"]
    assert out.best_metrics and client(mlflow_server).get_run(out.mlflow_run_id).info.status == "FINISHED"
    alive = {a.pid for a in list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")])
             if a.state == "ALIVE"}
    assert victims[1] not in alive
    # Each epoch is logged exactly once: completed epochs were not trained again after the restart.
    assert [s for s, _ in history(mlflow_server, out.mlflow_run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert max(p.name for p in (tmp_path / "crash").glob("epoch_*")) == "epoch_0006"


def test_rerun_with_same_name_resumes(synth_ol, tmp_path, mlflow_server):
    opts = RayOptions(workers=1, storage=str(tmp_path), name="again", mlflow_uri=mlflow_server)
    first = train_on_ray(smoke(synth_ol, **{"train.epochs": 2}), opts)
    second = train_on_ray(smoke(synth_ol, **{"train.epochs": 3}), opts)
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    assert [s for s, _ in history(mlflow_server, second.mlflow_run_id, "f1")] == [1, 2, 3]
    runs = client(mlflow_server).search_runs(
        [client(mlflow_server).get_run(first.mlflow_run_id).info.experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = '{tmp_path}/again'")
    assert len(runs) == 1


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

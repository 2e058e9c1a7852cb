"""Launch a Ray Train run (`TorchTrainer`) from a config: checks first, then Ray, then MLflow bookkeeping.

Everything that can be wrong with the input (data, tracking server, storage, resources) is reported before
Ray starts a single worker.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ray.train import UserCallback  # Ray

from anodfd import tracking
from anodfd.checkpoint import load_checkpoint, read_checkpoint
from anodfd.config import Config, ConfigError
from anodfd.data.cache import default_cache_dir
from anodfd.data.dataset import make_dataset
from anodfd.ray_connect import init_ray, threads_for
from anodfd.train.loop import check_resumable, selection_key
from anodfd.train.worker import CHECKPOINT_FILE, train_func_per_worker


@dataclass
class RayOptions:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: a local run shares the machine's cores; 1 on a cluster
    address: str | None = None  # None: $RAY_ADDRESS, else a local Ray instance
    storage: str = "runs"  # local folder (made absolute) or a URI such as s3://bucket/path
    name: str | None = None
    max_failures: int = 2
    keep: int = 2  # best checkpoints kept by validation `metric`, besides the latest
    metric: str = "f1"  # the validation metric that ranks checkpoints (a search's --metric)
    mlflow_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT

    def __post_init__(self) -> None:
        check_resources(self.workers, self.cpus_per_worker, self.gpus_per_worker)
        if not (isinstance(self.keep, int) and self.keep >= 1):
            raise ConfigError(f"--keep {self.keep!r}: keep at least 1 checkpoint")
        if not (isinstance(self.max_failures, int) and self.max_failures >= -1):
            raise ConfigError(f"--max-failures {self.max_failures!r}: must be 0 or more (-1: retry forever)")


def check_resources(workers: int, cpus_per_worker: float | None, gpus_per_worker: float | None,
                    workers_flag: str = "--workers") -> None:
    """Workers, CPUs and GPUs per worker, checked before Ray, MLflow or storage are touched."""
    if not (isinstance(workers, int) and workers >= 1):
        raise ConfigError(f"{workers_flag} {workers!r}: need at least 1 worker")
    if cpus_per_worker is not None and not (cpus_per_worker > 0 and math.isfinite(cpus_per_worker)):
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker!r}: must be above 0 (fractions such as 0.5 work)")
    if gpus_per_worker is not None and not (gpus_per_worker >= 0 and math.isfinite(gpus_per_worker)):
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker!r}: must be 0 (CPU) or more")


class MlflowCallback(UserCallback):
    """Runs in Ray Train's controller: logs each epoch Ray has accepted to the MLflow run.

    Logging here rather than in the worker means MLflow holds exactly the epochs Ray holds: a worker that
    dies after logging but before Ray registered its report would otherwise have its epoch logged twice.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = metrics[0]  # rank 0's; every rank reports the same global metrics
        epoch = int(m["epoch"])
        tracking.log_metrics(self.uri, self.run_id, {k: v for k, v in m.items() if k != "epoch"}, step=epoch)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                for png in sorted(Path(d).glob("*.png")):
                    tracking.log_file(self.uri, self.run_id, png, png.name.split("_epoch_")[0])


@dataclass
class TrainOutcome:
    run_dir: str
    best_checkpoint: Path | None  # a local copy of the best checkpoint file
    best_metrics: dict
    mlflow_run_id: str
    mlflow_uri: str
    result: object  # ray.train.Result


def prepare(config: Config, opts: RayOptions) -> tuple[Config, str, str]:
    """Validate everything cheap to validate; returns (config with absolute paths, storage, run name)."""
    if not config.data.cache_dir:  # workers run in another directory: give them an absolute cache
        config.data.cache_dir = str(default_cache_dir().resolve())
    train = make_dataset(config.data, "train")  # lists, files and image headers: DatasetError names the problem
    val = make_dataset(config.data, "val")
    share = len(train) // opts.workers  # the train pairs of one DDP worker
    if config.train.batch_size > share:
        raise ConfigError(f"--batch-size {config.train.batch_size} (train.batch_size): each of the {opts.workers} "
                          f"worker(s) gets {share} of the {len(train)} train pairs of {config.data.data}; "
                          + (f"pass --batch-size {share} or less" if share else "use fewer workers"))
    if len(val) < opts.workers:
        # Each DDP worker scores its own share of validation; one with none would meet its peers at another
        # collective and hang them.
        raise ConfigError(f"the validation split of {config.data.data} has {len(val)} pair(s), fewer than the "
                          f"{opts.workers} DDP workers; use at most {len(val)} worker(s) or list more validation pairs")
    name = opts.name or "{}-{}-d{}-{}".format(
        Path(config.data.data).name, config.model.name, config.model.depth, time.strftime("%Y%m%d-%H%M%S"))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or set(name) == {"."}:  # "." and ".." would be the storage itself
        raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only, not dots alone")
    remote = "://" in opts.storage
    storage = opts.storage if remote else str(Path(opts.storage).expanduser().resolve())
    if not remote:
        try:
            Path(storage).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"storage folder {storage} cannot be made ({e.strerror}); pass --storage DIR "
                              "you can write to") from None
        if not os.access(storage, os.W_OK):
            raise ConfigError(f"storage folder {storage} is not writable; pass --storage DIR you can write to")
    if not remote:
        latest = latest_checkpoint(Path(storage) / name)
        if latest is not None:  # resuming: the model must be the one trained so far
            check_resumable(load_checkpoint(latest), config, latest)
    return config, storage, name


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob(f"epoch_*/{CHECKPOINT_FILE}"))
    return found[-1] if found else None


def fetch_checkpoints(run_dir: str, scratch: Path) -> Path:
    """A local folder holding the run's kept checkpoints: ``run_dir`` itself, or for a storage URI
    (s3://, gs://) a copy of its ``epoch_*/checkpoint.pt`` files in ``scratch``."""
    if "://" not in run_dir:
        return Path(run_dir)
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(run_dir)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)):
        relative = info.path[len(root):].lstrip("/")
        if info.type == pyarrow.fs.FileType.File and re.fullmatch(rf"epoch_\d+/{CHECKPOINT_FILE}", relative):
            (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(info.path, str(scratch / relative), source_filesystem=fs)
    return scratch


def best_checkpoint_file(run_dir: Path, metric: str = "f1") -> Path | None:
    """The kept checkpoint of a local run folder that `selection_key` ranks first by ``metric`` (works for runs
    ASHA killed)."""
    found = sorted(run_dir.glob(f"epoch_*/{CHECKPOINT_FILE}"))
    return max(found, key=lambda p: selection_key(read_checkpoint(p)["metrics"], metric), default=None)


def size_workers(opts: RayOptions, joined: bool) -> None:
    """Give each worker its CPUs: the machine's cores shared out on a local instance, 1 on a cluster (unless
    ``--cpus-per-worker``); then check that a local instance can hold the run at all."""
    import ray

    res = ray.cluster_resources()
    if opts.cpus_per_worker is None:
        opts.cpus_per_worker = 1.0 if joined else res.get("CPU", 1) / opts.workers
    need_cpus, need_gpus = opts.workers * opts.cpus_per_worker, opts.workers * opts.gpus_per_worker
    if not joined and (res.get("CPU", 0) < need_cpus - 1e-9 or res.get("GPU", 0) < need_gpus - 1e-9):
        # On a fixed local machine this would wait forever for resources that never come.
        raise ConfigError(
            f"this run needs {need_cpus:g} CPUs and {need_gpus:g} GPUs but the local Ray instance has "
            f"{res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs; lower --workers, --cpus-per-worker "
            "or --gpus-per-worker"
        )


def train_on_ray(
    config: Config, opts: RayOptions, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
) -> TrainOutcome:
    """`anodfd train`: check everything, start or join Ray, open (or reopen) the MLflow run, train."""
    uri = tracking.resolve_tracking_uri(opts.mlflow_uri)
    tracking.check_tracking(uri)
    config, storage, name = prepare(config, opts)
    size_workers(opts, init_ray(opts.address))
    run_id, resumed = start_tracked_run(uri, config, opts, storage, name, tags, parent_run_id)
    print(f"{'resuming' if resumed else 'starting'} run {name} in {storage} ({opts.workers} worker(s) of "
          f"{opts.cpus_per_worker:g} CPU and {threads_for(opts.cpus_per_worker)} thread(s), "
          f"global batch {config.train.batch_size * opts.workers}); MLflow run {run_id}")
    return run_trainer(config, opts, storage, name, uri, run_id)


def start_tracked_run(
    uri: str, config: Config, opts: RayOptions, storage: str, name: str, tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    return tracking.start_run(uri, config, f"{storage.rstrip('/')}/{name}", name, opts.experiment, tags={
        "anodfd.workers": str(opts.workers),
        # DDP averages gradients over workers: the effective batch grows, the learning rate is not scaled.
        "anodfd.global_batch": str(config.train.batch_size * opts.workers),
        **(tags or {}),
    }, parent_run_id=parent_run_id)


def run_trainer(
    config: Config, opts: RayOptions, storage: str, name: str, uri: str, run_id: str, callbacks: list = (),
) -> TrainOutcome:
    """One TorchTrainer run (also one Tune trial), logged to MLflow run ``run_id`` as Ray accepts each epoch."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig  # Ray
    from ray.train.torch import TorchTrainer  # Ray

    resources = {"CPU": opts.cpus_per_worker}
    if opts.gpus_per_worker:
        resources["GPU"] = opts.gpus_per_worker
    trainer = TorchTrainer(  # Ray
        train_func_per_worker,
        train_loop_config={"config": config.to_dict(), "threads": threads_for(opts.cpus_per_worker),
                           "gpus": opts.gpus_per_worker},
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=opts.max_failures),
            # Kept by the metric the search ranks trials by: the epoch that won is never the one deleted.
            checkpoint_config=CheckpointConfig(num_to_keep=opts.keep, checkpoint_score_attribute=opts.metric,
                                               checkpoint_score_order="max"),
            callbacks=[MlflowCallback(uri, run_id), *callbacks],
            logging_config=LoggingConfig(log_level="WARNING"),  # one line per epoch, not per report
            # Ray Train routes print() through its logger as well as stdout: without this each line shows twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    backfill_accepted_epochs(f"{storage.rstrip('/')}/{name}", uri, run_id)
    try:
        result = trainer.fit()  # Ray
    except KeyboardInterrupt:
        tracking.end_run(uri, run_id, "KILLED")  # rerun the same command to resume
        raise
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    best_path, best_metrics = export_best(result, Path(storage) / name if "://" not in storage else None, opts.metric)
    if best_path is not None:
        tracking.log_file(uri, run_id, best_path, "checkpoints")
        tracking.log_metrics(uri, run_id, {f"best_{k}": v for k, v in best_metrics.items()
                                           if k in ("f1", "iou", "auc", "eer", "precision", "recall", "oa")},
                             step=int(best_metrics.get("epoch", 0)))
    tracking.end_run(uri, run_id)
    return TrainOutcome(f"{storage.rstrip('/')}/{name}", best_path, best_metrics, run_id, uri, result)


def backfill_accepted_epochs(run_dir: str, uri: str, run_id: str) -> list[int]:
    """Log to MLflow the epochs Ray committed but MLflow never heard of; returns them.

    `MlflowCallback` logs an epoch right after Ray commits its checkpoint. A driver killed between the two (the
    whole local instance dies with it) leaves a committed epoch unlogged, and the resumed run starts after it.
    Ray's own record of its committed checkpoints (`Result.from_path`) holds their metrics, and each checkpoint
    folder holds its pictures: enough to log that epoch now, once.
    """
    from ray.train import Result  # Ray

    try:
        committed = Result.from_path(run_dir).best_checkpoints or []  # Ray: [] or an error on a fresh run
    except Exception:  # noqa: BLE001 - no run there yet, or nothing committed: nothing to backfill
        return []
    logged = {m.step for m in tracking.client(uri).get_metric_history(run_id, "train_loss")}
    backfilled = []
    for checkpoint, metrics in committed:
        epoch = int(metrics.get("epoch", 0))
        if not epoch or epoch in logged:
            continue
        tracking.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        with checkpoint.as_directory() as d:
            for png in sorted(Path(d).glob("*.png")):
                tracking.log_file(uri, run_id, png, png.name.split("_epoch_")[0])
        backfilled.append(epoch)
    if backfilled:
        print(f"MLflow run {run_id}: logged epoch(s) {backfilled}, which Ray had committed before an interruption")
    return backfilled


def export_best(result, run_dir: Path | None, metric: str = "f1") -> tuple[Path | None, dict]:
    """Copy the best kept checkpoint (and the latest) to ``best.pt`` / ``last.pt`` in the run folder."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m]
    if not candidates:
        return None, {}
    checkpoint, metrics = max(candidates, key=lambda cm: selection_key(cm[1], metric))
    if run_dir is None:
        return None, metrics
    with checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, run_dir / "best.pt")
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            shutil.copyfile(Path(d) / CHECKPOINT_FILE, run_dir / "last.pt")
    return run_dir / "best.pt", metrics

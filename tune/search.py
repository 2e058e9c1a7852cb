"""The main job: a Ray Tune + Optuna search over AnoDFDNet; each trial is a Ray Train run; the best is promoted.

    python tune/search.py --dataset OL                          # the paper's setting (GPU workers if the cluster has GPUs)
    python tune/search.py --data data/OL --preset smoke         # minutes on a 2-core laptop
    python tune/search.py --dataset OL --name my-search --resume  # continue after Ctrl-C or a killed driver

Flow: check the data and the tracking server -> start or join Ray -> Tuner (OptunaSearch TPE + ASHA) whose
trials each launch a TorchTrainer -> summary -> evaluate the best checkpoint on the test split -> register it
in the MLflow Model Registry (alias `challenger`; `champion` only if it beats the current one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from anodfd import tracking
from anodfd.cli import add_calibrate_flag, add_data_flags, add_group_flags, add_view_flags
from anodfd.config import MAX_EPOCHS, MODEL_NAMES, PRESETS, Config, ConfigError, with_window
from anodfd.data.cache import read_mask
from anodfd.data.dataset import make_dataset
from anodfd.data.layouts import DatasetError, held_out_groups, load_split, resolve_data_dir
from anodfd.preflight import check_cluster
from anodfd.ray_connect import init_ray
from anodfd.registry import RegistryError
from anodfd.train.launch import (
    RayOptions,
    best_checkpoint_file,
    check_resources,
    fetch_checkpoints,
    prepare,
    run_trainer,
    start_tracked_run,
)
from tune.space import BENCHMARK_RECIPE, PAPER, PAPER_RECIPE, SMOKE, Space

# ASHA's grace period: ranks after 1-3 epochs did not predict the final ones, from epoch 4 they did (Spearman 0.90;
# docs/results/asha-rank.md, measured on the smoke preset; the paper preset takes the same, unmeasured).
GRACE_PERIOD = 4
SEARCH_PRESETS = {
    # The paper's network at the paper's size and native crops; 20 trials of up to 100 epochs. The first two are
    # the recipe the held-out-board benchmark measured best, then the paper's own configuration.
    "paper": {"config": PRESETS["paper"], "num_samples": 20, "max_epochs": 100, "metric": "f1", "space": PAPER,
              "first": [BENCHMARK_RECIPE, PAPER_RECIPE], "grace_period": GRACE_PERIOD},
    # A tiny network at small views: a few short trials, minutes on a laptop; the first is the preset's own
    # settings. Early in training every pixel can sit below 0.5, so it ranks by F1 at the calibrated threshold,
    # which is chosen for defect F: the champion is judged by the defects it finds at it (docs/results/demo.md:
    # 80% of the test defects in 3 of 3 search seeds, against 2 of 3 at the pixel-F1 threshold).
    "smoke": {"config": {**PRESETS["smoke"], "train.calibrate": "defect"}, "num_samples": 4, "max_epochs": 15,
              "metric": "calibrated_f1",
              "space": SMOKE, "first": [Config().with_flat(PRESETS["smoke"]).flat()], "grace_period": GRACE_PERIOD},
}
# Every dimension any preset searches, in the summary table's order.
SEARCHED = list(dict.fromkeys([*PAPER.distributions(), *SMOKE.distributions()]))
# Flags of `anodfd train` that set a dimension the space searches: given, they fix it.
SPACE_FLAGS = ("resize", "scale", "crop", "crop_pos_fraction", "align", "confirm")
METRICS = ("f1", "calibrated_f1", "iou", "auc", "defect_f", "calibrated_defect_f")
SEARCH_MARKER = "anodfd_search.json"  # in each search folder: its dataset, so --resume can find the latest
TRIAL_DRIVER_CPU = 0.1  # the Tune function that launches a trial's TorchTrainer only waits
MAX_SAMPLES = 10_000  # trials of one search (and trials at once): more is a slipped digit
BUDGET_UNITS = {"s": 1, "m": 60, "h": 3600, "gpuh": 3600}  # gpuh: seconds of one GPU, divided among those in use


def parse_budget(text: str) -> tuple[float, bool]:
    """``--budget`` -> (seconds, whether they are GPU-seconds); a bare number is seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|gpuh)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--budget {text}: give a positive time such as 90s, 45m, 2h, or GPU-hours such as 8gpuh")
    unit = match.group(2) or "s"
    return float(match.group(1)) * BUDGET_UNITS[unit], unit == "gpuh"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # No abbreviations: a flag the search does not know must fail, not be taken as one that it does.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_data_flags(p, layout=False)
    p.add_argument("--preset", choices=sorted(SEARCH_PRESETS), default="paper")
    p.add_argument("--model", choices=MODEL_NAMES, default=None,
                   help="network to search (default: the preset's); baselines ignore the depth dimension")
    add_view_flags(p)
    add_group_flags(p)
    p.add_argument("--num-samples", type=int, default=None, help="trials (default: the preset's)")
    p.add_argument("--budget", default=None, metavar="TIME",
                   help="stop starting and running trials after this long: wall-clock (90s, 45m, 2h) or GPU-hours "
                        "(8gpuh: spread over the GPUs the trials use at once); the best trial so far is registered")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of a trial ASHA lets finish")
    p.add_argument("--grace-period", type=int, default=None, metavar="EPOCHS",
                   help="epochs every trial trains before ASHA may stop it (default: the preset's; --max-epochs: no "
                        "early stopping); benchmarks/asha_rank.py measures what it should be")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers of each trial")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 with preset paper on a GPU cluster, else 0")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default: 0.9 on CPU workers, 4 with GPUs")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: as many trials as the cluster fits")
    p.add_argument("--storage", default=os.environ.get("ANODFD_STORAGE", "runs"),
                   help="folder or URI (s3://...) shared by all nodes (default $ANODFD_STORAGE, else ./runs)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", default="anodfd-search")
    p.add_argument("--name", default=None, help="search name; rerunning with it resumes")
    p.add_argument("--resume", action="store_true", help="continue the search --name (the latest one if no --name)")
    p.add_argument("--seed", type=int, default=0)
    add_calibrate_flag(p)
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="validation metric to maximise (default: the preset's); defect_f is defect-level F at the "
                        "fixed threshold: a defect found when a detection overlaps it; calibrated_defect_f, at the "
                        "served threshold, needs --calibrate defect")
    p.add_argument("--address", default=None, help="Ray cluster (default $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--check", action="store_true",
                   help="on a cluster: check every node (versions, code, GPUs and driver, storage, data, MLflow), "
                        "print one row per node and exit without starting a trial")
    p.add_argument("--allow-version-mismatch", action="store_true",
                   help="on a cluster: run even where a node's torch, torchvision, timm, numpy, OpenCV, "
                        "albumentations, MLflow or Ray differs from the driver's (each difference is printed)")
    return p.parse_args(argv)


# --- one trial ---------------------------------------------------------------------------------------------


def run_trial(params: dict, base: dict, opts: RayOptions, train_storage: str, uri: str, parent_run_id: str) -> None:
    """Tune's function trainable: one TorchTrainer run with the sampled parameters, reported back to Tune."""
    from ray import tune  # Ray
    from ray.tune.integration.ray_train import TuneReportCallback  # Ray

    config = with_window(Config.from_dict(base), params)  # the position grid follows the sampled view
    ctx = tune.get_context()  # Ray
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    run_id, _ = start_tracked_run(uri, config, opts, train_storage, trial_id,
                                  tags={"anodfd.trial": trial_name, "anodfd.trial_id": trial_id},
                                  parent_run_id=parent_run_id)
    run_trainer(config, opts, train_storage, trial_id, uri, run_id, callbacks=[TuneReportCallback()])


# --- the search --------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    value: float  # best validation metric over the trial's epochs
    epochs: int
    stopped_early: bool
    status: str
    extra: dict = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return search(args)
    except (DatasetError, ConfigError) as e:
        print(f"search: error: {e}", file=sys.stderr)
        return 2


def search(args: argparse.Namespace) -> int:
    import ray  # Ray
    from optuna.samplers import TPESampler
    from ray import tune  # Ray
    from ray.tune.schedulers import ASHAScheduler  # Ray
    from ray.tune.search.optuna import OptunaSearch  # Ray

    # Bad numbers fail here, in one line, before Ray, MLflow or the storage are touched.
    check_resources(args.workers_per_trial, args.cpus_per_worker, args.gpus_per_worker, "--workers-per-trial")
    for flag, value, most in (("--num-samples", args.num_samples, MAX_SAMPLES), ("--max-epochs", args.max_epochs,
                              MAX_EPOCHS), ("--max-concurrent", args.max_concurrent, MAX_SAMPLES)):
        if value is not None and not 1 <= value <= most:
            raise ConfigError(f"{flag} {value}: must be 1 or more (at most {most})")
    budget, gpu_budget = parse_budget(args.budget) if args.budget is not None else (None, False)
    preset = SEARCH_PRESETS[args.preset]
    metric = args.metric or preset["metric"]
    num_samples = args.num_samples or preset["num_samples"]
    max_epochs = args.max_epochs or preset["max_epochs"]
    if args.grace_period is not None and not 1 <= args.grace_period <= max_epochs:
        raise ConfigError(f"--grace-period {args.grace_period}: must be 1 or more and at most the {max_epochs} epochs "
                          "of --max-epochs (which turns early stopping off)")
    grace = args.grace_period or min(preset["grace_period"], max_epochs)
    space = search_space(args)
    first_points = [space.point(r) for r in preset["first"]]
    data_dir = resolve_data_dir(dataset=args.dataset, data=args.data, data_root=args.data_root)
    dataset = data_dir.name  # the folder's name: `--dataset ol` registers into anodfdnet-OL
    view = {f"data.{k}": getattr(args, k) for k in (*SPACE_FLAGS, "relight", "group_regex", "val_groups")
            if getattr(args, k) is not None}
    base = with_window(Config().with_flat(preset["config"]), {
        "data.data": str(data_dir), "train.epochs": max_epochs, "train.seed": args.seed, **view,
        **({"model.name": args.model} if args.model else {}),
        **({"train.calibrate": args.calibrate} if args.calibrate else {})})

    base = rank_on_held_out_groups(base)
    # Everything checkable is checked before Ray starts: data (all splits, promotion needs test), tracking.
    uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    tracking.check_tracking(uri)
    load_split(data_dir, "test", base.data.layout)
    if metric == "auc":
        check_auc_can_rank(base)
    if metric == "calibrated_defect_f" and base.train.calibrate != "defect":
        raise ConfigError("--metric calibrated_defect_f is measured at the threshold --calibrate defect chooses: add "
                          "--calibrate defect, or rank by another --metric")
    if args.check:
        return check_only(args, str(data_dir), uri)
    name = args.name
    if name is None:
        name = latest_search(args.storage, dataset) if args.resume else f"search-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = RayOptions(workers=args.workers_per_trial, storage=args.storage, name=name, mlflow_uri=uri,
                      experiment=args.experiment, keep=2, metric=metric)
    base, storage, name = prepare(base, opts)
    search_dir = f"{storage.rstrip('/')}/{name}"
    if "://" not in search_dir and not (Path(search_dir) / SEARCH_MARKER).is_file():
        Path(search_dir).mkdir(parents=True, exist_ok=True)
        (Path(search_dir) / SEARCH_MARKER).write_text(json.dumps({"dataset": dataset, "data": str(data_dir),
                                                                  "started": time.time()}))

    joined = init_ray(args.address)
    res = ray.cluster_resources()
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if args.preset == "paper" and res.get("GPU", 0) >= 1 else 0.0
    if joined:
        nodes = check_cluster(storage, str(data_dir), uri, gpus_per_worker=gpus,
                              allow_version_mismatch=args.allow_version_mismatch)
        print(f"cluster: {len(nodes)} node(s) can write {storage}, read the data and reach MLflow")
    opts.gpus_per_worker = gpus
    opts.cpus_per_worker = args.cpus_per_worker or (4.0 if gpus else 0.9)
    trial_cpus = TRIAL_DRIVER_CPU + opts.workers * opts.cpus_per_worker
    fits = math.floor(res.get("CPU", 0) / trial_cpus + 1e-9)
    if gpus:
        fits = min(fits, math.floor(res.get("GPU", 0) / (opts.workers * gpus) + 1e-9))
    # On a cluster the autoscaler may add nodes for pending trials: --max-concurrent lets the search grow.
    concurrency = args.max_concurrent or max(fits, 1 if joined else 0)
    if fits < 1 and not joined:
        raise ConfigError(f"one trial needs {trial_cpus:g} CPUs and {opts.workers * gpus:g} GPUs; this Ray instance "
                          f"has {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs: lower --workers-per-trial")
    if not joined and args.cpus_per_worker is None and not gpus:
        # As `anodfd train` does locally: the trials running at once share the machine's cores, and each worker
        # runs as many threads as it has CPUs (`threads_for`), so --max-concurrent 1 on 2 cores trains on both.
        running = min(concurrency, fits)
        opts.cpus_per_worker = (res.get("CPU", 0) - TRIAL_DRIVER_CPU * running) / (running * opts.workers)

    if gpu_budget:
        in_use = min(concurrency, max(fits, 1)) * opts.workers * gpus  # GPUs busy while the trials run
        if not in_use:
            raise ConfigError(f"--budget {args.budget} is in GPU-hours, but the trials use no GPU: give it as time "
                              "(for example 2h), or run on GPU workers")
        budget /= in_use
    parent_run_id, resumed = tracking.start_run(uri, base, search_dir, name, args.experiment,
                                                tags={"anodfd.kind": "search", "anodfd.dataset": dataset})
    if (resumed or args.resume) and budget:
        print(f"--budget {args.budget} not applied: a resumed search keeps what is left of the budget it started with")
        budget = None
    if not resumed:
        tracking.log_params(uri, parent_run_id, {"search.metric": metric, "search.num_samples": num_samples,
                                                 "search.max_epochs": max_epochs, "search.preset": args.preset,
                                                 "search.workers_per_trial": opts.workers,
                                                 "search.gpus_per_worker": gpus, "search.seed": args.seed,
                                                 "search.grace_period": grace,
                                                 **({"search.budget_s": budget} if budget else {})})
        tracking.log_json(uri, parent_run_id, {"searched": {k: repr(v) for k, v in space.distributions().items()},
                                               "fixed_by_flags": sorted(space.fixed),
                                               "conditional": "data.scale, data.crop and data.crop_pos_fraction only "
                                                              "with data.resize 0 (native crops)",
                                               "first": first_points},
                          "search_space.json")
    print(f"{'resuming' if resumed else 'starting'} search {name}: {num_samples} trials of up to {max_epochs} epochs, "
          f"{concurrency} at a time, {opts.workers} worker(s) per trial ({gpus:g} GPU each), maximising {metric}"
          + (f", within {budget:.0f} s of trials" if budget else ""))

    trainable = tune.with_resources(  # Ray
        tune.with_parameters(run_trial, base=base.to_dict(), opts=opts, train_storage=f"{search_dir}/train_runs",
                             uri=uri, parent_run_id=parent_run_id),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    if args.resume or resumed:
        if not tune.Tuner.can_restore(search_dir):
            raise ConfigError(f"nothing to resume at {search_dir}; drop --resume or pass the --name of a search")
        tuner = tune.Tuner.restore(search_dir, trainable, resume_unfinished=True, resume_errored=True)  # Ray
    else:
        searcher = OptunaSearch(space.suggest, metric=metric, mode="max",  # define-by-run: a conditional space
                                points_to_evaluate=first_points,
                                sampler=TPESampler(seed=args.seed))
        scheduler = ASHAScheduler(metric=metric, mode="max", time_attr="training_iteration", max_t=max_epochs,
                                  grace_period=grace, reduction_factor=2, stop_last_trials=False)
        tuner = tune.Tuner(  # Ray
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=concurrency, time_budget_s=budget),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
        )
    started = time.monotonic()
    results = tuner.fit()  # Ray

    rows = summarise(results, metric, max_epochs)
    out_of_time = bool(budget) and time.monotonic() - started >= budget
    if out_of_time:
        print(f"\nbudget of {budget:.0f} s reached: {sum(r.epochs > 0 for r in rows)} of {num_samples} trials "
              "trained an epoch or more; the best of them is ranked and registered")
    mark_trial_runs(uri, args.experiment, search_dir, rows)
    table = format_table(rows, metric)
    print("\n" + table)
    step_s, trial_s = (sum(r.extra.get(k, 0.0) for r in rows) for k in ("step_s", "trial_s"))
    if trial_s > 0:
        print(f"\ntime in train and validation steps: {step_s:.0f} s of the trials' {trial_s:.0f} s "
              f"({step_s / trial_s:.0%}); the rest is starting worker groups, checkpoints and logging")
        tracking.log_metrics(uri, parent_run_id, {"step_seconds": step_s, "trial_seconds": trial_s,
                                                  "step_share": step_s / trial_s}, step=0)
    if not any(r.status == "TERMINATED" for r in rows):
        tracking.end_run(uri, parent_run_id, "FAILED")
        raise ConfigError(f"no trial finished; see the trial errors under {search_dir}")
    finite = [r for r in rows if math.isfinite(r.value)]
    if not finite and out_of_time and not any(r.epochs for r in rows):
        tracking.end_run(uri, parent_run_id, "FAILED")
        raise ConfigError(f"the budget of {budget:.0f} s ended before any trial finished an epoch; give a longer "
                          f"--budget (this one was {args.budget})")
    if not finite:
        tracking.end_run(uri, parent_run_id, "FAILED")
        raise ConfigError(f"every finished trial has validation {metric} NaN, so none can be ranked (AUC needs both "
                          "anomalous and normal pixels in the validation split); search with another --metric, or "
                          "check the validation masks with anodfd data check")
    best = max(finite, key=lambda r: r.value)
    log_parent(uri, parent_run_id, rows, best, metric, table, space)
    print(f"\nbest trial {best.trial_id}: {metric} {best.value:.4f} with "
          + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))

    try:
        promote(uri, parent_run_id, dataset, data_dir, f"{search_dir}/train_runs/{best.trial_id}", best, metric,
                args.experiment)
    except RegistryError as e:
        tracking.end_run(uri, parent_run_id, "FAILED")
        raise RegistryError(f"{e}\nthe search's trials and checkpoints stay in {search_dir}; register its best "
                            f"trial again with: python tune/search.py --data {data_dir} --name {name} --resume") from None
    print(f"\nsearch folder: {search_dir}\nMLflow: {tracking.ui_command(uri)}")
    tracking.end_run(uri, parent_run_id)
    return 0


def latest_search(storage: str, dataset: str) -> str:
    """The name of the latest search of ``dataset`` in a local ``storage`` (what `--resume` without `--name`
    continues): folders carrying a search marker, or named as searches name themselves."""
    if "://" in storage:
        raise ConfigError(f"--resume without --name looks for searches in a local folder, not {storage}; pass --name")
    root = Path(storage).expanduser().resolve()
    found = []
    for folder in root.glob("*/") if root.is_dir() else []:
        marker = folder / SEARCH_MARKER
        if marker.is_file():
            info = json.loads(marker.read_text())
            if str(info.get("dataset", "")).lower() == dataset.lower():
                found.append((float(info["started"]), folder.name))
        elif folder.name.lower().startswith(f"search-{dataset.lower()}-"):  # written before markers existed
            found.append((folder.stat().st_mtime, folder.name))
    if not found:
        raise ConfigError(f"--resume: no search of {dataset} in {root} to continue; drop --resume to start one, "
                          "or pass --name and --storage of the search")
    _, name = max(found)
    print(f"--resume: continuing {name}, the latest search of {dataset} in {root}")
    return name


def rank_on_held_out_groups(config: Config) -> Config:
    """With --group-regex, trials are ranked on groups they never trained on: a validation list that shares every
    group with train is replaced by whole groups cut from both lists (said in one line), unless --val-groups names
    them."""
    d = config.data
    if d.val_groups or not d.group_regex:
        return config
    groups = held_out_groups(Path(d.data), d.layout, d.val_fraction, d.group_regex)
    if groups is None:
        return config
    print(f"validation shares every group with train: the search ranks trials on group(s) {groups} held out of "
          "training instead (--val-groups chooses others)")
    return config.with_flat({"data.val_groups": groups})


def check_auc_can_rank(config: Config) -> None:
    """AUC needs anomalous pixels in validation: without one, every trial would train to a NaN score that nothing
    can rank, so this is said before Ray starts. (A defect lost to the training view's resize still gives NaN; the
    search reports that after the trials.)"""
    val = make_dataset(config.data, "val")
    if not any(read_mask(p.mask).any() for p in val.pairs):
        raise ConfigError(f"the validation split of {config.data.data} has no anomalous pixel in its {len(val)} "
                          "mask(s), so every trial's validation auc would be NaN and none could be ranked; search with "
                          "another --metric, or list anomalous pairs for validation (anodfd data check shows the split)")


def check_only(args: argparse.Namespace, data_dir: str, uri: str) -> int:
    """`--check`: the cluster preflight alone, with every GPU node checked; nothing is trained or written."""
    if not init_ray(args.address):
        raise ConfigError("--check probes the nodes of a cluster: run it as a job (cluster/submit.py --check) "
                          "or pass --address")
    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    nodes = check_cluster(storage, data_dir, uri, gpus_per_worker=args.gpus_per_worker or 0, all_gpus=True,
                          allow_version_mismatch=args.allow_version_mismatch)
    print(f"check passed: {len(nodes)} node(s) can run trials")
    return 0


def summarise(results, metric: str, max_epochs: int) -> list[TrialRow]:
    rows = []
    for r in results:
        df = r.metrics_dataframe
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        value = float(df[metric].max()) if df is not None and metric in df else float("nan")
        status = "ERROR" if r.error else "TERMINATED"
        # A trial the budget stopped before its first report has neither config nor metrics.
        config, reported = r.config or {}, r.metrics or {}
        params = {k: config[k] for k in SEARCHED if k in config}
        # Seconds inside train and validation steps, against the trial's time from its start to its last report.
        timing = {"step_s": sum(float(df[k].sum()) for k in ("train_s", "val_s") if k in df),
                  "trial_s": float(df["time_total_s"].max())} if df is not None and "time_total_s" in df else {}
        rows.append(TrialRow(reported.get("trial_id") or trial_id_of(Path(r.path).name), params, value, epochs,
                             stopped_early=status == "TERMINATED" and epochs < max_epochs, status=status,
                             extra=timing))
    return sorted(rows, key=lambda r: -r.value if math.isfinite(r.value) else math.inf)


def trial_id_of(trial_dir: str) -> str:
    """The trial id in a Tune trial folder's name, ``run_trial_<id>_<index>_<params>_<date>``."""
    found = re.match(r"run_trial_([0-9a-f]+(?:_[0-9]{5})?)_", trial_dir)
    return found.group(1) if found else trial_dir


def mark_trial_runs(uri: str, experiment: str, search_dir: str, rows: list[TrialRow]) -> None:
    """Close each trial's nested run with its final status and the stopped-early flag.

    ASHA ends a trial by stopping its actor, which the trial sees as a failure (or not at all): the status its
    run was left with says nothing, so it is set here from what Tune reports.
    """
    c = tracking.client(uri)
    exp = tracking.experiment_id(uri, experiment)
    for row in rows:
        run_dir = f"{search_dir}/train_runs/{row.trial_id}"
        for run in c.search_runs([exp], filter_string=f"tags.`{tracking.RUN_DIR_TAG}` = '{run_dir}'"):
            c.set_tag(run.info.run_id, "anodfd.stopped_early", str(row.stopped_early).lower())
            c.set_tag(run.info.run_id, "anodfd.epochs_run", str(row.epochs))
            c.set_terminated(run.info.run_id, "FAILED" if row.status == "ERROR" else "FINISHED")


def search_space(args: argparse.Namespace) -> Space:
    """The preset's space less what the command line fixes: a view flag fixes the view, --align the registration,
    --confirm the confirmation, --model the variant."""
    given = {f"data.{k}" for k in SPACE_FLAGS if getattr(args, k) is not None}
    return SEARCH_PRESETS[args.preset]["space"].without(given | ({"model.name"} if args.model else set()))


COLUMN = {"model.name": "model", "data.crop_pos_fraction": "crop_pos", "data.misregister": "misreg",
          "train.bce_weight": "bce", "train.dice_weight": "dice", "train.focal_weight": "focal"}


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def format_table(rows: list[TrialRow], metric: str) -> str:
    keys = [k for k in SEARCHED if any(k in r.params for r in rows)]
    head = ["rank", "trial", metric, *[COLUMN.get(k, k.split(".")[-1]) for k in keys], "epochs", "ASHA stopped", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.trial_id, f"{r.value:.4f}", *[_fmt(r.params.get(k, "-")) for k in keys], str(r.epochs),
                 "yes" if r.stopped_early else "no", r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_parent(uri: str, run_id: str, rows: list[TrialRow], best: TrialRow, metric: str, table: str,
               space: Space) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "summary.md").write_text(table + "\n")
        tracking.log_file(uri, run_id, Path(d) / "summary.md")
        for path in optuna_plots(rows, space, Path(d)):
            tracking.log_file(uri, run_id, path, "optuna")
    tracking.log_json(uri, run_id, {"trial_id": best.trial_id, "params": best.params, metric: best.value}, "best_trial.json")
    tracking.log_metrics(uri, run_id, {f"best_{metric}": best.value}, step=0)
    tracking.client(uri).set_tag(run_id, "anodfd.best_trial", best.trial_id)


def optuna_plots(rows: list[TrialRow], space: Space, folder: Path) -> list[Path]:
    """Optuna's optimization-history and parameter-importance plots, from the trials as they ended."""
    import warnings

    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Some regimes for parameter")  # few trials per choice: expected
    study = optuna.create_study(direction="maximize")
    dist = space.distributions()
    for r in rows:
        if not (math.isfinite(r.value) and r.params and set(r.params) <= set(dist)):
            continue
        try:  # importances over a conditional space use the dimensions every trial has
            study.add_trial(optuna.trial.create_trial(params=r.params, distributions={k: dist[k] for k in r.params},
                                                      value=r.value))
        except ValueError:  # a value outside this space: a search resumed under other flags
            continue
    out = []
    for fname, plot in (("optimization_history.png", plot_optimization_history),
                        ("param_importances.png", plot_param_importances)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. too few finished trials for importances
            print(f"note: no {fname}: {e}")
            continue
        ax.figure.savefig(folder / fname, dpi=110, bbox_inches="tight")
        out.append(folder / fname)
    return out


def promote(uri: str, parent_run_id: str, dataset: str, data_dir: Path, train_run: str, best: TrialRow,
            metric: str, experiment: str) -> None:
    """Score the best trial's checkpoint (the epoch that won on ``metric``) on the test split at native resolution,
    beside the template-differencing floor, then register it (once per search, also on resume)."""
    from anodfd.checkpoint import load_checkpoint
    from anodfd.gate import log_and_register
    from anodfd.inference import resolve_device
    from anodfd.metrics import format_row
    from anodfd.scoring import score_checkpoint

    c = tracking.client(uri)
    tags = c.get_run(parent_run_id).data.tags
    if "anodfd.registered_version" in tags:
        print(f"registry: this search already registered version {tags['anodfd.registered_version']}; nothing to do")
        return
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as scratch:  # checkpoints on s3:// or gs:// are evaluated from a copy
        ckpt_path = best_checkpoint_file(fetch_checkpoints(train_run, Path(scratch)), metric)
        if ckpt_path is None:
            raise ConfigError(f"{train_run}: the best trial left no checkpoint")
        ckpt = load_checkpoint(ckpt_path)
        print(f"registry: scoring trial {best.trial_id}'s epoch {ckpt['epoch']} (best validation {metric} "
              f"{ckpt['metrics'][metric]:.4f}) on the test split at native resolution", flush=True)
        card = score_checkpoint(ckpt, data_dir, "test", device, out=Path(scratch) / "card")
        print(f"test split, threshold 0.5: {format_row(card.metrics)}")
        print(f"test split, calibrated threshold {card.threshold:.3f}: {format_row(card.calibrated)}")
        print(f"floor (template differencing, threshold {card.floor_threshold:.3f} fitted on train): "
              f"F1 {card.floor_f1:.3f}")
        exp = tracking.experiment_id(uri, experiment)
        trial_runs = c.search_runs([exp], filter_string=f"tags.`{tracking.RUN_DIR_TAG}` = '{train_run}'")
        reg = log_and_register(
            uri, ckpt_path, dataset, card, parent_run_id,
            tags={"search_run": parent_run_id, "trial": best.trial_id, "selected_by": f"validation {metric}",
                  **({"trial_run_id": trial_runs[0].info.run_id} if trial_runs else {})},
            rescore=lambda champion: score_checkpoint(champion, data_dir, "test", device),
        )
        c.set_tag(parent_run_id, "anodfd.registered_version", str(reg.version))
        tracking.log_metrics(uri, parent_run_id, {f"test_{k}": v for k, v in card.metrics.items()}, step=0)
        for path in card.files.values():
            tracking.log_file(uri, parent_run_id, path, "test")
        print(f"registry: {reg.name} version {reg.version} -> alias challenger; "
              f"champion {'moved to it' if reg.champion else 'unchanged'}: {reg.reason}")
        if card.shortfall:
            print(f"\nthis search's model is not a working detector yet: {card.shortfall}. It is registered as "
                  "challenger only; train longer or search more trials (--max-epochs, --num-samples).")
        print(f"model card: anodfd models show --dataset {dataset} --version {reg.version}")


if __name__ == "__main__":
    raise SystemExit(main())

"""The Ray Train per-worker function: the plain loop of `loop.py`, plus Ray's lines (marked `# Ray`).

Each worker trains on its shard under DDP; evaluation counts are summed over ranks, so every rank holds the
same global metrics. Rank 0 alone writes the epoch's checkpoint directory (weights and state, plus the ROC
curve and anomaly overlays as PNGs) and hands it to `ray.train.report`. MLflow is written on the driver side
from what Ray accepted (see `launch.MlflowCallback`), so a crash never logs an epoch that is then retrained.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import cv2
import ray.train  # Ray
import ray.train.torch  # Ray
import ray.util  # Ray
import torch
import torch.distributed as dist
from torch import nn

from anodfd.checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from anodfd.config import Config, DataConfig
from anodfd.data import layouts
from anodfd.data.dataset import PairDataset, make_dataset
from anodfd.evaluation import register_pairs
from anodfd.inference import served_probs
from anodfd.metrics import PixelHistogram, plot_roc
from anodfd.predict import overlay_grid
from anodfd.preflight import driver_version, gpu_problem
from anodfd.train.loop import build_training, epoch_line, restore, run_epoch, selection_key

CHECKPOINT_FILE = "checkpoint.pt"
OVERLAY_PAIRS = 4  # the first validation pairs, drawn every epoch


def train_func_per_worker(loop_config: dict) -> None:
    # A size-1 dimension makes DDP see a harmless stride mismatch in one decoder weight's gradient.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    config = Config.from_dict(loop_config["config"])
    t = config.train
    torch.set_num_threads(loop_config.get("threads", 1))
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()  # Ray
    node = ray.util.get_node_ip_address()  # Ray
    # Which copy of the code trains matters on a cluster: it must be the job's package, not a node's install.
    print(f"worker {rank} of {world} on {node}: anodfd.data.layouts from {layouts.__file__}", flush=True)
    if loop_config.get("gpus") and not torch.cuda.is_available():
        # A GPU node that joined after the search's preflight (autoscaling) and cannot run the pinned torch.
        problem = gpu_problem(torch.__version__, torch.version.cuda, driver_version(), 0)
        raise RuntimeError(f"worker {rank} on node {node} was given a GPU but cannot use it: {problem}")
    device = ray.train.torch.get_device()  # Ray

    # The launcher validated the data already; each rank augments with its own stream.
    train_ds = make_dataset(config.data, "train", train=True, seed=t.seed + 7919 * rank, check=False)
    val_ds = make_dataset(config.data, "val", check=False)

    model, optimizer, loss_fn = build_training(config, device)
    model = ray.train.torch.prepare_model(model)  # Ray: DDP (gloo on CPU, NCCL on GPU); same parameters

    start_epoch, best = 1, (-1.0, -1.0)
    checkpoint = ray.train.get_checkpoint()  # Ray: the latest one, after a worker failure or on resume
    if checkpoint:
        with checkpoint.as_directory() as d:
            ckpt = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        start_epoch, best = restore(ckpt, model, optimizer)
        if rank == 0:
            print(f"restored from the checkpoint of epoch {ckpt['epoch']}; continuing at epoch {start_epoch}")

    if world > 1 and config.data.align != "none":
        # Registration is the slow part of decoding; the workers of a node share its disk cache, so each
        # registers a share of the pairs, and after the barrier all of them only read.
        register_pairs([train_ds, val_ds], share=(ctx.get_local_rank(), ctx.get_local_world_size()))  # Ray
        dist.barrier()
    align_failed = register_pairs([train_ds, val_ds], print if rank == 0 else lambda s: None)
    for epoch in range(start_epoch, t.epochs + 1):
        metrics, pixels = run_epoch(model, optimizer, loss_fn, train_ds, val_ds, config, epoch, device, rank, world)
        if align_failed is not None:
            metrics["align_failed"] = align_failed
        metrics["param_spread"] = param_spread(model)  # 0.0 when DDP kept every rank's weights identical
        metrics["workers"] = world
        metrics["threads"] = torch.get_num_threads()  # each worker's share of its node's cores
        best = max(best, selection_key(metrics))
        with tempfile.TemporaryDirectory() as d:
            ckpt_obj = None
            if rank == 0:
                save_checkpoint(checkpoint_dict(model, optimizer, epoch, config, metrics, best), Path(d) / CHECKPOINT_FILE)
                write_pictures(Path(d), epoch, metrics, pixels, _unwrap(model), val_ds, config.data, device)
                ckpt_obj = ray.train.Checkpoint.from_directory(d)  # Ray
            # Ray: a barrier; every rank reports each epoch, rank 0 with the checkpoint.
            ray.train.report(metrics, checkpoint=ckpt_obj, checkpoint_dir_name=f"epoch_{epoch:04d}")
        if rank == 0:
            print(epoch_line(metrics, t.epochs), flush=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def param_spread(model: nn.Module) -> float:
    """Largest difference across ranks of any parameter tensor's sum (every rank must call this)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


def write_pictures(
    folder: Path, epoch: int, metrics: dict[str, float], pixels: PixelHistogram, model: nn.Module,
    val_ds: PairDataset, data: DataConfig, device: torch.device,
) -> None:
    """The epoch's validation ROC curve and anomaly overlays of the same few validation pairs every epoch."""
    plot_roc(pixels, folder / f"roc_epoch_{epoch:04d}.png", title=f"validation ROC, epoch {epoch}")
    grid = overlay_grid(fixed_pair_maps(model, val_ds, data, device), metrics["threshold"])
    cv2.imwrite(str(folder / f"overlays_epoch_{epoch:04d}.png"), grid)


def fixed_pair_maps(model: nn.Module, val_ds: PairDataset, data: DataConfig, device: torch.device):
    rows = []
    for i in range(min(OVERLAY_PAIRS, len(val_ds))):
        hist, cur, mask = val_ds.arrays(i)  # in the training view, tiled as validation sees them
        probs = served_probs(model, hist, cur, data.window, data.confirm, device).numpy()
        rows.append((hist, cur, mask, probs))
    return rows

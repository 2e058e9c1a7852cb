"""Plain PyTorch: one epoch of training, one epoch with validation, and a single-process `fit`.

Nothing here knows Ray or MLflow. The Ray Train worker calls the same `run_epoch`, with a DDP-wrapped model and a
distributed sampler; `evaluation.evaluate` sums the validation histograms across ranks. Checkpoints are written
and read by `anodfd.checkpoint`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from anodfd.checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from anodfd.config import Config, ConfigError, TrainConfig
from anodfd.data.cache import View
from anodfd.data.dataset import PairDataset, make_dataset, normalize, worker_init_fn
from anodfd.evaluation import all_reduce_sum, evaluate, register_pairs
from anodfd.inference import autocast, resolve_device
from anodfd.losses import CombinedLoss
from anodfd.metrics import DefectGrid, ImageScores, PixelHistogram
from anodfd.model import build_model


def make_loader(
    dataset: PairDataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
    sampler: Sampler | None = None, num_workers: int = 0, pin_memory: bool = False, rank: int = 0,
) -> DataLoader:
    # The shuffle order depends only on (seed, epoch), so a resumed run sees the epochs it would have seen. The
    # rank is mixed in because loader workers seed their augmentation from this generator: without it every DDP
    # rank would draw the same flips and nuisances.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + rank * 7_919_000_003)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        generator=generator, num_workers=num_workers, pin_memory=pin_memory, drop_last=False,
        worker_init_fn=worker_init_fn, persistent_workers=False,
    )


def _to_device(batch, device: torch.device, channels_last: bool):
    hist, cur, mask = (t.to(device, non_blocking=True) for t in batch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (
        normalize(hist).contiguous(memory_format=fmt),
        normalize(cur).contiguous(memory_format=fmt),
        mask.float(),
    )


@dataclass
class EpochStats:
    loss: float
    pairs: int
    seconds: float
    data_seconds: float  # time spent waiting for the loader: the part a faster pipeline would remove

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module, loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
    device: torch.device, max_steps: int = 0, log_every: int = 0, log: Callable[[str], None] = print,
) -> EpochStats:
    model.train()
    channels_last = device.type == "cuda"
    total, pairs, data_time = 0.0, 0, 0.0
    start = tick = time.perf_counter()
    for step, batch in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        hist, cur, mask = _to_device(batch, device, channels_last)
        data_time += time.perf_counter() - tick
        with autocast(device):
            logits = model(hist, cur)
        loss = loss_fn(logits.float(), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(mask)
        pairs += len(mask)
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}: loss {loss.item():.4f}")
        tick = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # Every rank ends with the global figures: loss per pair and pairs over all ranks.
    sums = all_reduce_sum(torch.tensor([total, float(pairs)], dtype=torch.float64, device=device)).tolist()
    if sums[1] == 0:
        raise ConfigError("the training split gave no batch; check the dataset and --batch-size")
    return EpochStats(sums[0] / sums[1], int(sums[1]), time.perf_counter() - start, data_time)


def val_shard(dataset: PairDataset, rank: int, world: int) -> range:
    """Every `world`-th pair from `rank`: each pair evaluated exactly once (DistributedSampler pads instead)."""
    return range(rank, len(dataset), world)


def seed_epoch(dataset: PairDataset, seed: int, epoch: int, rank: int) -> None:
    """Restart every random stream of this rank (dropout, augmentation) from (seed, epoch, rank).

    Each epoch's randomness is then a function of its number alone, so a run resumed at epoch k draws exactly
    what a straight run draws there: no RNG state has to travel in the checkpoint. Loader workers reseed their
    augmentation from the loader's generator, which `make_loader` derives from the same three numbers.
    """
    state = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0])
    torch.manual_seed(state)
    if dataset.transform is not None:
        dataset.transform.reseed(state)


def epoch_lr(t: TrainConfig, epoch: int) -> float:
    """The learning rate of (1-based) ``epoch``: ``t.lr`` throughout, or with ``cosine`` half a cosine from ``t.lr``
    at the first epoch toward 0 after the last. A function of the epoch number rather than a stateful torch
    scheduler, so a run resumed from a checkpoint (or restored by Ray after a failure) continues on the same curve."""
    if t.schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / t.epochs))
    return t.lr


def run_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, train_ds: PairDataset,
    val_ds: PairDataset, config: Config, epoch: int, device: torch.device, rank: int = 0, world: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], PixelHistogram]:
    """Train one epoch on this rank's shard, evaluate on the whole validation split.

    Returns the global metrics and the validation histogram (for the ROC plot), the same on every rank.
    """
    t, workers = config.train, config.data.num_workers
    pin = device.type == "cuda"
    seed_epoch(train_ds, t.seed, epoch, rank)
    lr = epoch_lr(t, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sampler = None
    if world > 1:
        # Reshuffled by epoch number, so resuming at epoch e sees the order a straight run would have.
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed)
        sampler.set_epoch(epoch)
    loader = make_loader(train_ds, t.batch_size, shuffle=True, seed=t.seed, epoch=epoch, sampler=sampler,
                         num_workers=workers, pin_memory=pin, rank=rank)
    stats = train_one_epoch(model, loader, loss_fn, optimizer, device, t.max_steps_per_epoch, t.log_every,
                            log if rank == 0 else lambda s: None)
    if not math.isfinite(stats.loss):
        raise RuntimeError(f"epoch {epoch}: training loss is {stats.loss}; lower --lr or check the data")
    val_start = time.perf_counter()
    grid = DefectGrid() if t.calibrate == "defect" else None
    pixels, images, defects = evaluate(model, val_ds, device, config.data.window, t.threshold,
                                       val_shard(val_ds, rank, world), confirm=config.data.confirm,
                                       on_pair=None if grid is None else lambda i, probs, mask: grid.update(probs, mask))
    if grid is not None:  # each rank counted its shard
        grid = DefectGrid.from_state(all_reduce_sum(grid.state().to(device)).cpu())
    metrics = epoch_metrics(pixels, images, t.threshold, grid)
    metrics.update(defects.compute())  # at the fixed threshold, like F1
    # train_s + val_s against a run's wall time: how much of it went into steps, not start-up, checkpoints, logging
    metrics.update(train_loss=stats.loss, lr=lr, pairs_per_s=stats.pairs_per_s,
                   data_wait=stats.data_seconds / max(stats.seconds, 1e-9), epoch=epoch, train_s=stats.seconds,
                   val_s=time.perf_counter() - val_start)
    if device.type == "cuda":
        metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics, pixels


def epoch_metrics(pixels: PixelHistogram, images: ImageScores, threshold: float,
                  grid: DefectGrid | None = None) -> dict[str, float]:
    """The paper's row at the fixed threshold, plus the calibrated threshold and image-level AUROC. The threshold
    maximises pixel F1, or with ``grid`` (``--calibrate defect``) defect F, and ``calibrated_f1`` is the pixel F1
    there either way."""
    metrics = pixels.compute(threshold)
    if grid is None:
        best_t, best_f1 = pixels.best_f1_threshold()
    else:
        best_t, metrics["calibrated_defect_f"] = grid.best()
        best_f1 = pixels.compute(best_t)["f1"]
    # Without anomalous pixels in validation every threshold that flags nothing ties at F1 1; a collapsed model
    # is best at 0.0 (flag everything). Neither is a threshold to serve with: the fixed one is kept instead, and
    # `threshold_calibrated` says so.
    calibrated = bool(pixels.pos.sum() and pixels.neg.sum()) and 0.0 < best_t < 1.0 and best_f1 > 0.0
    if not calibrated:
        best_t, best_f1 = threshold, metrics["f1"]
    metrics.update(calibrated_threshold=best_t, calibrated_f1=best_f1, threshold_calibrated=float(calibrated),
                   image_auroc=images.auroc())
    return metrics


def selection_key(metrics: dict[str, float], metric: str = "f1") -> tuple[float, float]:
    """Best epoch = highest validation ``metric``; by default F1 at the fixed threshold (the paper's rule).

    Early in training every pixel can sit below 0.5, so F1 ties at 0; the calibrated F1 breaks such ties,
    so the kept checkpoint is the most promising one rather than the first. A NaN (AUC on a one-class split)
    ranks last.
    """
    value = metrics[metric]
    return (value if math.isfinite(value) else -math.inf, metrics["calibrated_f1"])


def build_training(config: Config, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """Model (seeded, on ``device``), the paper's Adam and the configured loss: what every training run starts from."""
    t = config.train
    torch.manual_seed(t.seed)  # the same initial weights on every DDP rank and in every rerun
    model = build_model(config.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    return model, optimizer, CombinedLoss.from_config(t)


def restore(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, tuple[float, float]]:
    """Load a checkpoint's weights and optimizer state; returns (epoch to start at, best selection key so far)."""
    getattr(model, "module", model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["epoch"] + 1, tuple(ckpt["best"])


# --- single-process training ---------------------------------------------------------------------------


def fit(config: Config, out: str | Path, log: Callable[[str], None] = print) -> dict:
    """Train with validation every epoch, keeping ``best.pt`` (by validation F1) and ``last.pt`` in ``out``.

    Rerunning with the same ``out`` resumes from ``last.pt``; a config that changes the model is refused
    rather than silently overwriting the earlier run.
    """
    out = Path(out).resolve()
    device = resolve_device(config.train.device)
    t = config.train
    # Validate every split before anything is computed or written.
    train_ds = make_dataset(config.data, "train", train=True, seed=t.seed)
    val_ds = make_dataset(config.data, "val", train=False)

    model, optimizer, loss_fn = build_training(config, device)
    start_epoch, best = 1, (-1.0, -1.0)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists():
        ckpt = load_checkpoint(last_path)
        check_resumable(ckpt, config, last_path)
        start_epoch, best = restore(ckpt, model, optimizer)
        log(f"resuming {out} from epoch {ckpt['epoch']} (best F1 so far {best[0]:.4f})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    history = []
    align_failed = register_pairs([train_ds, val_ds], log)
    for epoch in range(start_epoch, t.epochs + 1):
        metrics, _ = run_epoch(model, optimizer, loss_fn, train_ds, val_ds, config, epoch, device, log=log)
        if align_failed is not None:
            metrics["align_failed"] = align_failed
        improved = selection_key(metrics) > best
        best = max(best, selection_key(metrics))
        ckpt = checkpoint_dict(model, optimizer, epoch, config, metrics, best)
        if improved:
            save_checkpoint(ckpt, best_path)
        save_checkpoint(ckpt, last_path)
        history.append(metrics)
        log(epoch_line(metrics, t.epochs) + ("  *best" if improved else ""))
    return {"best_f1": best[0], "history": history, "best": best_path, "last": last_path}


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    defect = f", defect F {metrics['calibrated_defect_f']:.4f}" if "calibrated_defect_f" in metrics else ""
    calibrated = (f"calibrated {metrics['calibrated_f1']:.4f}{defect} @ {metrics['calibrated_threshold']:.3f}"
                  if metrics.get("threshold_calibrated", 1.0) else
                  f"no threshold calibrates on this validation split: serving at {metrics['calibrated_threshold']:g}")
    return (
        f"epoch {int(metrics['epoch'])}/{epochs}  loss {metrics['train_loss']:.4f}  val F1 {metrics['f1']:.4f} "
        f"({calibrated})  "
        f"AUC {metrics['auc']:.4f}  {metrics['pairs_per_s']:.1f} pairs/s"
    )


def check_resumable(ckpt: dict, config: Config, path: Path) -> None:
    before = Config.from_dict(ckpt["config"])
    view = [f.name for f in fields(View)] + ["crop"]  # every field of the view, so a new one is checked too
    if before.model != config.model or any(getattr(before.data, k) != getattr(config.data, k) for k in view):
        seen = ", ".join(f"{k} {getattr(before.data, k)}" for k in view)
        raise ConfigError(
            f"{path} was trained with a different model or view ({before.model}; {seen}); "
            "resume with the same settings, or pass a new --out so the earlier run is kept"
        )

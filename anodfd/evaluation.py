"""Scoring a model over a split: the pixel histogram, pair scores and defect counts, exact under DDP, and the
up-front registration of every pair with ``--align``. Training validation, `anodfd eval`, the registry's scoring and
the benchmarks all count through `evaluate`, so their figures cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from anodfd.config import DataConfig
from anodfd.data.dataset import PairDataset, make_dataset
from anodfd.inference import TILE_BATCH, resize_probs, served_probs
from anodfd.metrics import DefectCounts, ImageScores, PixelHistogram, image_scores


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); the identity in a single process."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.inference_mode()
def evaluate(
    model: nn.Module, dataset: PairDataset, device: torch.device, window: int, threshold: float = 0.5,
    indices: range | list[int] | None = None, bins: int = 1000, batch: int = TILE_BATCH, progress: str | None = None,
    on_pair: Callable[[int, np.ndarray, np.ndarray], None] | None = None, confirm: str = "none",
) -> tuple[PixelHistogram, ImageScores, DefectCounts]:
    """Pixel histogram, pair scores and defect counts (maps cut at ``threshold``) over ``dataset``, or the pairs
    ``indices`` of it, counted on each mask's own pixels.

    Each pair is seen in the dataset's view through ``window`` x ``window`` tiles (`served_probs`, which confirms the
    map by registered differencing with ``confirm`` "diff", as the model's config serves it), and its map is
    resized to its mask's native size before counting: a 64 px model and a 640 px one are scored on the same
    pixels. Under DDP each rank passes its own shard (see `val_shard`) and the integer counts are summed over
    ranks, so the metrics are exactly those of one process seeing the whole split. ``progress`` names a
    progress bar. ``on_pair(i, probs, mask)`` sees each pair's map and mask at native size, for callers that
    draw or count more (the overlay grid, small-defect recall) without scoring the pair twice.
    """
    pixels, images, defects = PixelHistogram(bins), ImageScores(), DefectCounts()
    order = range(len(dataset)) if indices is None else indices
    for i in tqdm(order, desc=progress, unit="pair", disable=progress is None, leave=False):
        hist, cur, _ = dataset.arrays(i)
        mask = dataset.native_mask(i)
        probs = served_probs(model, hist, cur, window, confirm, device, batch)[None, None]
        full = resize_probs(probs, *mask.shape)
        truth = torch.from_numpy(mask)[None, None]
        pixels.update(full, truth)
        images.add(image_scores(probs), torch.tensor([bool(mask.any())]))
        defects.update((full[0, 0].numpy() >= threshold).astype(np.uint8), mask)
        if on_pair is not None:
            on_pair(i, full[0, 0].numpy(), mask)
    if _distributed():
        device = torch.device(device)
        pixels = PixelHistogram.from_state(all_reduce_sum(pixels.state().to(device)).cpu())
        images = ImageScores.from_state(all_reduce_sum(images.state().to(device)).cpu())
        defects = DefectCounts.from_state(all_reduce_sum(defects.state().to(device)).cpu())
    return pixels, images, defects


def register_pairs(datasets: list[PairDataset], log: Callable[[str], None] = print,
                   share: tuple[int, int] = (0, 1)) -> int | None:
    """With ``--align``, register every pair of ``datasets`` once, up front, and return how many fell back to the
    identity (None without ``--align``). The registered pairs land in the decode cache, so loader workers and later
    epochs only read them; each failure is named in the log, and the count is logged to MLflow as
    ``align_failed`` with every epoch's metrics.

    ``share=(i, n)`` registers only every n-th pair from the i-th and returns None: the DDP workers of one node
    split the work this way, then call it again without ``share`` after a barrier, reading the others' pairs
    from the node's disk cache instead of registering each pair once per worker."""
    if all(ds.view.align == "none" for ds in datasets):
        return None
    index, count = share
    failed = []
    for ds in datasets:
        for pair in tqdm(ds.pairs[index::count], desc=f"registering pairs ({ds.view.align})", unit="pair", leave=False):
            reason = ds.cache.align_failure(pair, ds.view)
            if reason:
                failed.append(f"{pair.hist} -> {pair.cur}: {reason}")
    if count > 1:
        return None  # a share's failures are counted, over every pair, by the call after the barrier
    for line in failed[:5]:
        log(f"registration fell back to the identity: {line}")
    if len(failed) > 5:
        log(f"... and {len(failed) - 5} more pairs: {len(failed)} of {sum(len(ds) for ds in datasets)} unregistered")
    return len(failed)


def evaluate_split(
    model: nn.Module, data: DataConfig, split: str, device: torch.device | str = "cpu",
) -> tuple[PixelHistogram, ImageScores, DefectCounts]:
    """`evaluate` over one whole split of ``data``, un-augmented: how a trained model is scored after training."""
    return evaluate(model, make_dataset(data, split), torch.device(device), data.window, confirm=data.confirm)

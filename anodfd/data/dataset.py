"""`PairDataset`: (history, current, mask) as uint8 tensors, ready for a DataLoader.

Pairs stay uint8 until they reach the device (`normalize` there): a quarter of the bytes to move, and the
float conversion runs on the GPU instead of in a loader process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from anodfd.config import DataConfig
from anodfd.data.cache import PairCache, View, as_view, read_mask
from anodfd.data.layouts import Pair, load_split

if TYPE_CHECKING:
    from anodfd.data.transforms import PairTransform


class PairDataset(Dataset):
    """Pairs in their `View` (``view``; an int is the paper's square resize), through ``transform`` if given."""

    def __init__(
        self, pairs: list[Pair], view: View | int, cache: PairCache | None = None,
        transform: PairTransform | None = None,
    ):
        self.pairs = pairs
        self.view = as_view(view)
        self.cache = cache if cache is not None else PairCache()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        arr = self.cache.get(self.pairs[index], self.view)
        hist, cur, mask = arr[..., :3], arr[..., 3:6], arr[..., 6]
        if self.transform is not None:
            hist, cur, mask = self.transform(hist, cur, mask)
        return to_chw(hist), to_chw(cur), torch.from_numpy(np.ascontiguousarray(mask))[None]

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The un-augmented uint8 pair (HxWx3, HxWx3, HxW), for overlays and reports."""
        arr = self.cache.get(self.pairs[index], self.view)
        return arr[..., :3], arr[..., 3:6], arr[..., 6]

    def native_mask(self, index: int) -> np.ndarray:
        """The pair's mask at its own resolution, {0,1} uint8: the pixels every metric counts."""
        return read_mask(self.pairs[index].mask)


def to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the official code trains on."""
    return x.float().div_(127.5).sub_(1.0)


def make_dataset(config: DataConfig, split: str, train: bool = False, seed: int = 0, check: bool = True) -> PairDataset:
    """The dataset for one split of ``config.data``, validated up front; augmented only when ``train``."""
    from anodfd.data.transforms import build_transform  # albumentations is only needed here

    pairs = load_split(Path(config.data), split, config.layout, config.val_fraction, check=check,
                       group_regex=config.group_regex, val_groups=config.val_groups)
    cache = PairCache(config.cache_dir or None)
    return PairDataset(pairs, View.of(config), cache, build_transform(config, train=train, seed=seed))


def worker_init_fn(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (derived from torch's per-worker seed)."""
    info = get_worker_info()
    if info is not None and getattr(info.dataset, "transform", None) is not None:
        info.dataset.transform.reseed(info.seed % 2**32)

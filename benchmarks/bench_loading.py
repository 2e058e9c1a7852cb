"""Pairs/s delivered as training batches: our loader against the official pipeline, in the same run.

The official pipeline opens every pair with PIL and resizes it with torchvision, every epoch. Ours decodes each
pair with OpenCV once (full decode, area resize), then serves the cached uint8 pair. Both produce normalised float batches of
(history, current, mask) at the target size with the paper's flip/rotation augmentation.

    python benchmarks/bench_loading.py                       # OL stand-in at 2048x1536, made on first use
    python benchmarks/bench_loading.py --data ../shared/data/deeppcb --image-size 256
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from anodfd.config import DataConfig
from anodfd.data.cache import PairCache
from anodfd.data.dataset import PairDataset, normalize, worker_init_fn
from anodfd.data.layouts import Pair, load_split
from anodfd.data.transforms import build_transform


class OfficialStyleDataset(Dataset):
    """What the official code does per item: PIL open, torchvision Resize/ToTensor/Normalize, flips."""

    def __init__(self, pairs: list[Pair], size: int):
        self.pairs = pairs
        self.image = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
        self.mask = T.Compose([T.Resize((size, size)), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        p = self.pairs[i]
        hist = self.image(Image.open(p.hist).convert("RGB"))
        cur = self.image(Image.open(p.cur).convert("RGB"))
        mask = self.mask(Image.open(p.mask).convert("L"))
        op = random.randrange(4)
        if op in (1, 3):
            hist, cur, mask = TF.vflip(hist), TF.vflip(cur), TF.vflip(mask)
        if op in (2, 3):
            hist, cur, mask = TF.hflip(hist), TF.hflip(cur), TF.hflip(mask)
        return hist, cur, (mask > 0.5).float()


def run_epochs(loader: DataLoader, epochs: int, ours: bool) -> list[float]:
    rates = []
    for _ in range(epochs):
        n, start = 0, time.perf_counter()
        for hist, cur, mask in loader:
            if ours:  # the training loop does this on the device; count it here to compare like with like
                hist, cur, mask = normalize(hist), normalize(cur), mask.float()
            n += len(hist)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset folder (default: an OL stand-in at 2048x1536)")
    ap.add_argument("--pairs", type=int, default=60, help="pairs of the OL stand-in made when --data is absent")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=0)
    args = ap.parse_args()

    data = Path(args.data) if args.data else Path(tempfile.gettempdir()) / f"anodfd-bench-OL-{args.pairs}"
    if not (data / "train.txt").exists() and not args.data:
        from anodfd.synth import synthesize

        synthesize("OL", data, pairs=args.pairs, seed=0, size=(2048, 1536), force=True)  # redo a run cut short
    pairs = load_split(data, "train")
    cache_dir = Path(tempfile.mkdtemp(prefix="anodfd-bench-cache-"))
    kw = {"batch_size": args.batch_size, "shuffle": True, "num_workers": args.num_workers}
    try:
        official = run_epochs(DataLoader(OfficialStyleDataset(pairs, args.image_size), **kw), args.epochs, ours=False)
        transform = build_transform(DataConfig(augment="paper"), train=True, seed=0)
        ds = PairDataset(pairs, args.image_size, PairCache(cache_dir), transform)
        ours = run_epochs(DataLoader(ds, worker_init_fn=worker_init_fn, **kw), args.epochs, ours=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    w, h = Image.open(pairs[0].cur).size
    print(f"\n{len(pairs)} train pairs of {data} ({w}x{h} current images) -> {args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}, {args.num_workers} loader workers, torch threads {torch.get_num_threads()}\n")
    print("| pipeline | epoch 1 pairs/s | later epochs pairs/s |")
    print("|---|---|---|")
    later = lambda r: sum(r[1:]) / max(len(r) - 1, 1)
    print(f"| official (PIL + torchvision, every epoch) | {official[0]:.1f} | {later(official):.1f} |")
    print(f"| anodfd (OpenCV decode once + cache) | {ours[0]:.1f} | {later(ours):.1f} |")
    print(f"| speed-up | {ours[0] / official[0]:.1f}x | {later(ours) / later(official):.1f}x |")


if __name__ == "__main__":
    main()

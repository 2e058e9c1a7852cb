"""Pair-consistent augmentation of (history, current, mask) with albumentations 2.x.

A training sample goes through up to three albumentations pipelines, in this order:

1. shared geometry: the same crop window (``crop > 0``), flip / rotation (and, for "strong", scale and shift)
   hits history, current and mask, so the anomaly mask stays aligned with the current image and the pair
   stays registered;
2. history only (``misregister > 0``): a small independent affine of the history image, so the model
   learns that a slight viewpoint change is not an anomaly;
3. photometry ("strong" only): brightness, contrast, gamma, noise and blur drawn separately for each
   image, so the model learns that an illumination change is not an anomaly either.

Randomness: each pipeline owns one numpy and one Python generator. ``reseed(seed)`` makes the stream
reproducible. DataLoader workers start as copies of the same object, so they must not share a stream:
the dataset should call ``transform.reseed(worker_seed)`` in each worker (torch's per-worker seed), and
as a safety net a transform first used in a process other than the one that last seeded it reseeds
itself from torch's worker seed (or fresh OS entropy outside a DataLoader worker).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

from anodfd.config import DataConfig
from anodfd.metrics import defect_regions

AUGMENTS = ("none", "paper", "strong")

# The paper's four equally likely options, named after albumentations' D4 group elements
# ("v" flips rows, i.e. upside down; "h" flips columns, i.e. left-right).
PAPER_OPS: dict[str, str] = {"identity": "e", "vflip": "v", "hflip": "h", "rot180": "r180"}

# Reflection keeps borders looking like the scene. The mask is reflected too: a mirrored anomaly is
# visible in the reflected border of the current image, so labelling it 0 would contradict the pixels.
_BORDER = cv2.BORDER_REFLECT_101


class PaperFlips(A.D4):
    """One of the given D4 elements, equally likely (default: the paper's identity/vflip/hflip/rot180)."""

    def __init__(self, ops: Sequence[str] = tuple(PAPER_OPS), p: float = 1.0):
        super().__init__(p=p)
        unknown = set(ops) - set(PAPER_OPS)
        if not ops or unknown:
            raise ValueError(f"ops must be a non-empty subset of {tuple(PAPER_OPS)}, got {ops!r}")
        self.elements = [PAPER_OPS[name] for name in ops]

    def get_params(self) -> dict[str, Any]:
        return {"group_element": self.elements[self.random_generator.integers(len(self.elements))]}


class FastGaussNoise(A.ImageOnlyTransform):
    """Additive Gaussian noise for uint8 images, ``std_range`` in grey levels.

    A.GaussNoise draws ~200k normals per 256x256 image (about 2.5 ms, the slowest step by far); this cuts
    a random window, with a random sign, out of one noise field drawn once (about 0.2 ms). The window
    offset gives 65*65*2 distinct noise images, plenty for a nuisance augmentation.
    """

    PAD = 64  # the field is this much larger than the image in each direction

    def __init__(self, std_range: tuple[float, float] = (2.5, 7.5), p: float = 0.5):
        super().__init__(p=p)
        self.std_range = std_range

    def get_params(self) -> dict[str, Any]:
        sign = 1.0 if self.py_random.random() < 0.5 else -1.0
        return {
            "sigma": sign * self.py_random.uniform(*self.std_range),
            "dy": self.py_random.randint(0, self.PAD),
            "dx": self.py_random.randint(0, self.PAD),
        }

    def apply(self, img: np.ndarray, sigma: float, dy: int, dx: int, **params: Any) -> np.ndarray:
        h, w = img.shape[:2]
        field = _noise_field(h + self.PAD, w + self.PAD, img.shape[2] if img.ndim == 3 else 0)
        return cv2.addWeighted(img, 1.0, field[dy : dy + h, dx : dx + w], sigma, 0.0, dtype=cv2.CV_8U)


class PairTransform:
    """Callable: (hist, cur, mask) -> (hist, cur, mask), same dtypes/shapes.

    ``hist`` and ``cur`` are uint8 HxWx3 RGB images of the same size, ``mask`` a uint8 HxW {0,1} map in
    current-image coordinates; with ``crop`` the outputs are ``crop`` x ``crop`` windows of them. ``paper_ops`` restricts the paper's candidate flips (tests force one with
    it); ``photometric=False`` switches off the per-image photometry of "strong".
    """

    def __init__(
        self,
        augment: str = "paper",
        misregister: float = 0.0,
        seed: int | None = None,
        *,
        paper_ops: Sequence[str] = tuple(PAPER_OPS),
        photometric: bool = True,
        crop: int = 0,
        crop_pos_fraction: float = 0.0,
    ):
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
        if not 0.0 <= misregister < 0.5:
            raise ValueError(f"misregister must be in [0, 0.5), got {misregister}")
        self.augment = augment
        self.misregister = misregister

        shared: list[A.BasicTransform] = []
        if crop:
            shared += crop_transforms(crop, crop_pos_fraction)
        if augment in ("paper", "strong"):
            shared.append(PaperFlips(paper_ops))
        if augment == "strong":
            shared.append(
                A.Affine(
                    scale=(0.9, 1.1),
                    translate_percent=(-0.06, 0.06),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,  # keeps the mask in {0,1}
                    border_mode=_BORDER,
                    p=1.0,
                )
            )
        # "hist" is declared an image so it gets exactly the image path of every shared transform.
        self._shared = _compose(shared, additional_targets={"hist": "image"})

        self._history_only = None
        if misregister > 0:
            f = misregister
            self._history_only = _compose(
                [
                    A.Affine(
                        scale=(1 - f, 1 + f),
                        translate_percent=(-f, f),
                        rotate=(-60 * f, 60 * f),  # 3% -> up to 1.8 degrees
                        interpolation=cv2.INTER_LINEAR,
                        border_mode=_BORDER,
                        p=1.0,
                    )
                ]
            )

        self._photometric = None
        if augment == "strong" and photometric:
            # Mild on purpose: the anomalies are often small and low-contrast.
            self._photometric = _compose(
                [
                    A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.8),
                    A.RandomGamma(gamma_limit=(80, 120), p=0.5),
                    FastGaussNoise(std_range=(2.5, 7.5), p=0.3),
                    A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.8), p=0.2),
                ]
            )

        self._pipelines = [p for p in (self._shared, self._history_only, self._photometric) if p is not None]
        self._seeded_pid = -1
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart every random stream from ``seed`` (None: fresh OS entropy)."""
        root = np.random.SeedSequence(seed)
        for pipeline, child in zip(self._pipelines, root.spawn(len(self._pipelines))):
            rng = np.random.default_rng(child)
            # One shared generator per pipeline: albumentations' own `seed=` gives every transform in a
            # Compose an identically seeded generator, which makes their coin flips move in lockstep.
            pipeline.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        self._seeded_pid = os.getpid()

    def __call__(
        self, hist: np.ndarray, cur: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if os.getpid() != self._seeded_pid:
            self.reseed(_worker_seed())
        if hist.shape != cur.shape or cur.shape[:2] != mask.shape:
            raise ValueError(f"shape mismatch: hist {hist.shape}, cur {cur.shape}, mask {mask.shape}")

        if self._shared.transforms:
            out = self._shared(image=cur, hist=hist, mask=mask)
            hist, cur, mask = out["hist"], out["image"], out["mask"]
        if self._history_only is not None:
            hist = self._history_only(image=hist)["image"]
        if self._photometric is not None:
            # Two calls, two independent draws: history and current see different lighting.
            hist = self._photometric(image=hist)["image"]
            cur = self._photometric(image=cur)["image"]
        # Flips return views with negative strides; torch.from_numpy downstream needs contiguous arrays.
        return np.ascontiguousarray(hist), np.ascontiguousarray(cur), np.ascontiguousarray(mask)


class CropOnADefect(A.CropNonEmptyMaskIfExists):
    """A window around one defect of the mask, every defect equally likely, then a pixel of it, as its parent does.

    The parent draws a pixel of the whole mask: a 300x300 px stain beside a 12x12 px crack is drawn 600 times as
    often, so the defects that are hardest to see at native size were almost never trained on. Defects are the
    mask's pixels grouped across small gaps, as the defect-level metrics count them (`defect_regions`), specks
    included.
    """

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        mask = data["mask"]
        if mask.any():
            labels, defects = defect_regions(mask, min_area=1)
            if len(defects) > 1:
                data = {**data, "mask": (labels == self.py_random.choice(defects)).astype(np.uint8)}
        return super().get_params_dependent_on_data(params, data)


def crop_transforms(crop: int, pos_fraction: float) -> list[A.BasicTransform]:
    """A random ``crop`` x ``crop`` window; a ``pos_fraction`` share of them placed around a defect.

    Anomalies often cover under 1% of an image, so unbiased crops rarely see one. Views smaller than the window
    are padded by reflection first, as the borders of the augmentations are.
    """
    choices = []
    if pos_fraction > 0:  # on a normal pair it falls back to a uniform crop
        choices.append(CropOnADefect(crop, crop, p=pos_fraction))
    if pos_fraction < 1:
        choices.append(A.RandomCrop(crop, crop, p=1 - pos_fraction))
    return [A.PadIfNeeded(crop, crop, border_mode=_BORDER, p=1.0), A.OneOf(choices, p=1.0)]


def build_transform(config: DataConfig, train: bool, seed: int | None = None) -> PairTransform | None:
    """The training augmentation the config asks for; None for evaluation or when nothing would change."""
    if not train or (config.augment == "none" and config.misregister == 0 and not config.crop):
        return None
    return PairTransform(config.augment, config.misregister, seed, crop=config.crop,
                         crop_pos_fraction=config.crop_pos_fraction)


def _compose(
    transforms: list[A.BasicTransform], additional_targets: dict[str, str] | None = None
) -> A.Compose:
    # Shape checks stay on (they catch a hist/cur size mismatch); the seed is set later by reseed().
    return A.Compose(transforms, additional_targets=additional_targets)


@functools.lru_cache(maxsize=4)
def _noise_field(h: int, w: int, channels: int) -> np.ndarray:
    """A fixed standard-normal field; fixed so that reseed() alone decides what a transform draws."""
    shape = (h, w, channels) if channels else (h, w)
    field = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    field.flags.writeable = False
    return field


def _worker_seed() -> int | None:
    """Torch's per-worker seed inside a DataLoader worker (reproducible), else None (OS entropy)."""
    import torch.utils.data  # deferred: only needed when a transform crosses into a new process

    info = torch.utils.data.get_worker_info()
    return None if info is None else int(info.seed % 2**63)

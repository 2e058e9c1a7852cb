"""Decode a pair once, at the network's view of it, and keep it: in memory and on disk.

Every path that feeds the network (training, eval, `predict`, the pyfunc, scoring) goes through `preprocess`:
the full image decoded, then brought to its `View` (area-resized to the paper's square, or scaled keeping the
aspect ratio). A faster decode at reduced size (libjpeg's IMREAD_REDUCED_*) was dropped on purpose: a served model
is handed decoded arrays, which it cannot decode the same way, and the gap (1.6 grey levels on average, up to 8)
is a train/serve skew. The cost is paid once per pair: the resulting uint8 pair (hist RGB, cur RGB, mask {0,1})
is stored as one ``.npy`` keyed by the three files' identity (path, size, mtime) and the view. Later epochs, runs
and processes read that instead of decoding. Writes are atomic (temp file + rename), so concurrent workers can
share one cache.

The disk cache is capped (`disk_cap`: 50 GB unless ``$ANODFD_CACHE_MAX_GB`` says otherwise): a native 2048x1536 pair
takes 22 MB per view, and entries of views and registration methods no longer used are never read again. Past the
cap, the least recently used entries go until the cache is at `PRUNE_TO` of it; a pair whose entry went is decoded
again when next asked for.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from anodfd.config import ConfigError, DataConfig
from anodfd.data.align import Registration, prepare_history
from anodfd.data.layouts import DatasetError, Pair

_VERSION = "v5"  # bump when the decoding below changes, so stale entries are not reused
cv2.setNumThreads(1)  # DataLoader workers already run in parallel; nested OpenCV threads only contend
DISK_CAP_GB = 50.0  # the disk cache's cap when $ANODFD_CACHE_MAX_GB is unset
PRUNE_TO = 0.8  # a prune leaves the cache at this share of its cap, so that it does not run again at the next write


def default_cache_dir() -> Path:
    if os.environ.get("ANODFD_CACHE_DIR"):
        return Path(os.environ["ANODFD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anodfd"


def disk_cap() -> int:
    """Bytes the disk cache may hold: ``$ANODFD_CACHE_MAX_GB`` (GB of 2^30 bytes; 0 = no cap), else `DISK_CAP_GB`.
    Each node reads its own: the cap is about its disk."""
    text = os.environ.get("ANODFD_CACHE_MAX_GB", "").strip()
    try:
        gb = float(text) if text else DISK_CAP_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0:  # also refuses nan
        raise ConfigError(f"ANODFD_CACHE_MAX_GB={text!r}: give the decode cache's cap in GB, e.g. 50, or 0 for no cap")
    return int(gb * 2**30)


def read_bgr(path: Path) -> np.ndarray:
    """An image file at its own size as OpenCV's BGR uint8, or one clear error naming the file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: OpenCV could not decode this image; replace the file")
    return img


def read_rgb(path: Path) -> np.ndarray:
    """An image file at its own size as RGB uint8."""
    return cv2.cvtColor(read_bgr(path), cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class View:
    """How the network sees an image: squashed to ``resize`` x ``resize`` (the paper), or, with ``resize`` 0,
    scaled by ``scale`` keeping its aspect ratio (1 = native pixels); the history then registered onto the
    current image by ``align`` (`anodfd.data.align`) and, with ``relight``, its lighting matched to the current's,
    in that view."""

    resize: int = 256
    scale: float = 1.0
    align: str = "none"
    relight: bool = False

    @classmethod
    def of(cls, data: DataConfig) -> View:
        return cls(data.resize, data.scale, data.align, data.relight)

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of that size in this view."""
        if self.resize:
            return self.resize, self.resize
        return max(1, round(height * self.scale)), max(1, round(width * self.scale))

    def __str__(self) -> str:
        text = f"resized to {self.resize}x{self.resize}" if self.resize else f"scaled by {self.scale:g}, aspect kept"
        text = text if self.align == "none" else f"{text}, history registered ({self.align})"
        return f"{text}, history relit" if self.relight else text


def as_view(view: View | int) -> View:
    """A `View`; a plain int is the paper's square resize to that side."""
    return view if isinstance(view, View) else View(int(view))


def preprocess(rgb: np.ndarray, view: View | int) -> np.ndarray:
    """The network's view of an image of any size: area-resized, or bilinear when a scale above 1 enlarges it."""
    view = as_view(view)
    h, w = view.size(*rgb.shape[:2])
    if (h, w) == rgb.shape[:2]:
        return rgb
    enlarge = not view.resize and view.scale > 1
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR if enlarge else cv2.INTER_AREA)


def view_pair(hist_rgb: np.ndarray, cur_rgb: np.ndarray, view: View | int) -> tuple[np.ndarray, np.ndarray, Registration]:
    """A decoded RGB pair at its own size -> the network's input: both images in ``view`` (`preprocess`), then the
    history registered and relit onto the current image (`prepare_history`). The decode cache (training, eval) and
    `anodfd.inference.pair_map` (predict, the pyfunc, score) both call it, so what a model trained on and what it
    serves on cannot drift apart. Returns (history, current, how history was registered)."""
    view = as_view(view)
    hist, cur = preprocess(hist_rgb, view), preprocess(cur_rgb, view)
    if hist.shape != cur.shape:
        raise DatasetError(f"history is {hist_rgb.shape[1]}x{hist_rgb.shape[0]} but current is {cur_rgb.shape[1]}x"
                           f"{cur_rgb.shape[0]}, so they differ in this view ({view}); give both images of a pair the "
                           "same size, or use a model that squashes pairs (--resize N)")
    hist, registration = prepare_history(hist, cur, view.align, view.relight)
    return hist, cur, registration


def decode_image(path: Path, view: View | int) -> np.ndarray:
    """`preprocess` of an image file: what training, eval and `predict` all feed the network.

    Resized before the BGR -> RGB swap, which is exact (the resize treats channels alike) and spares the
    swap of a full-size image.
    """
    return cv2.cvtColor(preprocess(read_bgr(path), view), cv2.COLOR_BGR2RGB)


def decode_mask(path: Path, view: View | int) -> np.ndarray:
    """A {0,1} uint8 mask in ``view`` from any convention `binarize_mask` reads, PNG or JPG.

    Resizing the coverage then thresholding at half keeps the labels hard (no fake soft labels) and keeps the
    anomalous area about the same.
    """
    small = preprocess(read_mask(path).astype(np.float32), view)
    return (small >= 0.5).astype(np.uint8)


def read_mask(path: Path) -> np.ndarray:
    """The mask at its own resolution as {0,1} uint8 (see `binarize_mask`): what native-resolution metrics count."""
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # channels and bit depth as stored
    if m is None:
        raise DatasetError(f"{path}: OpenCV could not decode this mask; replace the file")
    return binarize_mask(m)


def binarize_mask(m: np.ndarray) -> np.ndarray:
    """{0,1} from the conventions datasets use, for 8- or 16-bit masks:
    - grey 0/255 (or 0/65535), JPEG noise tolerated: anomalous at or above half the range;
    - class indices (0 normal; 1, 2, ... kinds of anomaly), every value below half the range: any non-zero;
    - colour (red anomalies on black, a colour per class): any channel at or above half its range.
    """
    half = (int(np.iinfo(m.dtype).max) + 1) // 2 if m.dtype.kind in "ui" else 0.5
    if m.ndim == 3:
        m = m[..., :3]  # an alpha channel says nothing about anomalies
        if not (m == m[..., :1]).all():
            return (m >= half).any(axis=2).astype(np.uint8)
        m = m[..., 0]  # grey stored as colour
    if m.max() >= half:
        return (m >= half).astype(np.uint8)
    return (m > 0).astype(np.uint8)


class PairCache:
    """Decoded pairs in their view as one HxWx7 uint8 array: hist RGB, cur RGB, mask.

    ``memory_bytes`` caps the in-process cache (each DataLoader worker has its own); the disk cache is shared and
    capped at ``disk_bytes`` (None = `disk_cap`, 0 = no cap). ``stats`` counts decodes, disk hits, memory hits and
    entries pruned, so tests and benchmarks can see what happened.
    """

    def __init__(self, cache_dir: str | Path | None = None, disk: bool = True, memory_bytes: int = 2 << 30,
                 disk_bytes: int | None = None):
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.disk = disk
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_cap() if disk_bytes is None else disk_bytes
        self._disk_used: int | None = None  # this process's running estimate; a prune counts again
        self._memory: dict[str, np.ndarray] = {}
        self._used = 0
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}  # key -> why its registration fell back to the identity
        self.stats = {"decoded": 0, "disk_hits": 0, "memory_hits": 0, "aligned": 0, "pruned": 0}

    def key(self, pair: Pair, view: View | int) -> str:
        view = as_view(view)
        # The relight part names `match_lighting`'s method, so maps relit by an older one are not read back.
        relight = ["relit-gain-and-black-level-then-narrow"] if view.relight else []
        # Likewise the align part names registration's method: maps registered without the full-size pass, or with
        # a homography whatever the pair supports, differ.
        align = view.align if view.align == "none" else f"{view.align}-supported-motion-refined-at-full-size"
        parts = [_VERSION, str(view.resize), repr(float(view.scale)), align, *relight]
        for f in (pair.hist, pair.cur, pair.mask):
            st = f.stat()
            parts += [str(f.resolve()), str(st.st_size), str(st.st_mtime_ns)]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()

    def get(self, pair: Pair, view: View | int) -> np.ndarray:
        """The pair in ``view`` as one HxWx7 uint8 array (hist RGB, cur RGB, mask), decoded at most once."""
        view = as_view(view)
        key = self.key(pair, view)
        arr = self._memory.get(key)
        if arr is not None:
            self.stats["memory_hits"] += 1
            return arr
        path = self.dir / key[:2] / f"{key}.npy"
        arr = self._read(path) if self.disk else None
        if arr is not None:
            self.stats["disk_hits"] += 1
            _mark_used(path)
        else:
            try:
                hist, cur, registration = view_pair(read_rgb(pair.hist), read_rgb(pair.cur), view)
            except DatasetError as e:
                raise DatasetError(f"{pair.hist} and {pair.cur}: {e}") from None
            failed = registration.reason
            self.stats["aligned"] += view.align != "none"
            arr = np.concatenate([hist, cur, decode_mask(pair.mask, view)[..., None]], axis=2)
            self.stats["decoded"] += 1
            if self.disk:
                self._write(path, arr)
                if failed:
                    path.with_suffix(".align-failed").write_text(failed)
            if failed:
                self._failed[key] = failed
        self._remember(key, arr)
        return arr

    def align_failure(self, pair: Pair, view: View | int) -> str:
        """Why registering ``pair`` in ``view`` fell back to the identity ("" when it did not), decoding the pair
        if it has not been: the failure is recorded beside the cached array, so later processes see it too."""
        view = as_view(view)
        if view.align == "none":
            return ""
        self.get(pair, view)
        key = self.key(pair, view)
        if key in self._failed:
            return self._failed[key]
        marker = self.dir / key[:2] / f"{key}.align-failed"
        return marker.read_text() if self.disk and marker.exists() else ""

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            return np.load(path)
        except (FileNotFoundError, ValueError, OSError):  # absent, or a partial file from a killed writer
            return None

    def _write(self, path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
            size = f.tell()
        os.replace(tmp, path)
        _mark_used(path)
        if self.disk_bytes:
            with self._lock:
                # Counted once per process, then kept up to date by its own writes: a walk per write would cost more
                # than the write on a cache of many thousand entries.
                self._disk_used = (self._disk_used + size if self._disk_used is not None
                                   else sum(n for _, n, _ in self._entries()))
                if self._disk_used > self.disk_bytes:
                    self._disk_used = self.prune(int(self.disk_bytes * PRUNE_TO))

    def _entries(self) -> list[tuple[int, int, Path]]:
        """(last use in ns, bytes, path) of every entry on disk."""
        out = []
        for path in self.dir.glob("??/*.npy"):
            try:
                st = path.stat()
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
            out.append((st.st_mtime_ns, st.st_size, path))
        return out

    def prune(self, keep_bytes: int) -> int:
        """Remove the least recently used entries until at most ``keep_bytes`` are left on disk; the bytes left.
        Another process that was about to read a removed entry decodes the pair again (`_read` sees it absent)."""
        entries = sorted(self._entries())
        used = sum(size for _, size, _ in entries)
        removed = freed = 0
        for _, size, path in entries:
            if used <= keep_bytes:
                break
            path.unlink(missing_ok=True)
            path.with_suffix(".align-failed").unlink(missing_ok=True)
            used, removed, freed = used - size, removed + 1, freed + size
        if removed:
            self.stats["pruned"] += removed
            print(f"decode cache {self.dir}: over its cap of {self.disk_bytes / 2**30:g} GB, removed the {removed} "
                  f"least recently used entries ({freed / 2**30:.2f} GB); $ANODFD_CACHE_MAX_GB sets the cap",
                  file=sys.stderr)
        return used

    def _remember(self, key: str, arr: np.ndarray) -> None:
        with self._lock:
            if self._used + arr.nbytes <= self.memory_bytes:
                self._memory[key] = arr
                self._used += arr.nbytes


def _mark_used(path: Path) -> None:
    """Stamp an entry's last use as its mtime, in ns set by us: a file system's own mtime ticks (ms) would tie."""
    try:
        now = time.time_ns()
        os.utime(path, ns=(now, now))
    except OSError:  # pruned meanwhile, or a read-only cache: recency is a hint, not a requirement
        pass

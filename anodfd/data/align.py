"""Register the history image onto the current one before the network sees the pair (``--align``).

Two passes over the same place never line up exactly: the camera moved, the train ran a little off-centre. A
network trained on aligned pairs flags every edge of a misaligned one. Registration first removes the viewpoint
change, so the network (or differencing) only sees what changed.

- ``ecc``: OpenCV's ECC maximisation of a homography on blurred grey images, coarse to fine over an image pyramid
  (up to `WORK_SIDE` px on the longer side; the found homography is scaled back to the image's size).
- ``features``: ORB keypoints, Lowe's ratio test and a robust (MAGSAC++) homography: faster than ECC and not
  limited to small shifts, but less precise on repetitive patterns (PCB tracks), where ``ecc`` is the choice.

An image larger than `WORK_SIDE` gets a last pass at full size (`_refine`): a 2048x1536 image registered on a
640 px copy is off by half a pixel near its corners, and a 256 px tile sees a part's edge shifted by a pixel as a
change. Squashed to 256x256 the same error is a fifth of a pixel and unseen. The pass also catches a first
estimate that settled in the wrong place.

A registration that fails (ECC does not converge, too few keypoint inliers) or is implausible (a corner moved
more than `MAX_CORNER_SHIFT` of the side, a scale or shear beyond `MAX_SCALE`, a weak correlation after the
warp) falls back to the identity and is reported as failed: an unregistered pair is better than a folded one.

History pixels the warp brings in from outside the frame have no content. They are filled from the current
image, so they read as "no change" there (and relighting leaves them so); a black wedge would be flagged as an
anomaly.

``--relight`` then matches the history's lighting to the current's (`match_lighting`): two captures differ in
exposure, white balance, lamp hot spots, shadows and the camera's black level. Squashed to 256x256 a network sees
the whole image and learns that a change spread over all of it is light; a 256 px tile of a 2048x1536 image sees
only a uniformly darker patch, which looks like a stain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from anodfd.config import ALIGN_METHODS

WORK_SIDE = 640  # registration runs on at most this many pixels along the longer side
MAX_CORNER_SHIFT = 0.15  # of the image side; `anodfd data shift` stress-tests up to 0.04
MAX_SCALE = 1.25  # largest area scale (and smallest 1/x) and anisotropy accepted
MIN_CORRELATION = 0.5  # ECC's correlation of the grey images after the warp
START_PEAKS = 3  # phase-correlation peaks that ECC starts from, beside the identity
MIN_SUPPORT = 1e-3  # a motion model's least-determined direction, relative to a translation's (`_support`)
MIN_INLIERS = 20  # keypoint matches that agree with the RANSAC homography
REFINE_PATCH = 256  # px; the full-size pass measures the shift left in patches this large ...
REFINE_GRID = (7, 5)  # ... on a grid of this many across and down
REFINE_VOTES = 8  # patches that must agree on a correction (and half of those measured): 8 unknowns in a homography
REFINE_ROUNDS = 3  # measurements at most: a first estimate far off needs a second look from the corrected one
LIGHT_SIGMA = 1 / 8  # of the longer side: lighting varies more slowly than anything worth flagging
LIGHT_SIDE = 64  # the local means are taken on a thumbnail this long: lighting is smooth
LIGHT_ROUNDS = 3  # fits of the light field, each without the thumbnail pixels that strayed from the last
LIGHT_SIGMA_FINE = 1 / 16  # then the field is fitted again this narrow, so that it follows a lamp's hot spot ...
LIGHT_FINE_ROUNDS = 2  # ... this many times ...
LIGHT_STRONG = 0.25  # ... without what strays from the wide field by more (a 28% change): no light explains that
LIGHT_STRAY = 0.05  # log-ratio distance from the field (5%) below which a pixel is never called a stray


@dataclass(frozen=True)
class Registration:
    """``matrix`` maps current-image pixel coordinates to history-image ones (3x3); identity when not ``ok``."""

    matrix: np.ndarray
    ok: bool
    reason: str = ""
    seconds: float = 0.0


def register(history: np.ndarray, current: np.ndarray, method: str) -> Registration:
    """The homography from ``current`` to ``history`` (uint8 RGB or grey, same size), or the identity if it failed."""
    if method not in ALIGN_METHODS:
        raise ValueError(f"align method {method!r}: use one of {', '.join(ALIGN_METHODS)}")
    if history.shape[:2] != current.shape[:2]:
        raise ValueError(f"history {history.shape[:2]} and current {current.shape[:2]} differ in size")
    start = time.perf_counter()
    if method == "none":
        return Registration(np.eye(3), True)
    h, w = current.shape[:2]
    factor = min(1.0, WORK_SIDE / max(h, w))
    hist, cur = (_grey(x, factor) for x in (history, current))
    try:
        matrix = _ecc(hist, cur) if method == "ecc" else _features(hist, cur)
        # Back from working pixels to the image's: S M S^-1, S scaling each axis.
        scale = np.diag([w / hist.shape[1], h / hist.shape[0], 1.0])
        matrix = scale @ matrix @ np.linalg.inv(scale)
        if factor < 1:
            matrix = _refine(history, current, matrix)
        matrix /= matrix[2, 2]
        problem = implausible(matrix, w, h)
    except _Failed as e:
        problem = str(e)
    seconds = time.perf_counter() - start
    if problem:
        return Registration(np.eye(3), False, problem, seconds)
    return Registration(matrix, True, "", seconds)


def align_pair(history: np.ndarray, current: np.ndarray, method: str
               ) -> tuple[np.ndarray, Registration, np.ndarray]:
    """``history`` warped onto ``current`` (same size and dtype), the registration that did it, and the HxW mask of
    the pixels taken from ``current`` because the warp brought them in from outside the history's frame."""
    result = register(history, current, method)
    if not result.ok or np.allclose(result.matrix, np.eye(3)):
        return history, result, np.zeros(current.shape[:2], bool)
    warped, filled = warp_onto(history, current, result.matrix)
    return warped, result, filled


def match_lighting(history: np.ndarray, current: np.ndarray, filled: np.ndarray | None = None) -> np.ndarray:
    """``history`` (uint8 HxWx3, registered) relit to ``current`` as ``gain(x) * history + offset``: the gain is the
    ratio of the two images' local means (a Gaussian of `LIGHT_SIGMA` of the longer side), so exposure, white
    balance and smooth light fields cancel while anything smaller than the Gaussian still differs; the offset, one
    per channel, is the cameras' black levels, which a gain alone can only match on average, leaving bright parts
    off (`_black_level`). The fit is repeated without the thumbnail pixels whose own ratio strays from the last
    one, so that a large stain does not pull the light toward itself and fade. Pixels marked in ``filled`` (HxW,
    taken from ``current`` by the registration) play no part in the fit and are returned as they are: relit, a
    copy of current would differ from it. Neither do clipped pixels; a pair with nothing else is returned as is.

    A Gaussian that wide follows a hot spot a few hundred pixels across only halfway, and the half it misses is a
    smooth change of 10+ grey levels over a 256 px tile, which a network trained on native crops flags wherever
    there is texture under it. So the field is then fitted again `LIGHT_FINE_ROUNDS` times at `LIGHT_SIGMA_FINE`,
    with what the wide field could not explain by `LIGHT_STRONG` left in: a hot spot strays from the wide field by
    a few percent, a stain by far more. The narrow field is kept from any stain that strays by more than that; a
    large, faint one (a 25% change over a fifth of the image) it fades more than the wide field alone did."""
    h, w = current.shape[:2]
    f = LIGHT_SIDE / max(h, w)
    thumb = (max(1, round(w * f)), max(1, round(h * f)))

    def small(x: np.ndarray) -> np.ndarray:
        return cv2.resize(x.astype(np.float32), thumb, interpolation=cv2.INTER_AREA).reshape(thumb[1], thumb[0], -1)

    def blur(sigma: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: cv2.GaussianBlur(x, (0, 0), LIGHT_SIDE * sigma, borderType=cv2.BORDER_REFLECT).reshape(x.shape)

    cur, hist = small(current) + 1, small(history) + 1  # +1: no 0/0
    # Fitted on thumbnail pixels made only of pixels that are neither filled nor clipped (0 or 255 in either image):
    # a clipped pixel no longer follows the light, and a filled one is current itself.
    unfit = ((history == 0) | (history == 255) | (current == 0) | (current == 255)).any(axis=-1)
    if filled is not None:
        unfit |= filled
    usable = (small(unfit) < 1e-3).astype(np.float32)
    if not usable.any():  # a binarised pair (DeepPCB's boards) has no light to fit
        return history
    weight, offset = usable, np.zeros(cur.shape[-1], np.float32)
    for r in range(LIGHT_ROUNDS + LIGHT_FINE_ROUNDS):
        local_mean = blur(LIGHT_SIGMA if r < LIGHT_ROUNDS else LIGHT_SIGMA_FINE)
        offset = _black_level(cur, hist, weight, local_mean)
        covered = local_mean(weight)
        field = np.where(covered > 1e-3, local_mean((cur - offset) * weight) / np.maximum(local_mean(hist * weight),
                                                                                          1e-6), 1.0)
        stray = np.abs(np.log(np.maximum(cur - offset, 1) / hist) - np.log(np.maximum(field, 1e-6))).max(
            axis=-1, keepdims=True)
        if r == LIGHT_ROUNDS - 1:  # the wide fit is done: what it cannot explain by LIGHT_STRONG is no light
            usable = usable * (stray < LIGHT_STRONG)
            weight = usable
        else:
            # A pixel strays when it is off by more than 3 robust deviations of the others, and at least LIGHT_STRAY.
            limit = max(LIGHT_STRAY, 3 * 1.4826 * float(np.median(stray[usable > 0])))
            weight = usable * (stray < limit)
    gain = cv2.resize(field.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR).reshape(history.shape)
    relit = np.clip((history.astype(np.float32) + 1) * gain + offset - 1 + 0.5, 0, 255).astype(np.uint8)
    if filled is not None:
        relit[filled] = history[filled]
    return relit


def _black_level(cur: np.ndarray, hist: np.ndarray, weight: np.ndarray, local_mean: Callable) -> np.ndarray:
    """Per channel, the offset b in ``cur = gain * hist + b``. In each neighbourhood the gain is the ratio of the two
    images' local contrasts, taken on their detail (each minus a blur a quarter of the light's width, so that the
    light's own slope across the neighbourhood does not count as contrast), and b is what it leaves of the local
    means. The answer is the median of those local b's, each weighted by its neighbourhood's contrast: a flat patch
    says nothing about b."""
    n = np.maximum(local_mean(weight), 1e-6)
    mean_h, mean_c = local_mean(hist * weight) / n, local_mean(cur * weight) / n
    fine = LIGHT_SIDE * LIGHT_SIGMA / 4
    detail_h, detail_c = (x - cv2.GaussianBlur(x, (0, 0), fine).reshape(x.shape) for x in (hist, cur))
    var_h, var_c = (local_mean(d * d * weight) / n for d in (detail_h, detail_c))
    local = mean_c - np.sqrt(var_c / np.maximum(var_h, 1e-6)) * mean_h
    trust = var_h * weight
    offset = np.zeros(cur.shape[-1], np.float32)
    for k in range(cur.shape[-1]):
        order = np.argsort(local[..., k], axis=None)
        cumulative = np.cumsum(trust[..., k].ravel()[order])
        if cumulative[-1] > 0:
            offset[k] = local[..., k].ravel()[order][np.searchsorted(cumulative, cumulative[-1] / 2)]
    return offset


def prepare_history(history: np.ndarray, current: np.ndarray, align: str, relight: bool
                    ) -> tuple[np.ndarray, Registration]:
    """``history`` as the network sees it beside ``current``: registered by ``align``, then, with ``relight``, relit.
    `anodfd.data.cache.view_pair`, which the decode cache and inference share, calls it."""
    history, registration, filled = align_pair(history, current, align)
    return (match_lighting(history, current, filled) if relight else history), registration


def warp_onto(history: np.ndarray, current: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``history`` resampled at ``matrix`` (current -> history coordinates), and the HxW mask of the pixels taken
    from ``current`` instead: those from outside the history's frame, and the one-pixel rim where interpolation
    blends in the border."""
    h, w = current.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(history, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpPerspective(np.ones(history.shape[:2], np.float32), matrix, (w, h), flags=flags,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    filled = inside < 0.999
    warped[filled] = current[filled]
    return warped, filled


def implausible(matrix: np.ndarray, width: int, height: int) -> str:
    """Why ``matrix`` is not a viewpoint change we believe (empty when it is)."""
    if not np.isfinite(matrix).all():
        return "non-finite homography"
    corners = np.float64([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]])
    mapped = corners @ matrix.T
    if (mapped[:, 2] <= 0).any():
        return "homography folds the image"
    moved = np.abs(mapped[:, :2] / mapped[:, 2:] - corners[:, :2]) / np.float64([width, height])
    if moved.max() > MAX_CORNER_SHIFT:
        return f"a corner moved {moved.max():.0%} of the side (limit {MAX_CORNER_SHIFT:.0%})"
    singular = np.linalg.svd(matrix[:2, :2] / matrix[2, 2], compute_uv=False)
    if singular.max() > MAX_SCALE or singular.min() < 1 / MAX_SCALE:
        return f"scale or shear out of range (singular values {singular.min():.2f}, {singular.max():.2f})"
    return ""


class _Failed(Exception):
    pass


def _grey(image: np.ndarray, factor: float) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    if factor < 1:
        grey = cv2.resize(grey, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    return grey


def _ecc(hist: np.ndarray, cur: np.ndarray, levels: int = 3) -> np.ndarray:
    """ECC (current -> history coordinates) over a pyramid of ``levels``, coarsest first, with the richest motion
    model the pair supports: translation, then affine from the best so far, then a homography. A richer model is
    kept only when the image determines its parameters (`_support`), it is plausible, and it correlates better than
    the one kept. Flat copper with a few long edges pins down a shift but not 8 parameters: a homography fitted to
    it anyway stretches the flat parts at no cost to the correlation, or folds (seen under OpenCV 5.1 on a stand-in
    pair that 5.0 registered). Once supported, any gain in correlation counts: on a binarised board most of the
    misfit is binarisation noise that no motion removes, and asking a richer model for 1% less misfit kept
    translations where the pair had turned (agreement under a known shift fell from 98% to 90% on 50 DeepPCB
    pairs).

    Every candidate is scored by the same measure, `_correlation` at the finest level, and the starts themselves
    are candidates: ECC reports the correlation before its last step and, on a small image with little structure,
    can climb away from a start that was already the best fit."""
    pyramid = [(cur.astype(np.float32), hist.astype(np.float32))]
    for _ in range(levels - 1):
        c, h = pyramid[-1]
        if min(c.shape) < 128:  # a level under 64 px has too little structure for 8 homography parameters
            break
        pyramid.append((cv2.pyrDown(c), cv2.pyrDown(h)))
    (c0, h0), coarse = pyramid[0], pyramid[-1][0]
    up = np.diag([c0.shape[1] / coarse.shape[1], c0.shape[0] / coarse.shape[0], 1.0])
    problems: list[str] = []

    def scored(matrix: np.ndarray | str) -> tuple[float, np.ndarray] | None:
        problem = matrix if isinstance(matrix, str) else implausible(matrix, c0.shape[1], c0.shape[0])
        if problem:
            problems.append(problem)
            return None
        return _correlation(c0, h0, matrix), matrix

    # Several starts: from the identity alone, a shift of a few percent can pull a coarse level into a wrong
    # optimum, and on a periodic pattern (PCB tracks) the strongest phase-correlation peak can be a period off.
    starts = _shift_starts(*pyramid[-1])
    fits = [scored(up @ s @ np.linalg.inv(up)) for s in starts]
    fits += [scored(_ecc_fit(pyramid, s, cv2.MOTION_TRANSLATION)) for s in starts]
    best = max((f for f in fits if f), key=lambda f: f[0], default=None)
    supported = _support(c0)
    for motion in (cv2.MOTION_AFFINE, cv2.MOTION_HOMOGRAPHY):
        if supported[motion] < MIN_SUPPORT:
            break
        start = np.eye(3) if best is None else np.linalg.inv(up) @ best[1] @ up
        fit = scored(_ecc_fit(pyramid, start, motion))
        if fit and (best is None or fit[0] > best[0]):
            best = fit
    if best is None:
        raise _Failed(problems[0])
    if best[0] < MIN_CORRELATION:
        raise _Failed(f"ECC correlation {best[0]:.2f} after the warp (needs {MIN_CORRELATION})")
    return best[1]


def _support(grey: np.ndarray) -> dict[int, float]:
    """How well ``grey``'s structure determines each motion model's parameters: the smallest eigenvalue of the
    Gauss-Newton matrix (J^T J of the image gradients times the warp's derivatives, coordinates scaled to [-1, 1]) for
    affine and homography, relative to a translation's. A straight edge constrains a shift across it, not a stretch
    along it, so an image of a few such edges gives ~0 (real PCB scans and the stand-ins: 0.006 and up)."""
    g = cv2.GaussianBlur(grey, (5, 5), 0)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0) / 8, cv2.Sobel(g, cv2.CV_32F, 0, 1) / 8
    h, w = g.shape
    y, x = np.mgrid[-1:1:h * 1j, -1:1:w * 1j].astype(np.float32)
    radial = gx * x + gy * y
    jacobian = np.stack([gx, gy, gx * x, gx * y, gy * x, gy * y, -x * radial, -y * radial], -1).reshape(-1, 8)
    hessian = jacobian.astype(np.float64).T @ jacobian
    least = {k: float(np.linalg.eigvalsh(hessian[:k, :k])[0]) for k in (2, 6, 8)}
    if least[2] <= 0:
        return {cv2.MOTION_AFFINE: 0.0, cv2.MOTION_HOMOGRAPHY: 0.0}
    return {cv2.MOTION_AFFINE: least[6] / least[2], cv2.MOTION_HOMOGRAPHY: least[8] / least[2]}


def _correlation(cur: np.ndarray, hist: np.ndarray, matrix: np.ndarray) -> float:
    """ECC's measure (zero-mean normalised correlation of the blurred images) between ``cur`` and ``hist`` warped by
    ``matrix``, over the pixels the warp keeps inside history's frame."""
    h, w = cur.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(hist, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpPerspective(np.ones((h, w), np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    if inside.sum() < 16:
        return -1.0
    return float(cv2.computeECC(cv2.GaussianBlur(cur, (5, 5), 0), cv2.GaussianBlur(warped, (5, 5), 0), inside))


def _ecc_fit(pyramid: list[tuple[np.ndarray, np.ndarray]], start: np.ndarray, motion: int) -> np.ndarray | str:
    """ECC of one motion model from ``start`` (3x3, coarsest level's pixels) down the pyramid: the 3x3 matrix at the
    finest level, or why it failed."""
    matrix = start.astype(np.float32)
    previous = None
    for level, (c, h) in enumerate(reversed(pyramid)):
        if previous is not None:
            s = np.diag([c.shape[1] / previous[1], c.shape[0] / previous[0], 1.0]).astype(np.float32)
            matrix = s @ matrix @ np.linalg.inv(s)
        iterations = 60 if level == 0 else 25
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-5)
        warp = matrix if motion == cv2.MOTION_HOMOGRAPHY else matrix[:2] / matrix[2, 2]
        try:
            _, warp = cv2.findTransformECC(c, h, np.ascontiguousarray(warp), motion, criteria, None, 5)
        except cv2.error:
            return "ECC did not converge"
        matrix = warp if motion == cv2.MOTION_HOMOGRAPHY else np.vstack([warp, np.float32([0, 0, 1])])
        previous = c.shape
    return matrix.astype(np.float64) / matrix[2, 2]


def _shift_starts(cur: np.ndarray, hist: np.ndarray) -> list[np.ndarray]:
    """Translations (3x3, current -> history) to start ECC from: the identity, phase correlation's answer (sub-pixel)
    and the next strongest local maxima of its surface, `START_PEAKS` shifts in all (a periodic pattern has several
    peaks of nearly equal height)."""
    window = cv2.createHanningWindow(cur.shape[::-1], cv2.CV_32F)
    shifts = [np.zeros(2), np.float64(cv2.phaseCorrelate(cur, hist, window)[0])]
    spectrum = np.fft.fft2(hist * window) * np.conj(np.fft.fft2(cur * window))
    # Centred, so that the shift 0 sits mid-array and the non-maximum suppression sees neighbours across the wrap.
    surface = np.fft.fftshift(np.fft.ifft2(spectrum / np.maximum(np.abs(spectrum), 1e-9)).real).astype(np.float32)
    peaks = np.where(surface >= cv2.dilate(surface, np.ones((5, 5), np.uint8)), surface, -np.inf)
    centre = np.array(surface.shape[::-1]) // 2
    for index in np.argsort(peaks, axis=None)[::-1]:
        if len(shifts) > START_PEAKS or not np.isfinite(peaks.flat[index]):
            break
        shift = np.array(np.unravel_index(index, surface.shape)[::-1]) - centre
        if min(np.abs(shift - s).max() for s in shifts) > 2:
            shifts.append(shift.astype(np.float64))
    return [np.float64([[1, 0, dx], [0, 1, dy], [0, 0, 1]]) for dx, dy in shifts]


def _refine(history: np.ndarray, current: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` corrected at full size. In each patch of a grid over the image, phase correlation measures the
    shift still left between current and the history warped by ``matrix``, to a few hundredths of a pixel and
    whatever the light; a homography through the patches' centres and their shifted places (MAGSAC++, 0.5 px) is
    the correction. Patches too flat to measure, or with a weak correlation peak (an anomaly), do not vote, and a
    correction needs at least half the votes (and `REFINE_VOTES`) behind it: patches that disagree (a repeating
    pattern) leave ``matrix`` as it is. A correction of more than a pixel means the first estimate was wrong, not just
    imprecise (ECC on a reduced copy settled 20 px off on one stand-in pair under uneven light); the measurement is
    then repeated from the corrected one, up to `REFINE_ROUNDS` times."""
    cur, hist = (_grey(x, 1.0).astype(np.float32) for x in (current, history))
    h, w = cur.shape
    side = min(REFINE_PATCH, h // 2, w // 2)
    window = cv2.createHanningWindow((side, side), cv2.CV_32F)
    corners = np.float64([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]])
    for _ in range(REFINE_ROUNDS):
        warped = cv2.warpPerspective(hist, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_REPLICATE)
        centres, shifted = [], []
        for y in np.linspace(side / 2, h - side / 2, REFINE_GRID[1]):
            for x in np.linspace(side / 2, w - side / 2, REFINE_GRID[0]):
                x0, y0 = int(x - side / 2), int(y - side / 2)
                patch = cur[y0:y0 + side, x0:x0 + side]
                if patch.std() < 4:
                    continue
                (dx, dy), peak = cv2.phaseCorrelate(patch, warped[y0:y0 + side, x0:x0 + side], window)
                if peak > 0.1:
                    centres.append((x0 + side / 2, y0 + side / 2))
                    shifted.append((x0 + side / 2 + dx, y0 + side / 2 + dy))
        if len(centres) < REFINE_VOTES:
            return matrix
        # The correction maps current's pixels to the warped history's: history = matrix @ correction @ current.
        correction, inliers = cv2.findHomography(np.float32(centres), np.float32(shifted), cv2.USAC_MAGSAC, 0.5)
        if correction is None or int(inliers.sum()) < max(REFINE_VOTES, len(centres) / 2):
            return matrix
        moved = corners @ correction.T
        if not np.isfinite(moved).all():
            return matrix
        matrix = matrix @ correction
        if np.abs(moved[:, :2] / moved[:, 2:] - corners[:, :2]).max() < 1:
            break
    return matrix


def _features(hist: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """ORB + ratio test + MAGSAC++ homography (current -> history coordinates)."""
    orb = cv2.ORB_create(nfeatures=3000)
    kc, dc = orb.detectAndCompute(cur, None)
    kh, dh = orb.detectAndCompute(hist, None)
    if dc is None or dh is None or len(kc) < MIN_INLIERS or len(kh) < MIN_INLIERS:
        raise _Failed("too few keypoints")
    good = [m[0] for m in cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(dc, dh, k=2)
            if len(m) == 2 and m[0].distance < 0.8 * m[1].distance]
    if len(good) < MIN_INLIERS:
        raise _Failed(f"{len(good)} keypoint matches (needs {MIN_INLIERS})")
    src = np.float32([kc[m.queryIdx].pt for m in good])
    dst = np.float32([kh[m.trainIdx].pt for m in good])
    matrix, inliers = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, 3.0)
    if matrix is None or int(inliers.sum()) < MIN_INLIERS:
        raise _Failed(f"{0 if inliers is None else int(inliers.sum())} RANSAC inliers (needs {MIN_INLIERS})")
    return matrix

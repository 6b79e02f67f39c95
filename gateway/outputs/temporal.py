"""A clip's depth made steady: per-frame scale/shift alignment and one value range for the whole clip. Pure.

Depth-Anything's relative output is affine-invariant inverse depth: each frame has its own unknown scale
and shift, so consecutive frames of a still scene flicker. ``Aligner`` maps every frame onto the clip's
running reference by a least-squares scale and shift in that inverse-depth space, fitted on a sparse grid
of pixels: started from medians (robust to any minority of outliers), then refitted three times on the 60 %
of pixels that fit best (a trimmed fit: moving objects and the sky, up to about 40 % of the frame, do not
drag it). The reference is a moving average of the frames already aligned,
so each fit chains to the clip's first frame without the drift of fitting frame to frame. Metric
models' scale is meaningful: their frames are never re-scaled. ``temporal: "none"`` keeps every frame as
the network gave it.

``ClipRange`` gathers the clip's exact minimum and maximum (the 16-bit video's mapping, so it round-trips)
and a sparse sample of every frame, whose 1st and 99th percentiles set the colorized video's range: one
range for the clip, never per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

GRID_STEP = 8  # fit on every 8th pixel of every 8th row (7,000 pixels of a 924x518 map)
KEEP = 0.6  # trimmed fit: the 60 % of pixels with the smallest residuals
REFITS = 3
REFERENCE_WEIGHT = 0.9  # of the running reference against the newly aligned frame
RANGE_SAMPLES = 4096  # per frame, for the colorized range's percentiles
COLOR_PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True)
class Alignment:
    scale: float
    shift: float


IDENTITY = Alignment(1.0, 0.0)


def _least_squares(x: np.ndarray, y: np.ndarray) -> Alignment | None:
    spread = x.var()
    if not np.isfinite(spread) or spread <= 1e-12 * max(float(np.abs(x).max(initial=0.0)) ** 2, 1e-30):
        return None
    scale = float(((x - x.mean()) * (y - y.mean())).mean() / spread)
    shift = float(y.mean() - scale * x.mean())
    return Alignment(scale, shift) if np.isfinite(scale) and np.isfinite(shift) and scale > 0 else None


def fit_affine(source: np.ndarray, target: np.ndarray, keep: float = KEEP, refits: int = REFITS) -> Alignment | None:
    """Scale and shift mapping ``source`` onto ``target``: started from the medians and median absolute
    deviations (robust to any minority of outliers), then least squares on the ``keep`` fraction of
    pixels that fit best, ``refits`` times; None when ``source`` is flat or no positive scale fits."""
    x = source.ravel().astype(np.float64)
    y = target.ravel().astype(np.float64)
    x_mid, y_mid = np.median(x), np.median(y)
    x_dev = np.median(np.abs(x - x_mid))
    if not x_dev > 0:
        return _least_squares(x, y)
    scale = np.median(np.abs(y - y_mid)) / x_dev
    fit = Alignment(float(scale), float(y_mid - scale * x_mid)) if scale > 0 else _least_squares(x, y)
    for _ in range(refits):
        if fit is None:
            return None
        residual = np.abs(fit.scale * x + fit.shift - y)
        chosen = residual <= np.quantile(residual, keep)
        fit = _least_squares(x[chosen], y[chosen]) or fit
    return fit


class Aligner:
    """Applies the clip's temporal mode to each frame in order; ``align`` returns the frame and its map."""

    def __init__(self, mode: str, metric: bool) -> None:
        self.active = mode == "align" and not metric
        self.reference: np.ndarray | None = None
        self.last = IDENTITY

    def align(self, depth: np.ndarray) -> tuple[np.ndarray, Alignment]:
        if not self.active:
            return depth, IDENTITY
        sparse = depth[::GRID_STEP, ::GRID_STEP]
        if self.reference is None or self.reference.shape != sparse.shape:
            self.reference = sparse.astype(np.float32)
            return depth, IDENTITY
        fit = fit_affine(sparse, self.reference)
        if fit is None:  # a flat frame: keep the last scale, match the reference's mean
            fit = Alignment(self.last.scale, float(self.reference.mean() - self.last.scale * sparse.mean()))
        self.last = fit
        aligned = depth * np.float32(fit.scale) + np.float32(fit.shift)
        self.reference *= np.float32(REFERENCE_WEIGHT)
        self.reference += np.float32(1 - REFERENCE_WEIGHT) * aligned[::GRID_STEP, ::GRID_STEP]
        return aligned, fit


class ClipRange:
    """The clip's exact range and a sparse sample of its values, frame by frame.

    Frames are added in float32 and stored in float16: the range recorded is the float16 values' (the
    rounding is monotonic, so it is the rounded float32 extremes; no pass over half floats, which NumPy
    reduces slowly)."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self._samples: list[np.ndarray] = []

    def add(self, depth: np.ndarray) -> None:
        low, high, _, _ = cv2.minMaxLoc(depth)
        self.low = min(self.low, float(np.float16(low)))
        self.high = max(self.high, float(np.float16(high)))
        flat = depth.ravel()
        step = max(1, flat.size // RANGE_SAMPLES)
        self._samples.append(flat[::step].astype(np.float32))

    def exact(self) -> tuple[float, float]:
        return self.low, self.high

    def robust(self) -> tuple[float, float]:
        """The 1st and 99th percentiles of the sampled values (the exact range when they coincide)."""
        values = np.concatenate(self._samples) if self._samples else np.zeros(1, np.float32)
        low, high = (float(value) for value in np.percentile(values, COLOR_PERCENTILES))
        return (low, high) if high > low else self.exact()

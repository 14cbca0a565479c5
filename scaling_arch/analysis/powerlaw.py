"""A scaling law: a straight line in log-log space, its alpha, R^2 and a bootstrap confidence interval.

Convention (the same for every architecture, cost axis and metric):

  log y = log c + slope * log x          natural logs; ordinary least squares over the runs
  alpha = direction * slope              alpha > 0: the model gets better as x grows (the paper's reading)

  metric      y (positive)                                   better   direction
  upstream    upstream loss = -eval_neg_log_perplexity       lower    -1   (y = c * x^-alpha)
  downstream  downstream score (0-100)                       higher   +1   (y = c * x^alpha)

  cost axis   x
  flops       total pretraining FLOPs = flops_per_step * steps
  params      parameters (num_params)
  step_time   seconds per pretraining step = 1 / steps_per_sec: the throughput axis, turned into a cost
              so that x grows with the model on every axis and alpha keeps one sign convention

Magnitudes depend on this transform and on the number of steps; compare alphas with each other, not with
the paper's numbers. The raw slope is reported next to alpha.

Bootstrap: the runs (one point per size) are resampled with replacement `n_boot` times (default 2000)
from a fixed seed; a resample with fewer than two distinct x has no line and is dropped; the interval is
the percentile interval of alpha over the rest (95% by default). With three or four sizes the interval is
wide and only roughly calibrated: read it as a measure of how much one size moves the fit.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import numpy as np

from scaling_arch.analysis import AnalysisError

MIN_SIZES = 3
N_BOOT = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Metric:
  """A quality metric, as fitted: the table column of y, and whether lower or higher is better."""
  name: str
  column: str
  direction: int  # +1: higher y is better; -1: lower y is better
  label: str


@dataclasses.dataclass(frozen=True)
class Axis:
  """A cost axis: the table column of x."""
  name: str
  column: str
  label: str


METRICS = {
    "upstream": Metric("upstream", "upstream_loss", -1, "upstream loss (-neg. log-perplexity)"),
    "downstream": Metric("downstream", "downstream_score", +1, "downstream score"),
}
AXES = {
    "flops": Axis("flops", "train_flops", "pretraining FLOPs"),
    "params": Axis("params", "num_params", "parameters"),
    "step_time": Axis("step_time", "step_time", "seconds per step (1/throughput)"),
}


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """A fitted line log y = intercept + slope * log x, with alpha = direction * slope and its bootstrap."""
  n: int
  slope: float
  intercept: float
  direction: int
  r2: float
  ci_low: float
  ci_high: float
  x_min: float
  x_max: float
  boot_slope: np.ndarray = dataclasses.field(repr=False)
  boot_intercept: np.ndarray = dataclasses.field(repr=False)

  @property
  def alpha(self) -> float:
    return self.direction * self.slope

  def predict(self, x) -> np.ndarray:
    """y at cost x, from the fitted line."""
    return np.exp(self.intercept + self.slope * np.log(np.asarray(x, dtype=float)))

  def predict_interval(self, x, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap percentile interval of the fitted y at cost x."""
    lx = np.log(np.asarray(x, dtype=float))
    samples = np.exp(self.boot_intercept[:, None] + self.boot_slope[:, None] * np.atleast_1d(lx)[None, :])
    tail = 100 * (1 - level) / 2
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100 - tail, axis=0)


def _line(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float, float]:
  """(slope, intercept, R^2) of least squares of ly on lx."""
  xc, yc = lx - lx.mean(), ly - ly.mean()
  slope = float((xc * yc).sum() / (xc * xc).sum())
  intercept = float(ly.mean() - slope * lx.mean())
  total = float((yc * yc).sum())
  residual = float(((ly - intercept - slope * lx) ** 2).sum())
  return slope, intercept, (1.0 - residual / total) if total > 0 else float("nan")


def bootstrap_lines(lx: np.ndarray, ly: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Slopes and intercepts of `n_boot` case resamples (with replacement), degenerate ones dropped."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(lx), size=(n_boot, len(lx)))
  bx, by = lx[idx], ly[idx]
  keep = np.ptp(bx, axis=1) > 0
  bx, by = bx[keep], by[keep]
  xm, ym = bx.mean(axis=1, keepdims=True), by.mean(axis=1, keepdims=True)
  slope = ((bx - xm) * (by - ym)).sum(axis=1) / ((bx - xm) ** 2).sum(axis=1)
  return slope, ym[:, 0] - slope * xm[:, 0]


def fit_power_law(x, y, *, direction: int = 1, what: str = "fit", n_boot: int = N_BOOT, seed: int = 0,
                  level: float = LEVEL, min_sizes: int = MIN_SIZES) -> PowerLawFit:
  """Fits y = c * x^slope (a line in log-log space) over the points (x, y), one per size.

  Args:
    x, y: costs and metric values, positive and finite.
    direction: +1 when higher y is better, -1 when lower is; alpha = direction * slope.
    what: names the series in error messages, e.g. 'vanilla upstream vs flops'.
    n_boot, seed, level: the bootstrap (see the module docstring).
    min_sizes: the fewest distinct x accepted.

  Raises:
    AnalysisError: fewer than `min_sizes` distinct x, or a value that is not positive and finite.
  """
  x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
  if x.shape != y.shape or x.ndim != 1:
    raise AnalysisError(f"{what}: x and y must be 1-D and of one length (got {x.shape} and {y.shape}).")
  bad = ~(np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0))
  if bad.any():
    raise AnalysisError(f"{what}: {int(bad.sum())} point(s) are not positive and finite (x={x[bad].tolist()}, "
                        f"y={y[bad].tolist()}); a power law needs positive values: drop those runs.")
  sizes = len(np.unique(x))
  if sizes < min_sizes:
    raise AnalysisError(f"{what}: {sizes} distinct size(s); a scaling law needs at least {min_sizes}: train "
                        "more sizes of this architecture or leave it out.")
  lx, ly = np.log(x), np.log(y)
  slope, intercept, r2 = _line(lx, ly)
  boot_slope, boot_intercept = bootstrap_lines(lx, ly, n_boot, seed)
  tail = 100 * (1 - level) / 2
  alphas = direction * boot_slope
  return PowerLawFit(n=len(x), slope=slope, intercept=intercept, direction=direction, r2=r2,
                     ci_low=float(np.percentile(alphas, tail)), ci_high=float(np.percentile(alphas, 100 - tail)),
                     x_min=float(x.min()), x_max=float(x.max()), boot_slope=boot_slope,
                     boot_intercept=boot_intercept)


def seed_for(*names: str, base: int = 0) -> int:
  """A stable seed per fitted series, so that different architectures get independent resamples."""
  return (zlib.crc32("/".join(names).encode()) + base) % (2 ** 32)


def maybe_fit(x, y, **kwargs) -> tuple[Optional[PowerLawFit], str]:
  """(fit, '') or (None, the reason it could not be fitted)."""
  try:
    return fit_power_law(x, y, **kwargs), ""
  except AnalysisError as e:
    return None, str(e)

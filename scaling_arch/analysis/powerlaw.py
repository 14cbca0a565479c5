"""A scaling law: a straight line in log-log space, its alpha, R^2 and a bootstrap confidence interval.

Convention (the same for every architecture, cost axis and metric):

  log y = log c + slope * log x          natural logs; ordinary least squares over the points (sizes)
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

Seeds: a point (one size of the ladder or variant of a series) may have several runs, its seed replicates
(launch/grid.py's seed knob). The line is fitted through the seed means, one point per size: x and y are
the means of the point's runs (arithmetic, before the logs), and R^2 is that of the fit of the means. Each
fit reports the seeds per point (min / max) and the pooled seed standard deviation of y, sqrt(sum over
points of the squared deviations from the point's mean / sum over points of (seeds - 1)), NaN when no point
has two seeds.

Bootstrap (two levels): `n_boot` times (default 2000), from a fixed seed, the points are resampled with
replacement and, within each drawn point, its seeds are resampled with replacement; the line is fitted
through the means of the drawn seeds. So the interval holds both how much one size moves the fit and the
scatter between seeds (a fit of the means alone would see the latter only through the means). With one run
per point the seed level draws nothing and this is the plain case bootstrap of the runs, with the same
numbers as before seeds existed. A resample with fewer than two distinct points or x has no line and is
dropped; the interval is the percentile interval of alpha over the rest (95% by default). With three or
four sizes the interval is wide and only roughly calibrated: read it as a measure of how much one size (and
its seeds) moves the fit.
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
  seeds_min: int = 1  # the fewest runs (seeds) of a point
  seeds_max: int = 1
  seed_sd: float = float("nan")  # pooled standard deviation of y between the seeds of a point

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


@dataclasses.dataclass(frozen=True)
class Seeds:
  """The runs of a fit grouped by point: row i holds point i's seeds in its first count[i] columns (the
  rest NaN), points in the order of their first run."""
  x: np.ndarray  # (points, most seeds)
  y: np.ndarray
  count: np.ndarray  # (points,) seeds per point

  @property
  def mean_x(self) -> np.ndarray:
    return _means(self.x, self.count)

  @property
  def mean_y(self) -> np.ndarray:
    return _means(self.y, self.count)

  @property
  def pooled_sd(self) -> float:
    """The pooled standard deviation of y between seeds of a point (NaN when no point has two)."""
    dof = int((self.count - 1).sum())
    squares = np.nansum((self.y - self.mean_y[:, None]) ** 2)
    return float(np.sqrt(squares / dof)) if dof else float("nan")


def _means(values: np.ndarray, count: np.ndarray) -> np.ndarray:
  """Row means of the first count[i] entries of each row (exactly the value for a row of one)."""
  valid = np.arange(values.shape[-1]) < count[..., None]
  return np.where(valid, values, 0.0).sum(axis=-1) / count


def group_seeds(x: np.ndarray, y: np.ndarray, groups=None) -> Seeds:
  """The runs (x, y) grouped by `groups` (a point label per run; None: every run its own point)."""
  labels = np.arange(len(x)) if groups is None else np.asarray(groups)
  _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")  # points in the order of their first run
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  point = rank[inverse.reshape(-1)]
  count = np.bincount(point, minlength=len(order))
  slot = np.zeros(len(x), dtype=int)
  for i, p in enumerate(point):
    slot[i] = (point[:i] == p).sum()
  gx, gy = np.full((len(order), count.max()), np.nan), np.full((len(order), count.max()), np.nan)
  gx[point, slot], gy[point, slot] = x, y
  return Seeds(gx, gy, count)


def bootstrap_lines(seeds: Seeds, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Slopes and intercepts of `n_boot` two-level resamples (points, then the seeds of each drawn point,
  with replacement; see the module docstring), degenerate ones dropped."""
  rng = np.random.default_rng(seed)
  n = len(seeds.count)
  idx = rng.integers(0, n, size=(n_boot, n))
  if seeds.count.max() > 1:
    count = seeds.count[idx]
    pick = rng.integers(0, count[..., None], size=(*idx.shape, seeds.x.shape[1]))
    bx = np.log(_means(seeds.x[idx[..., None], pick], count))
    by = np.log(_means(seeds.y[idx[..., None], pick], count))
  else:
    bx, by = np.log(seeds.x[:, 0])[idx], np.log(seeds.y[:, 0])[idx]
  keep = (np.ptp(bx, axis=1) > 0) & (idx != idx[:, :1]).any(axis=1)
  bx, by = bx[keep], by[keep]
  xm, ym = bx.mean(axis=1, keepdims=True), by.mean(axis=1, keepdims=True)
  slope = ((bx - xm) * (by - ym)).sum(axis=1) / ((bx - xm) ** 2).sum(axis=1)
  return slope, ym[:, 0] - slope * xm[:, 0]


def fit_power_law(x, y, *, direction: int = 1, what: str = "fit", n_boot: int = N_BOOT, seed: int = 0,
                  level: float = LEVEL, min_sizes: int = MIN_SIZES, groups=None) -> PowerLawFit:
  """Fits y = c * x^slope (a line in log-log space) through the points' seed means (x, y).

  Args:
    x, y: costs and metric values of the runs, positive and finite.
    direction: +1 when higher y is better, -1 when lower is; alpha = direction * slope.
    what: names the series in error messages, e.g. 'vanilla upstream vs flops'.
    n_boot, seed, level: the bootstrap (see the module docstring).
    min_sizes: the fewest distinct x (of the points' means) accepted.
    groups: the point of each run (e.g. its variant without the seed knob): the runs of one point are its
      seeds; None: every run is a point of its own.

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
  if groups is not None and len(groups) != len(x):
    raise AnalysisError(f"{what}: {len(groups)} group labels for {len(x)} runs; give one per run.")
  seeds = group_seeds(x, y, groups)
  mx, my = seeds.mean_x, seeds.mean_y
  sizes = len(np.unique(mx))
  if sizes < min_sizes:
    raise AnalysisError(f"{what}: {sizes} distinct size(s); a scaling law needs at least {min_sizes}: train "
                        "more sizes of this architecture or leave it out.")
  slope, intercept, r2 = _line(np.log(mx), np.log(my))
  boot_slope, boot_intercept = bootstrap_lines(seeds, n_boot, seed)
  tail = 100 * (1 - level) / 2
  alphas = direction * boot_slope
  return PowerLawFit(n=len(mx), slope=slope, intercept=intercept, direction=direction, r2=r2,
                     ci_low=float(np.percentile(alphas, tail)), ci_high=float(np.percentile(alphas, 100 - tail)),
                     x_min=float(mx.min()), x_max=float(mx.max()), boot_slope=boot_slope,
                     boot_intercept=boot_intercept, seeds_min=int(seeds.count.min()),
                     seeds_max=int(seeds.count.max()), seed_sd=seeds.pooled_sd)


def seed_for(*names: str, base: int = 0) -> int:
  """A stable seed per fitted series, so that different architectures get independent resamples."""
  return (zlib.crc32("/".join(names).encode()) + base) % (2 ** 32)


def maybe_fit(x, y, **kwargs) -> tuple[Optional[PowerLawFit], str]:
  """(fit, '') or (None, the reason it could not be fitted)."""
  try:
    return fit_power_law(x, y, **kwargs), ""
  except AnalysisError as e:
    return None, str(e)

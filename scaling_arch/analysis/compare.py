"""Comparisons between fitted scaling laws, beyond the paper's alphas.

- Crossover: two lines in log-log space meet at log x* = (b_B - b_A) / (a_A - a_B) (a slopes, b
  intercepts). Its interval pairs the i-th bootstrap line of A with the i-th of B (independent resamples:
  each architecture's runs are its own), keeps the pairs that meet inside the search range (the observed
  costs of both, widened by `range_factor` on each side) and takes the percentile interval of x* over them;
  `support` is the share of pairs that do. Equal slopes, or lines that meet outside the range: no crossover.
- Regions: on a log grid over the observed costs, the best fitted curve (lowest loss / highest score) among
  the architectures whose own observed range covers that cost (no extrapolation); runs of one leader
  make a region.
- Extrapolation check: fit on all but the largest cost, predict the largest, report the relative error
  (predicted - actual) / actual and whether the bootstrap interval of the prediction covers it.
- Rank correlation: Spearman's rho between upstream and downstream quality across architectures; it needs
  three or more architectures with both, and is not reported (a note says why) otherwise. The p-value is
  exact (all orderings enumerated) for up to `EXACT_P_MAX` architectures, else scipy's t approximation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from scaling_arch.analysis import AnalysisError
from scaling_arch.analysis.powerlaw import LEVEL, MIN_SIZES, PowerLawFit, fit_power_law


@dataclasses.dataclass(frozen=True)
class Crossover:
  """Where the curve of B crosses the curve of A, if it does within the search range."""
  found: bool
  x: float = math.nan
  ci_low: float = math.nan
  ci_high: float = math.nan
  support: float = 0.0  # share of bootstrap pairs that cross inside the range
  better_below: str = ""  # 'a' or 'b': the better one at costs below x
  better_above: str = ""
  within_observed: bool = False  # x lies within the costs both were trained at
  note: str = ""


def _better(fa: PowerLawFit, fb: PowerLawFit, lx: float) -> str:
  ya, yb = fa.intercept + fa.slope * lx, fb.intercept + fb.slope * lx
  return "a" if fa.direction * (ya - yb) > 0 else "b"


def crossover(fa: PowerLawFit, fb: PowerLawFit, *, range_factor: float = 10.0, level: float = LEVEL) -> Crossover:
  """The cost at which the fitted curves of A and B cross (see the module docstring)."""
  if fa.direction != fb.direction:
    raise AnalysisError("crossover: the two fits are of metrics with opposite directions; compare one metric.")
  lo = math.log(min(fa.x_min, fb.x_min) / range_factor)
  hi = math.log(max(fa.x_max, fb.x_max) * range_factor)
  gap = fa.slope - fb.slope
  if abs(gap) < 1e-12:
    return Crossover(False, note="equal slopes: the curves do not cross")
  lx = (fb.intercept - fa.intercept) / gap
  if not lo <= lx <= hi:
    return Crossover(False, note=f"the lines meet at {math.exp(lx):.3g}, outside the range "
                                 f"[{math.exp(lo):.3g}, {math.exp(hi):.3g}]")
  m = min(len(fa.boot_slope), len(fb.boot_slope))
  with np.errstate(divide="ignore", invalid="ignore"):
    boot = (fb.boot_intercept[:m] - fa.boot_intercept[:m]) / (fa.boot_slope[:m] - fb.boot_slope[:m])
  inside = boot[np.isfinite(boot) & (boot >= lo) & (boot <= hi)]
  tail = 100 * (1 - level) / 2
  ci = (np.percentile(inside, [tail, 100 - tail]) if len(inside) else (math.nan, math.nan))
  x = math.exp(lx)
  return Crossover(True, x=x, ci_low=math.exp(ci[0]), ci_high=math.exp(ci[1]),
                   support=len(inside) / m if m else 0.0, better_below=_better(fa, fb, lx - 1.0),
                   better_above=_better(fa, fb, lx + 1.0),
                   within_observed=max(fa.x_min, fb.x_min) <= x <= min(fa.x_max, fb.x_max))


def best_regions(fits: Mapping[str, PowerLawFit], n_grid: int = 400) -> list[tuple[str, float, float]]:
  """[(architecture, cost from, cost to)]: contiguous cost ranges where one fitted curve is best."""
  if not fits:
    return []
  lo = math.log(min(f.x_min for f in fits.values()))
  hi = math.log(max(f.x_max for f in fits.values()))
  grid = np.linspace(lo, hi, n_grid)
  leaders = []
  for lx in grid:
    scores = {name: f.direction * (f.intercept + f.slope * lx) for name, f in fits.items()
              if math.log(f.x_min) - 1e-9 <= lx <= math.log(f.x_max) + 1e-9}
    leaders.append(max(scores, key=scores.get) if scores else "")
  regions: list[tuple[str, float, float]] = []
  start = 0
  for i in range(1, n_grid + 1):
    if i == n_grid or leaders[i] != leaders[start]:
      left = grid[0] if start == 0 else (grid[start - 1] + grid[start]) / 2
      right = grid[-1] if i == n_grid else (grid[i - 1] + grid[i]) / 2
      if leaders[start]:
        regions.append((leaders[start], math.exp(left), math.exp(right)))
      start = i
  return regions


@dataclasses.dataclass(frozen=True)
class Extrapolation:
  """Fit on all but the largest cost, then predict the largest."""
  n_fit: int
  x: float
  actual: float
  predicted: float
  pred_low: float
  pred_high: float

  @property
  def rel_error(self) -> float:
    return (self.predicted - self.actual) / self.actual

  @property
  def covered(self) -> bool:
    return bool(self.pred_low <= self.actual <= self.pred_high)


def extrapolate(x, y, *, direction: int = 1, what: str = "extrapolation", **fit_kwargs) -> Extrapolation:
  """Holds out the points at the largest x, fits the rest, predicts the held-out mean; needs
  `MIN_SIZES + 1` distinct x (AnalysisError otherwise)."""
  x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
  if len(np.unique(x)) < MIN_SIZES + 1:
    raise AnalysisError(f"{what}: {len(np.unique(x))} distinct size(s); the extrapolation check needs "
                        f"{MIN_SIZES + 1} (fit on {MIN_SIZES}, predict one).")
  held = x == x.max()
  fit = fit_power_law(x[~held], y[~held], direction=direction, what=what, **fit_kwargs)
  low, high = fit.predict_interval([x.max()])
  return Extrapolation(n_fit=int((~held).sum()), x=float(x.max()), actual=float(y[held].mean()),
                       predicted=float(fit.predict(x.max())), pred_low=float(low[0]), pred_high=float(high[0]))


@dataclasses.dataclass(frozen=True)
class RankCorrelation:
  """Spearman's rho between two qualities across architectures (NaN with a note when it cannot be had)."""
  n: int
  rho: float
  p_value: float
  note: str = ""


def rank_correlation(names: Sequence[str], upstream: Sequence[float], downstream: Sequence[float],
                     min_n: int = 3) -> RankCorrelation:
  """Spearman's rho of the architectures' upstream and downstream quality (both: higher is better)."""
  up, down = np.asarray(upstream, dtype=float), np.asarray(downstream, dtype=float)
  both = np.isfinite(up) & np.isfinite(down)
  n = int(both.sum())
  if n < min_n:
    have = ", ".join(np.asarray(names)[both]) or "none"
    return RankCorrelation(n, math.nan, math.nan, f"needs {min_n} architectures with both qualities (have: {have})")
  if np.ptp(up[both]) == 0 or np.ptp(down[both]) == 0:
    return RankCorrelation(n, math.nan, math.nan, "all architectures tie on one quality")
  result = stats.spearmanr(up[both], down[both])
  rho = float(result.statistic)
  return RankCorrelation(n, rho, _exact_p(up[both], down[both], rho) if n <= EXACT_P_MAX else float(result.pvalue))


EXACT_P_MAX = 8


def _exact_p(up: np.ndarray, down: np.ndarray, rho: float) -> float:
  """Two-sided permutation p-value of Spearman's rho: the share of orderings at least as extreme."""
  ru, rd = stats.rankdata(up), stats.rankdata(down)
  perms = rd[np.array(list(itertools.permutations(range(len(rd)))))]
  ru, perms = ru - ru.mean(), perms - perms.mean(axis=1, keepdims=True)
  rhos = (perms @ ru) / (np.linalg.norm(perms, axis=1) * np.linalg.norm(ru))
  return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


def overlap(fits: Sequence[PowerLawFit]) -> Optional[tuple[float, float]]:
  """The cost range every fit covers, or None."""
  lo, hi = max(f.x_min for f in fits), min(f.x_max for f in fits)
  return (lo, hi) if fits and lo <= hi else None

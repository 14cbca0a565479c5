"""The study's qualitative findings, checked against one experiment: agrees, disagrees, or not measurable.

Each row names a finding of Tay et al. (2022) (reference/study.md; the README's list), what the paper
measured, what this experiment's fits measured, and a verdict:

  agrees          the experiment shows it, beyond its own uncertainty (below)
  disagrees       the experiment shows the opposite, beyond its uncertainty
  not measurable  the difference is within the uncertainty, or a fit it needs is missing; the row says
                  which way the point estimates lean

Uncertainty: alphas are compared through their bootstrap resamples (powerlaw.py): "A's alpha is above B's"
is shown when at least 95% of (resample of A, resample of B) pairs have it so. Scores at one point are
compared through their seed means and the pooled seed standard deviation (all points' seeds together): a
gap is shown when it exceeds twice its standard error (with at least two seeds on each side). Downstream findings also need the downstream
score to be measurable at all: some architecture's downstream alpha interval excludes zero, or (given the
task's chance level) some point's seed mean is more than three standard errors above chance (three, not
two: with dozens of points, some would pass two by chance alone).

`targets()` is the acceptance check of the CPU study (issue 16): the baseline's upstream alpha against
FLOPs with an interval that excludes zero and R^2 >= 0.95, and R^2 >= 0.9 for at least 9 of 12
architectures.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import pandas as pd

if TYPE_CHECKING:
  from scaling_arch.analysis.study import Study

SHOWN = 0.95  # share of bootstrap pairs for "A's alpha is above B's"
ABOVE_CHANCE_SE = 3  # a point's downstream mean above chance by this many standard errors (many points tried)
COLUMNS = ["finding", "paper", "this study", "verdict"]


def _fit(study: Study, metric: str, arch: str, axis: str = "flops"):
  return study.fits.get((metric, axis, arch))


def above_share(a, b) -> float:
  """The share of (resample of a, resample of b) pairs in which a's alpha is above b's."""
  sa = np.sort(a.direction * np.asarray(a.boot_slope, dtype=float))
  sb = b.direction * np.asarray(b.boot_slope, dtype=float)
  if not len(sa) or not len(sb):
    return math.nan
  return float(np.mean(len(sa) - np.searchsorted(sa, sb, side="right")) / len(sa))


def _alpha(fit) -> str:
  return f"{fit.alpha:+.4f} [{fit.ci_low:+.4f}, {fit.ci_high:+.4f}]"


def _ordered_points(study: Study, baseline: str) -> list[str]:
  """The fitted points, cheapest first (by the baseline's FLOPs, else any architecture's)."""
  m = study.means
  ref = m[m.architecture == baseline] if (m.architecture == baseline).any() else m
  return list(ref.groupby("point", sort=False).train_flops.mean().sort_values().index)


def pooled_sd(study: Study, column: str) -> float:
  """The pooled standard deviation of `column` between the seeds of a point, over every fitted point (NaN
  without a point of two seeds): one scatter for all points, since two seeds alone estimate it poorly."""
  runs = study.points[np.isfinite(study.points[column])]
  grouped = runs.groupby(["architecture", "point"])[column]
  dof = (grouped.count() - 1).clip(lower=0).sum()
  if dof < 1:
    return math.nan
  return float(math.sqrt(grouped.apply(lambda v: ((v - v.mean()) ** 2).sum()).sum() / dof))


def _score(study: Study, arch: str, point: str, column: str) -> Optional[tuple[float, float, int]]:
  """(seed mean, pooled seed sd, seeds) of `column` at one point, or None."""
  row = study.means[(study.means.architecture == arch) & (study.means.point == point)]
  if row.empty or not np.isfinite(row[column].iloc[0]):
    return None
  return float(row[column].iloc[0]), pooled_sd(study, column), int(row.seeds.iloc[0])


def _gap(a, b) -> tuple[float, float]:
  """(a mean - b mean, its standard error from the pooled seed sd; NaN with fewer than 2 seeds on a side)."""
  if a[2] < 2 or b[2] < 2 or not (np.isfinite(a[1]) and np.isfinite(b[1])):
    return a[0] - b[0], math.nan
  return a[0] - b[0], math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])


def downstream_measurable(study: Study, chance: Optional[float]) -> tuple[bool, str]:
  """Whether the downstream score carries signal here, and the evidence in words."""
  excl = sorted(a for (m, x, a), f in study.fits.items() if (m, x) == ("downstream", "flops")
                and (f.ci_low > 0 or f.ci_high < 0))
  above = []
  if chance is not None:
    m = study.means[np.isfinite(study.means.downstream_score)]
    sd = pooled_sd(study, "downstream_score")
    for r in m.itertuples():
      if r.seeds >= 2 and np.isfinite(sd) and r.downstream_score - chance > ABOVE_CHANCE_SE * sd / math.sqrt(r.seeds):
        above.append(f"{r.architecture} {r.point}")
  if not study.means.downstream_score.notna().any():
    return False, "no run has a downstream score"
  parts = [f"downstream alpha interval excludes 0 for {len(excl)} architecture(s)"
           + (f" ({', '.join(excl)})" if excl else "")]
  if chance is not None:
    parts.append(f"{len(above)} of {int(study.means.downstream_score.notna().sum())} points are more than "
                 f"{ABOVE_CHANCE_SE} standard errors above chance ({chance:g})")
  return bool(excl or above), "; ".join(parts)


def _compare_alpha(study, metric, a, b, finding, paper, expect_a_above: bool) -> dict:
  """A row for 'a's alpha is above b's' (expect_a_above) or below it."""
  fa, fb = _fit(study, metric, a), _fit(study, metric, b)
  if fa is None or fb is None:
    missing = " and ".join(x for x, f in ((a, fa), (b, fb)) if f is None)
    return {"finding": finding, "paper": paper, "this study": f"no {metric} fit vs FLOPs for {missing}",
            "verdict": "not measurable"}
  share = above_share(fa, fb)
  here = (f"{metric} alpha vs FLOPs: {a} {_alpha(fa)}, {b} {_alpha(fb)}; {a} above {b} in {share:.0%} of "
          "bootstrap pairs")
  agree_share = share if expect_a_above else 1 - share
  if agree_share >= SHOWN:
    verdict = "agrees"
  elif agree_share <= 1 - SHOWN:
    verdict = "disagrees"
  else:
    verdict = "not measurable"
    here += f" (leans {'the same way' if agree_share > 0.5 else 'the other way'})"
  return {"finding": finding, "paper": paper, "this study": here, "verdict": verdict}


def _differ(study: Study) -> dict:
  archs = sorted(a for (m, x, a) in study.fits if (m, x) == ("upstream", "flops"))
  finding, paper = "Architectures scale differently", "alphas differ greatly between architectures"
  if len(archs) < 2:
    return {"finding": finding, "paper": paper, "this study": "fewer than 2 upstream fits",
            "verdict": "not measurable"}
  fits = {a: _fit(study, "upstream", a) for a in archs}
  lo, hi = min(archs, key=lambda a: fits[a].alpha), max(archs, key=lambda a: fits[a].alpha)
  pairs = [(a, b) for a in archs for b in archs if a != b and above_share(fits[a], fits[b]) >= 0.975]
  here = (f"upstream alpha vs FLOPs from {fits[lo].alpha:+.4f} ({lo}) to {fits[hi].alpha:+.4f} ({hi}); "
          f"{len(pairs)} ordered pairs of {len(archs) * (len(archs) - 1)} differ beyond 97.5% of bootstrap pairs")
  return {"finding": finding, "paper": paper, "this study": here,
          "verdict": "agrees" if pairs else "not measurable"}


def _best_slope(study: Study, metric: str, baseline: str, paper: str) -> dict:
  finding = f"{baseline} has the best {metric} slope"
  archs = sorted(a for (m, x, a) in study.fits if (m, x) == (metric, "flops"))
  base = _fit(study, metric, baseline)
  if base is None or len(archs) < 2:
    why = f"no {metric} fit vs FLOPs for {baseline}" if base is None else f"only {baseline} has a {metric} fit"
    return {"finding": finding, "paper": paper, "this study": why, "verdict": "not measurable"}
  ranked = sorted(archs, key=lambda a: -_fit(study, metric, a).alpha)
  rank = ranked.index(baseline) + 1
  steeper = [a for a in archs if a != baseline and above_share(_fit(study, metric, a), base) >= SHOWN]
  here = f"{baseline} ranks {rank} of {len(archs)} by {metric} alpha vs FLOPs ({_alpha(base)})"
  if rank == 1:
    second = _fit(study, metric, ranked[1])
    share = above_share(base, second)
    here += f"; above the next ({ranked[1]}, {second.alpha:+.4f}) in {share:.0%} of bootstrap pairs"
    verdict = "agrees" if share >= SHOWN else "not measurable"
  elif steeper:
    here += f"; steeper beyond the bootstrap: {', '.join(steeper)}"
    verdict = "disagrees"
  else:
    here += f"; steeper point estimates ({', '.join(ranked[:rank - 1])}) are within the bootstrap"
    verdict = "not measurable"
  return {"finding": finding, "paper": paper, "this study": here, "verdict": verdict}


def _albert_downstream(study: Study, measurable: bool, evidence: str) -> dict:
  finding, paper = "ALBERT scales negatively downstream", "ALBERT's downstream alpha about -0.12"
  fit = _fit(study, "downstream", "albert")
  if fit is None:
    return {"finding": finding, "paper": paper, "this study": "no downstream fit vs FLOPs for albert",
            "verdict": "not measurable"}
  here = f"albert downstream alpha vs FLOPs {_alpha(fit)}"
  if not measurable:
    return {"finding": finding, "paper": paper, "this study": f"{here}; downstream not measurable ({evidence})",
            "verdict": "not measurable"}
  verdict = "agrees" if fit.ci_high < 0 else "disagrees" if fit.ci_low > 0 else "not measurable"
  return {"finding": finding, "paper": paper, "this study": here, "verdict": verdict}


def _evolved_small(study: Study, baseline: str, measurable: bool, evidence: str) -> list[dict]:
  points = _ordered_points(study, baseline)
  rows = []
  for column, metric, sign in (("downstream_score", "downstream", +1), ("upstream_loss", "upstream", -1)):
    finding = f"Evolved beats {baseline} at the smallest size, not at the largest ({metric})"
    paper = ("Evolved Transformer wins downstream at tiny/small scale and falls behind when scaled up"
             if metric == "downstream" else "(the paper states it downstream; upstream for comparison)")
    cells = []
    verdicts = []
    for point in (points[0], points[-1]) if points else ():
      e, v = _score(study, "evolved", point, column), _score(study, baseline, point, column)
      if e is None or v is None:
        cells.append(f"{point}: missing")
        verdicts.append(None)
        continue
      gap, se = _gap(e, v)
      gap *= sign  # > 0: evolved better
      shown = np.isfinite(se) and abs(gap) > 2 * se
      cells.append(f"{point}: evolved {e[0]:.4g} vs {baseline} {v[0]:.4g} (evolved better by {gap:+.4g}, "
                   f"2 s.e. {2 * se:.2g})")
      verdicts.append((gap > 0, shown))
    if len(verdicts) < 2 or None in verdicts or (metric == "downstream" and not measurable):
      verdict = "not measurable"
      if metric == "downstream" and not measurable:
        cells.append(f"downstream not measurable ({evidence})")
    else:
      (small_better, small_shown), (large_better, large_shown) = verdicts
      if small_better and small_shown and not (large_better and large_shown):
        verdict = "agrees"
      elif (not small_better and small_shown) or (large_better and large_shown):
        verdict = "disagrees"
      else:
        verdict = "not measurable"
    rows.append({"finding": finding, "paper": paper, "this study": "; ".join(cells), "verdict": verdict})
  return rows


def _upstream_predicts_downstream(study: Study, measurable: bool, evidence: str) -> dict:
  finding = "Upstream quality does not reliably predict downstream"
  paper = "rankings by upstream and by downstream quality differ"
  rc = study.rank_correlation[study.rank_correlation.matched.str.startswith("size ")]
  rc = rc[np.isfinite(rc.rho)]
  if rc.empty:
    return {"finding": finding, "paper": paper, "this study": "no rank correlation could be computed",
            "verdict": "not measurable"}
  here = "Spearman rho across architectures: " + ", ".join(
      f"{r.matched[5:]} {r.rho:+.2f} (p {r.p_value:.2g})" for r in rc.itertuples())
  if not measurable:
    return {"finding": finding, "paper": paper, "this study": f"{here}; downstream not measurable ({evidence})",
            "verdict": "not measurable"}
  strong = (rc.rho > 0) & (rc.p_value < 0.05)
  verdict = "disagrees" if strong.all() else "agrees"
  return {"finding": finding, "paper": paper, "this study": here, "verdict": verdict}


def _best_changes(study: Study, baseline: str) -> dict:
  finding = "The best architecture changes with scale"
  paper = "Evolved best small, vanilla larger; MoS wins only in some compute regions"
  points = _ordered_points(study, baseline)
  if not points:
    return {"finding": finding, "paper": paper, "this study": "no fitted points", "verdict": "not measurable"}
  m = study.means
  best = [m[m.point == p].sort_values("upstream_loss").architecture.iloc[0] for p in (points[0], points[-1])]
  here = f"lowest upstream loss (seed means): {best[0]} at {points[0]}, {best[1]} at {points[-1]}"
  c = study.crossovers
  crossed = c[c.found.astype(bool) & (c.metric == "upstream") & (c.axis == "flops") & c.within_observed.astype(bool)]
  sure = crossed[crossed.support >= SHOWN]
  here += (f"; {len(crossed)} upstream crossovers within the trained FLOPs, {len(sure)} with >= {SHOWN:.0%} "
           "bootstrap support" + (": " + ", ".join(f"{r.better_above} overtakes {r.better_below} at {r.x:.3g}"
                                                      for r in sure.head(4).itertuples()) if len(sure) else ""))
  verdict = "agrees" if len(sure) else "not measurable"
  return {"finding": finding, "paper": paper, "this study": here, "verdict": verdict}


def findings(study: Study, *, baseline: str = "vanilla", chance: Optional[float] = None) -> pd.DataFrame:
  """The comparison table: one row per finding of the paper (COLUMNS)."""
  measurable, evidence = downstream_measurable(study, chance)
  rows = [_differ(study),
          _best_slope(study, "upstream", baseline, "vanilla upstream alpha about 0.54 vs FLOPs, the best"),
          _best_slope(study, "downstream", baseline, "vanilla downstream alpha about 0.28 vs FLOPs, the best"),
          _compare_alpha(study, "upstream", "performer", baseline, "Performer scales poorly upstream",
                         "Performer upstream alpha about 0.25 against vanilla's 0.54", expect_a_above=False),
          _compare_alpha(study, "upstream", "mixer", baseline, "MLP-Mixer scales poorly (upstream)",
                         "the Mixer scales poorly", expect_a_above=False),
          _albert_downstream(study, measurable, evidence),
          *_evolved_small(study, baseline, measurable, evidence),
          _upstream_predicts_downstream(study, measurable, evidence),
          _best_changes(study, baseline)]
  if not measurable:
    rows[2]["this study"] += f"; downstream not measurable ({evidence})"
    rows[2]["verdict"] = "not measurable"
  return pd.DataFrame(rows, columns=COLUMNS)


def targets(study: Study, *, baseline: str = "vanilla", min_r2_baseline: float = 0.95,
            min_r2: float = 0.9, min_share: float = 0.75) -> pd.DataFrame:
  """The CPU study's acceptance targets (issue 16), each with the measured value and whether it is met."""
  up = study.alphas[(study.alphas.metric == "upstream") & (study.alphas.axis == "flops")]
  base = up[up.architecture == baseline]
  rows = []
  if base.empty:
    rows.append({"target": f"{baseline} upstream alpha vs FLOPs: 95% CI excludes 0, R² >= {min_r2_baseline}",
                 "measured": "no fit", "met": False})
  else:
    b = base.iloc[0]
    rows.append({"target": f"{baseline} upstream alpha vs FLOPs: 95% CI excludes 0, R² >= {min_r2_baseline}",
                 "measured": f"alpha {b.alpha:+.4f} [{b.ci_low:+.4f}, {b.ci_high:+.4f}], R² {b.r2:.3f}",
                 "met": bool((b.ci_low > 0 or b.ci_high < 0) and b.r2 >= min_r2_baseline)})
  archs = study.runs.architecture.nunique()
  good = sorted(up[up.r2 >= min_r2].architecture)
  need = math.ceil(min_share * archs)
  rows.append({"target": f"at least {need} of {archs} architectures with upstream R² >= {min_r2}",
               "measured": f"{len(good)}: {', '.join(good)}" if good else "0", "met": len(good) >= need})
  down = sorted(a for (m, x, a) in study.fits if (m, x) == ("downstream", "flops"))
  rows.append({"target": "every architecture has a downstream score and a downstream alpha",
               "measured": f"{len(down)} of {archs} with a downstream fit", "met": len(down) == archs})
  return pd.DataFrame(rows, columns=["target", "measured", "met"])

"""Every fit and comparison of one experiment, as tables: the analysis behind the report and the CSVs.

Which runs are fitted: the complete pretraining runs of one series (collect.py): by default the size
ladder (bare sizes: tiny, mini, small, ...), one point per size; `series='tiny-nl'` fits along a depth or
width series instead (its runs plus their anchor, e.g. tiny-nl1, tiny-nl2 and tiny). An architecture with
fewer than three points is left out of the fits (a note says so); when none has three, AnalysisError.

Seeds: a point's seed replicates (runs `<variant>-s<N>`, collect.py's `point` and `seed`) are fitted through
their mean with a two-level bootstrap (powerlaw.py); alphas.csv gives per fit the seeds per point (min /
max) and the pooled seed standard deviation of y. The other comparisons (extrapolation, rank correlation,
depth versus width) read the seed means, `seed_means()`, one row per architecture and point.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import numpy as np
import pandas as pd

from scaling_arch.analysis import AnalysisError, compare
from scaling_arch.analysis import findings as findings_lib
from scaling_arch.analysis.powerlaw import AXES, METRICS, MIN_SIZES, N_BOOT, maybe_fit, seed_for

LADDER = "ladder"


@dataclasses.dataclass
class Study:
  """The tables of an analysis (each also written as CSV) and the fits they come from."""
  runs: pd.DataFrame
  points: pd.DataFrame  # the fitted runs, seeds included
  means: pd.DataFrame  # their seed means: one row per architecture and point (seed_means)
  series: str
  baseline: str
  fits: dict  # (metric, axis, architecture) -> PowerLawFit
  alphas: pd.DataFrame
  fit_notes: pd.DataFrame
  crossovers: pd.DataFrame
  regions: pd.DataFrame
  extrapolation: pd.DataFrame
  rank_correlation: pd.DataFrame
  protocols: pd.DataFrame
  skipped: pd.DataFrame
  notes: list
  findings: pd.DataFrame = None  # the paper's findings against this experiment (findings.py)
  targets: pd.DataFrame = None  # the CPU study's acceptance targets (findings.targets)

  def tables(self) -> dict[str, pd.DataFrame]:
    """{CSV file stem: table} of every result table."""
    return {"alphas": self.alphas, "fit_notes": self.fit_notes, "crossovers": self.crossovers,
            "regions": self.regions, "extrapolation": self.extrapolation,
            "rank_correlation": self.rank_correlation, "protocols": self.protocols, "skipped": self.skipped,
            "findings": self.findings, "targets": self.targets}


def series_points(runs: pd.DataFrame, series: str) -> pd.DataFrame:
  """The included runs of a series: the bare sizes for 'ladder'; else the series' runs and its anchor."""
  included = runs[runs.included.astype(bool)]
  if series == LADDER:
    return included[included.protocol == LADDER]
  if series not in set(runs.series):
    names = sorted(set(runs.series) - {LADDER, ""})
    raise AnalysisError(f"series {series!r} has no runs; use 'ladder'" +
                        (f" or one of: {', '.join(names)}." if names else " (the experiment has no variants)."))
  anchor = series.split("-")[0]
  return included[(included.series == series) | ((included.protocol == LADDER) & (included["size"] == anchor))]


def with_points(runs: pd.DataFrame) -> pd.DataFrame:
  """The runs table with `point` and `seed` (a table collected before seeds existed: each run seed 0 of
  its own variant)."""
  if "point" in runs.columns and "seed" in runs.columns:
    return runs
  return runs.assign(point=runs.variant, seed=0)


def seed_means(runs: pd.DataFrame) -> pd.DataFrame:
  """One row per (architecture, point) of `runs`, in the order of their first run: every numeric column
  averaged over the point's seeds, the other columns from its first run, `variant` the point, `seeds` the
  number of runs and `<metric column>_sd` each fitted metric's standard deviation over them (NaN for one)."""
  keys = ["architecture", "point"]
  numeric = [c for c in runs.select_dtypes("number").columns if c != "seed"]
  grouped = runs.groupby(keys, sort=False)
  out = grouped[[c for c in runs.columns if c not in numeric + keys]].first().join(grouped[numeric].mean())
  out["seeds"] = grouped.size()
  for m in METRICS.values():
    out[f"{m.column}_sd"] = grouped[m.column].std()
  out = out.reset_index()
  out["variant"] = out["point"]
  return out


def _xy(sub: pd.DataFrame, metric: str, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """x, y and the point of each run of `sub` that has both (finite and positive)."""
  x, y = sub[AXES[axis].column].to_numpy(float), sub[METRICS[metric].column].to_numpy(float)
  ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
  return x[ok], y[ok], sub["point"].to_numpy(str)[ok]


def _fit_all(points: pd.DataFrame, series: str, n_boot: int, seed: int):
  fits, rows, notes = {}, [], []
  for arch, sub in points.groupby("architecture", sort=True):
    for metric, axis in itertools.product(METRICS, AXES):
      x, y, groups = _xy(sub, metric, axis)
      if not len(x):
        notes.append({"architecture": arch, "metric": metric, "axis": axis,
                      "reason": f"no run has both {AXES[axis].column} and {METRICS[metric].column}"})
        continue
      what = f"{arch} {metric} vs {axis} ({series})"
      fit, why = maybe_fit(x, y, direction=METRICS[metric].direction, what=what, n_boot=n_boot,
                           seed=seed_for(arch, metric, axis, base=seed), groups=groups)
      if fit is None:
        notes.append({"architecture": arch, "metric": metric, "axis": axis, "reason": why})
        continue
      fits[(metric, axis, arch)] = fit
      rows.append({"architecture": arch, "metric": metric, "axis": axis, "n": fit.n, "alpha": fit.alpha,
                   "ci_low": fit.ci_low, "ci_high": fit.ci_high, "r2": fit.r2, "slope": fit.slope,
                   "c": math.exp(fit.intercept), "x_min": fit.x_min, "x_max": fit.x_max,
                   "n_boot": len(fit.boot_slope), "seeds_min": fit.seeds_min, "seeds_max": fit.seeds_max,
                   "seed_sd": fit.seed_sd})
  columns = ["architecture", "metric", "axis", "n", "alpha", "ci_low", "ci_high", "r2", "slope", "c", "x_min",
             "x_max", "n_boot", "seeds_min", "seeds_max", "seed_sd"]
  return fits, pd.DataFrame(rows, columns=columns), pd.DataFrame(notes, columns=["architecture", "metric",
                                                                                   "axis", "reason"])


def _no_fit_error(runs: pd.DataFrame, points: pd.DataFrame, series: str) -> AnalysisError:
  have = "; ".join(f"{a}: {', '.join(sub.variant)}" for a, sub in points.groupby("architecture")) or "none"
  others = sorted(s for s in set(runs.series) - {LADDER, "", series})
  hint = f", or fit along a depth/width series with --series {others[0]} (present: {', '.join(others)})" \
      if others else ""
  return AnalysisError(f"no architecture has complete runs at {MIN_SIZES} or more sizes of the {series} series "
                       f"(complete runs: {have}); train more sizes{hint}.")


def _crossovers(fits: dict) -> pd.DataFrame:
  rows = []
  for metric, axis in itertools.product(METRICS, AXES):
    archs = sorted(a for (m, x, a) in fits if (m, x) == (metric, axis))
    for a, b in itertools.combinations(archs, 2):
      c = compare.crossover(fits[(metric, axis, a)], fits[(metric, axis, b)])
      names = {"a": a, "b": b}
      rows.append({"metric": metric, "axis": axis, "a": a, "b": b, "found": c.found, "x": c.x,
                   "ci_low": c.ci_low, "ci_high": c.ci_high, "support": c.support,
                   "better_below": names.get(c.better_below, ""), "better_above": names.get(c.better_above, ""),
                   "within_observed": c.within_observed, "note": c.note})
  return pd.DataFrame(rows, columns=["metric", "axis", "a", "b", "found", "x", "ci_low", "ci_high", "support",
                                     "better_below", "better_above", "within_observed", "note"])


def _regions(fits: dict) -> pd.DataFrame:
  rows = []
  for metric in METRICS:
    chosen = {a: f for (m, x, a), f in fits.items() if (m, x) == (metric, "flops")}
    for arch, lo, hi in compare.best_regions(chosen):
      rows.append({"metric": metric, "axis": "flops", "best": arch, "from": lo, "to": hi})
  return pd.DataFrame(rows, columns=["metric", "axis", "best", "from", "to"])


def _extrapolation(means: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
  rows = []
  for arch, sub in means.groupby("architecture", sort=True):
    for metric, axis in itertools.product(METRICS, AXES):
      x, y, _ = _xy(sub, metric, axis)
      if len(np.unique(x)) < MIN_SIZES + 1:
        continue
      e = compare.extrapolate(x, y, direction=METRICS[metric].direction, what=f"{arch} {metric} vs {axis}",
                              n_boot=n_boot, seed=seed_for(arch, metric, axis, "holdout", base=seed))
      rows.append({"architecture": arch, "metric": metric, "axis": axis, "n_fit": e.n_fit, "x": e.x,
                   "actual": e.actual, "predicted": e.predicted, "rel_error": e.rel_error,
                   "pred_low": e.pred_low, "pred_high": e.pred_high, "covered": e.covered})
  return pd.DataFrame(rows, columns=["architecture", "metric", "axis", "n_fit", "x", "actual", "predicted",
                                     "rel_error", "pred_low", "pred_high", "covered"])


def _rank_correlation(means: pd.DataFrame, fits: dict) -> pd.DataFrame:
  rows = []
  for variant, sub in means.groupby("point", sort=False):
    r = compare.rank_correlation(list(sub.architecture), sub.neg_log_perplexity, sub.downstream_score)
    rows.append({"matched": f"size {variant}", "x": math.nan, "n": r.n, "rho": r.rho, "p_value": r.p_value,
                 "note": r.note})
  both = sorted(a for (m, x, a) in fits if (m, x) == ("upstream", "flops") and ("downstream", x, a) in fits)
  span = compare.overlap([fits[(m, "flops", a)] for a in both for m in METRICS]) if both else None
  if len(both) < 3 or span is None:
    rows.append({"matched": "compute (fitted)", "x": math.nan, "n": len(both), "rho": math.nan,
                 "p_value": math.nan, "note": "needs 3 architectures with upstream and downstream FLOPs fits "
                                              "over a common FLOPs range"})
  else:
    x = math.sqrt(span[0] * span[1])
    up = [-float(fits[("upstream", "flops", a)].predict(x)) for a in both]
    down = [float(fits[("downstream", "flops", a)].predict(x)) for a in both]
    r = compare.rank_correlation(both, up, down)
    rows.append({"matched": "compute (fitted)", "x": x, "n": r.n, "rho": r.rho, "p_value": r.p_value,
                 "note": r.note})
  return pd.DataFrame(rows, columns=["matched", "x", "n", "rho", "p_value", "note"])


def _protocols(runs: pd.DataFrame) -> pd.DataFrame:
  included = seed_means(runs[runs.included.astype(bool)])
  anchors = included[included.protocol == LADDER].set_index(["architecture", "size"])
  rows = []
  for r in included[included.protocol != LADDER].itertuples():
    a = anchors.loc[(r.architecture, r.size)] if (r.architecture, r.size) in anchors.index else None
    ratio = lambda col: getattr(r, col) / a[col] if a is not None else math.nan  # noqa: E731
    delta = lambda col: getattr(r, col) - a[col] if a is not None else math.nan  # noqa: E731
    rows.append({"architecture": r.architecture, "variant": r.variant, "protocol": r.protocol,
                 "series": r.series, "num_params": r.num_params, "train_flops": r.train_flops,
                 "params_ratio": ratio("num_params"), "flops_ratio": ratio("train_flops"),
                 "neg_log_perplexity": r.neg_log_perplexity, "delta_upstream": delta("neg_log_perplexity"),
                 "downstream_score": r.downstream_score, "delta_downstream": delta("downstream_score")})
  return pd.DataFrame(rows, columns=["architecture", "variant", "protocol", "series", "num_params", "train_flops",
                                     "params_ratio", "flops_ratio", "neg_log_perplexity", "delta_upstream",
                                     "downstream_score", "delta_downstream"])


def analyse(runs: pd.DataFrame, *, series: str = LADDER, baseline: str = "vanilla", n_boot: int = N_BOOT,
            seed: int = 0, unigram_baseline: Optional[float] = None,
            downstream_chance: Optional[float] = None) -> Study:
  """Fits every architecture of `series` on every cost axis and metric, and compares them.

  unigram_baseline: the upstream loss (nats per target token) of the train targets' unigram distribution
  on the evaluation data, if known: the report says how far past it the fitted runs got.
  downstream_chance: the downstream score of guessing, if known (findings.py's measurability test).
  """
  runs = with_points(runs)
  points = series_points(runs, series)
  means = seed_means(points)
  fits, alphas, fit_notes = _fit_all(points, series, n_boot, seed)
  if not any(m == "upstream" for (m, _, _) in fits):
    raise _no_fit_error(runs, points, series)
  notes = []
  hardware = runs[runs.included.astype(bool)][["device_kind", "devices"]].drop_duplicates()
  if len(hardware) > 1:
    kinds = ", ".join(f"{int(d) if d == d else '?'} x {k or '?'}" for k, d in hardware.itertuples(index=False))
    notes.append(f"runs were timed on different hardware ({kinds}): the step_time axis mixes them.")
  shared = runs[runs.included.astype(bool)].get("stages_per_machine", pd.Series(dtype=float))
  if (shared > 1).any():
    notes.append(f"{int((shared > 1).sum())} of {int(shared.notna().sum())} runs with a launch record were "
                 f"launched with up to {int(shared.max())} stages at once on one machine: their step times "
                 "(steps_per_sec, the step_time axis) were measured on shared cores.")
  if not runs.downstream_score.notna().any():
    notes.append("no run has a downstream score (no finished fine-tuning stage): downstream fits, "
                 "rank correlations and figures are left out.")
  if baseline not in set(points.architecture):
    notes.append(f"the baseline {baseline!r} has no fitted runs: the baseline figure is left out.")
  if unigram_baseline is not None:
    loss = points.upstream_loss
    notes.append(f"unigram baseline {unigram_baseline:.3f} nats (the train targets' unigram distribution on the "
                 f"evaluation data): the fitted runs' upstream losses are {loss.min():.3f}-{loss.max():.3f}, "
                 f"{unigram_baseline - loss.max():.3f}-{unigram_baseline - loss.min():.3f} nats below it.")
  if downstream_chance is not None and means.downstream_score.notna().any():
    d = means.downstream_score
    notes.append(f"downstream chance level {downstream_chance:g}: the points' seed-mean downstream scores are "
                 f"{d.min():.4g}-{d.max():.4g}.")
  skipped = runs[~runs.included.astype(bool)][["run", "status", "skip_reason"]].reset_index(drop=True)
  study = Study(runs=runs, points=points, means=means, series=series, baseline=baseline, fits=fits,
                alphas=alphas, fit_notes=fit_notes, crossovers=_crossovers(fits), regions=_regions(fits),
                extrapolation=_extrapolation(means, n_boot, seed), rank_correlation=_rank_correlation(means, fits),
                protocols=_protocols(runs), skipped=skipped, notes=notes)
  study.findings = findings_lib.findings(study, baseline=baseline, chance=downstream_chance)
  study.targets = findings_lib.targets(study, baseline=baseline)
  return study

"""The report's figures (matplotlib, Agg backend), each written as PNG and SVG into <out>/figures/.

  scaling_<metric>         every architecture against pretraining FLOPs, marker area by parameters, with
                           its fitted power law (dashed) over the costs it was fitted on
  vs_<baseline>_<metric>   one panel per architecture, against the baseline (grey)
  protocols_<metric>       one panel per architecture with depth / width variants: the size ladder (black)
                           and each series (its runs and their anchor size) coloured by protocol

<metric> is `upstream` (y = upstream loss = -neg. log-perplexity, lower is better) or `downstream` (score).
Both axes are logarithmic, so a fitted power law is a straight line. A marker is a point's seed mean (the
run itself when it has one seed); a point with several seeds also shows its runs as faint dots and the
standard deviation between them as an error bar.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from scaling_arch.analysis.powerlaw import AXES, METRICS  # noqa: E402
from scaling_arch.analysis.study import LADDER, Study, seed_means  # noqa: E402

PROTOCOL_COLORS = {"depth": "tab:blue", "width": "tab:orange", "depth+width": "tab:purple"}
DPI = 110


def colors(architectures) -> dict[str, tuple]:
  """A fixed colour per architecture (sorted names over tab20)."""
  cmap = matplotlib.colormaps["tab20" if len(architectures) > 10 else "tab10"]
  return {a: cmap(i % cmap.N) for i, a in enumerate(sorted(architectures))}


def _save(fig: Figure, out_dir: str, stem: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("png", "svg")]
  for path in paths:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return paths


def _marker_area(params: np.ndarray, all_params: np.ndarray) -> np.ndarray:
  lo, hi = np.log(np.nanmin(all_params)), np.log(np.nanmax(all_params))
  share = (np.log(params) - lo) / (hi - lo) if hi > lo else np.full(len(params), 0.5)
  return 20 + 180 * share


def _fit_line(ax, study: Study, metric: str, arch: str, color, **kwargs) -> None:
  fit = study.fits.get((metric, "flops", arch))
  if fit is not None:
    xs = np.geomspace(fit.x_min, fit.x_max, 30)
    ax.plot(xs, fit.predict(xs), "--", color=color, linewidth=1, **kwargs)


def _seeds(ax, means, runs, column: str, color) -> None:
  """The runs of the points in `means` that have several seeds as faint dots, with the points' seed
  standard deviation as error bars at their means; nothing for points of one seed."""
  several = means[means.seeds > 1]
  if several.empty:
    return
  mine = runs[runs.architecture.isin(several.architecture) & runs.point.isin(several.point)]
  ax.scatter(mine.train_flops, mine[column], s=10, color=color, alpha=0.3, linewidths=0)
  ax.errorbar(several.train_flops, several[column], yerr=several[f"{column}_sd"], fmt="none", ecolor=color,
              elinewidth=1, capsize=2)


MINOR_LABELS_BELOW_DECADES = 2


def _minor_labels(span: float) -> ticker.FuncFormatter:
  """Labels for the minor ticks of a log axis spanning less than two decades (hi / lo = span): over more
  than a factor of two only the 2, 3 and 5 multiples (4e+12 beside 5e+12 would crowd); always left out
  within 0.05 decades of a power of ten (9e+11 would crowd the major 1e+12 label)."""
  def label(value: float, _pos=None) -> str:
    if value <= 0:
      return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 0.05:
      return ""
    mantissa = value / 10 ** math.floor(exponent)
    if span > 2 and not any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)):
      return ""
    return f"{value:.3g}"
  return ticker.FuncFormatter(label)


def _axes_labels(ax, metric: str) -> None:
  ax.set_xscale("log")
  ax.set_yscale("log")
  for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
    axis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
    # Label the minor ticks when the axis spans less than two decades (at most one major tick to read).
    axis.set_minor_formatter(ticker.NullFormatter() if math.log10(hi / lo) >= MINOR_LABELS_BELOW_DECADES
                             else _minor_labels(hi / lo))
  ax.set_xlabel(AXES["flops"].label)
  ax.set_ylabel(METRICS[metric].label)
  ax.grid(True, which="both", alpha=0.3)


def scaling_figure(study: Study, metric: str, out_dir: str) -> Optional[list[str]]:
  """All architectures against FLOPs, marker area by parameters; None when no run has the metric."""
  column = METRICS[metric].column
  pts = study.means[np.isfinite(study.means[column].to_numpy(float))]
  if pts.empty:
    return None
  palette = colors(study.points.architecture.unique())
  fig = Figure(figsize=(7.5, 5))
  ax = fig.add_subplot()
  for arch, sub in pts.groupby("architecture"):
    ax.scatter(sub.train_flops, sub[column], s=_marker_area(sub.num_params.to_numpy(float),
                                                            pts.num_params.to_numpy(float)),
               color=palette[arch], alpha=0.8, edgecolors="black", linewidths=0.5, label=arch)
    _seeds(ax, sub, study.points, column, palette[arch])
    _fit_line(ax, study, metric, arch, palette[arch])
  _axes_labels(ax, metric)
  ax.set_title(f"{metric}: all architectures ({study.series}); marker area ~ log parameters")
  ax.legend(fontsize=7, ncol=2, loc="best")
  return _save(fig, out_dir, f"scaling_{metric}")


def baseline_figure(study: Study, metric: str, out_dir: str) -> Optional[list[str]]:
  """One panel per architecture against the baseline; None without baseline runs or other architectures."""
  column = METRICS[metric].column
  pts = study.means[np.isfinite(study.means[column].to_numpy(float))]
  base = pts[pts.architecture == study.baseline]
  others = sorted(set(pts.architecture) - {study.baseline})
  if base.empty or not others:
    return None
  palette = colors(study.points.architecture.unique())
  cols = min(4, len(others))
  rows = math.ceil(len(others) / cols)
  fig = Figure(figsize=(3.6 * cols, 3.0 * rows))
  for i, arch in enumerate(others):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.plot(base.train_flops, base[column], "o", color="grey", label=study.baseline)
    _seeds(ax, base, study.points, column, "grey")
    _fit_line(ax, study, metric, study.baseline, "grey")
    sub = pts[pts.architecture == arch]
    ax.plot(sub.train_flops, sub[column], "o", color=palette[arch], label=arch)
    _seeds(ax, sub, study.points, column, palette[arch])
    _fit_line(ax, study, metric, arch, palette[arch])
    _axes_labels(ax, metric)
    ax.set_title(arch, fontsize=9)
    ax.legend(fontsize=7)
  fig.suptitle(f"{metric}: each architecture against {study.baseline}")
  fig.tight_layout()
  return _save(fig, out_dir, f"vs_{study.baseline}_{metric}")


def protocol_figure(study: Study, metric: str, out_dir: str) -> Optional[list[str]]:
  """Depth versus width: per architecture, the ladder and each depth / width series (seed means); None
  without any."""
  column = METRICS[metric].column
  runs = seed_means(study.runs[study.runs.included.astype(bool)])
  runs = runs[np.isfinite(runs[column].to_numpy(float))]
  archs = sorted(set(runs[runs.protocol != LADDER].architecture))
  if not archs:
    return None
  cols = min(4, len(archs))
  rows = math.ceil(len(archs) / cols)
  fig = Figure(figsize=(3.8 * cols, 3.2 * rows))
  for i, arch in enumerate(archs):
    ax = fig.add_subplot(rows, cols, i + 1)
    mine = runs[runs.architecture == arch]
    ladder = mine[mine.protocol == LADDER].sort_values("train_flops")
    ax.plot(ladder.train_flops, ladder[column], "o-", color="black", label="size ladder")
    for name, sub in mine[mine.protocol != LADDER].groupby("series"):
      anchor = ladder[ladder["size"] == name.split("-")[0]]
      line = np.concatenate([anchor[["train_flops", column]].to_numpy(float),
                             sub[["train_flops", column]].to_numpy(float)])
      line = line[np.argsort(line[:, 0])]
      color = PROTOCOL_COLORS[sub.protocol.iloc[0]]
      ax.plot(line[:, 0], line[:, 1], "s-", color=color, label=f"{name} ({sub.protocol.iloc[0]})")
      for r in sub.itertuples():
        ax.annotate(r.variant, (r.train_flops, getattr(r, column)), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    _axes_labels(ax, metric)
    ax.set_title(arch, fontsize=9)
    ax.legend(fontsize=6)
  fig.suptitle(f"{metric}: depth versus width (Scale Efficiently knobs)")
  fig.tight_layout()
  return _save(fig, out_dir, f"protocols_{metric}")


def all_figures(study: Study, out_dir: str) -> dict[str, list[str]]:
  """{figure stem: [png, svg]} of every figure the data supports."""
  made = {}
  for metric in METRICS:
    for make in (scaling_figure, baseline_figure, protocol_figure):
      paths = make(study, metric, out_dir)
      if paths:
        made[os.path.splitext(os.path.basename(paths[0]))[0]] = paths
  return made

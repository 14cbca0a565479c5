"""The report: `report.md` (figures linked) and `report.html` (one self-contained page: figures embedded as
PNG data, SVG linked), both built from one list of blocks so they always hold the same tables and figures.
"""

from __future__ import annotations

import base64
import html
import math
import os
from typing import Iterable

import pandas as pd

from scaling_arch.analysis.powerlaw import LEVEL, METRICS
from scaling_arch.analysis.study import Study

RUN_COLUMNS = ["run", "architecture", "variant", "protocol", "status", "num_params", "train_flops", "tokens",
               "steps_per_sec", "neg_log_perplexity", "downstream_score"]
CONVENTIONS = (
    "Each architecture's runs are fitted with a straight line in log-log space, log y = log c + slope * "
    "log x (least squares, natural logs). y is the upstream loss (= -eval_neg_log_perplexity, lower is "
    "better) or the downstream score (higher is better); x is total pretraining FLOPs, parameters, or "
    "seconds per step (1/throughput). **alpha = -slope for upstream and +slope for downstream, so alpha > 0 "
    "means the architecture improves with scale** on every axis. A size (point) with several seed replicates "
    "(runs <variant>-s<N>) enters the fit as the mean of its seeds, and the figures show that mean with the "
    "seeds' standard deviation as an error bar and the seeds as faint dots. The interval is the {level:.0%} "
    "percentile interval of alpha over two-level bootstrap resamples: the sizes with replacement and, within "
    "each drawn size, its seeds with replacement, the line fitted through the drawn seeds' means (resamples "
    "with fewer than two distinct sizes dropped), so it holds the seed-to-seed scatter as well as the choice "
    "of sizes; with one seed per size it is the plain bootstrap of the runs. In the alpha table, seeds is "
    "the number of seeds per size (fewest-most) and seed sd the pooled standard deviation of y between the "
    "seeds of a size. Only complete pretraining runs are fitted.")


def fmt(value) -> str:
  """A table cell: integers as such, floats to 4 significant digits, missing as '-'."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, (bool,)) or type(value).__name__ == "bool_":
    return "yes" if value else "no"
  if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e6):
    return f"{int(value):,}" if abs(value) >= 1e4 else str(int(value))
  if isinstance(value, float):
    return f"{value:.3e}" if abs(value) >= 1e6 or (value != 0 and abs(value) < 1e-3) else f"{value:.4g}"
  return str(value)


def _cells(df: pd.DataFrame) -> list[list[str]]:
  return [[fmt(v.item() if hasattr(v, "item") else v) for v in row] for row in df.itertuples(index=False)]


def _md_table(df: pd.DataFrame) -> str:
  if df.empty:
    return "(none)\n"
  lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
  lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _cells(df)]
  return "\n".join(lines) + "\n"


def _html_table(df: pd.DataFrame) -> str:
  if df.empty:
    return "<p>(none)</p>"
  head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in _cells(df))
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _alpha_view(alphas: pd.DataFrame) -> pd.DataFrame:
  view = alphas[["architecture", "metric", "axis", "n", "alpha", "ci_low", "ci_high", "r2", "seed_sd"]].copy()
  view.insert(4, "seeds", [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(alphas.seeds_min,
                                                                                   alphas.seeds_max)])
  return view.rename(columns={"ci_low": f"{LEVEL:.0%} CI low", "ci_high": f"{LEVEL:.0%} CI high", "r2": "R²",
                              "seed_sd": "seed sd"})


def blocks(study: Study, figures: dict[str, list[str]], root: str) -> list[tuple[str, object]]:
  """The report as (kind, content) blocks: kind in h1, h2, p, table, figure."""
  runs = study.runs
  out: list[tuple[str, object]] = [
      ("h1", f"Scaling-law analysis of {root}"),
      ("p", f"{len(runs)} runs found, {int(runs.included.sum())} with complete pretraining; fitted series: "
            f"{study.series} ({study.points.architecture.nunique()} architectures, {len(study.points)} runs at "
            f"{len(study.means)} points); baseline: {study.baseline}."),
      ("h2", "Conventions"), ("p", CONVENTIONS.format(level=LEVEL)),
  ]
  if study.notes:
    out += [("h2", "Notes")] + [("p", n) for n in study.notes]
  out += [("h2", "Runs"), ("table", runs[RUN_COLUMNS]),
          ("h2", "Skipped runs (not in the fits)"), ("table", study.skipped),
          ("h2", "Scaling laws (alpha)"), ("table", _alpha_view(study.alphas)),
          ("h2", "Fits not made"), ("table", study.fit_notes),
          ("h2", "The study's findings, here"),
          ("p", "Each qualitative finding of Tay et al. (2022) against this experiment (findings.py): agrees or "
                "disagrees only beyond the bootstrap (alphas: 95% of resample pairs) or the seed scatter "
                "(scores: 2 standard errors); otherwise not measurable, with the way the estimates lean."),
          ("table", study.findings),
          ("h2", "Targets of the CPU study"), ("table", study.targets),
          ("h2", "All architectures against FLOPs")]
  for metric in METRICS:
    if f"scaling_{metric}" in figures:
      out.append(("figure", f"scaling_{metric}"))
  out.append(("h2", f"Each architecture against {study.baseline}"))
  out += [("figure", s) for s in figures if s.startswith(f"vs_{study.baseline}_")] or [("p", "(no figure)")]
  found = study.crossovers[study.crossovers.found.astype(bool)]
  out += [("h2", "Crossovers"),
          ("p", "Where one architecture's fitted curve overtakes another's (better_above is better at larger "
                "cost), with the bootstrap interval, the share of resample pairs that cross within the "
                "search range, and whether the crossing lies within the costs both were trained at; pairs "
                "that do not cross are in crossovers.csv."),
          ("table", found[["metric", "axis", "a", "b", "x", "ci_low", "ci_high", "support", "better_below",
                           "better_above", "within_observed"]]),
          ("h2", "Best architecture per compute region"),
          ("p", "By the fitted curves, over pretraining FLOPs; an architecture competes only within the costs "
                "it was trained at."), ("table", study.regions),
          ("h2", "Upstream versus downstream (Spearman rank correlation across architectures)"),
          ("table", study.rank_correlation),
          ("h2", "Extrapolation check (fit on all but the largest size, predict it)"),
          ("table", study.extrapolation),
          ("h2", "Depth versus width"),
          ("p", "Runs with Scale Efficiently knobs against the same architecture at their base size "
                "(ratios and differences: variant minus base; seed means where a point has several seeds)."),
          ("table", study.protocols)]
  out += [("figure", s) for s in figures if s.startswith("protocols_")]
  return out


def _figure_md(stem: str) -> str:
  return f"![{stem}](figures/{stem}.png)\n\n[{stem}.svg](figures/{stem}.svg)\n"


def _figure_html(stem: str, out_dir: str) -> str:
  with open(os.path.join(out_dir, "figures", f"{stem}.png"), "rb") as f:
    data = base64.b64encode(f.read()).decode()
  return (f'<figure><img alt="{stem}" src="data:image/png;base64,{data}"><figcaption>{stem} '
          f'(<a href="figures/{stem}.svg">SVG</a>)</figcaption></figure>')


def render_md(items: Iterable[tuple[str, object]]) -> str:
  parts = []
  for kind, content in items:
    parts.append({"h1": lambda c: f"# {c}\n", "h2": lambda c: f"## {c}\n", "p": lambda c: f"{c}\n",
                  "table": _md_table, "figure": _figure_md}[kind](content))
  return "\n".join(parts)


def render_html(items: Iterable[tuple[str, object]], out_dir: str) -> str:
  parts = []
  for kind, content in items:
    if kind in ("h1", "h2"):
      parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
    elif kind == "p":
      text = html.escape(content).replace("**", "")
      parts.append(f"<p>{text}</p>")
    elif kind == "table":
      parts.append(_html_table(content))
    else:
      parts.append(_figure_html(content, out_dir))
  style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
           "font-size:12px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
           "img{max-width:100%}")
  title = html.escape(next((c for k, c in items if k == "h1"), "report"))
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
          f"</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(study: Study, figures: dict[str, list[str]], out_dir: str, root: str) -> list[str]:
  """Writes report.md and report.html into out_dir (figures already in out_dir/figures); returns paths."""
  items = blocks(study, figures, root)
  paths = [os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")]
  with open(paths[0], "w") as f:
    f.write(render_md(items))
  with open(paths[1], "w") as f:
    f.write(render_html(items, out_dir))
  return paths


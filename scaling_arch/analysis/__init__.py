"""Scaling-law analysis of a study: run records in, tables, fits, figures and a report out.

`python -m scaling_arch.analysis EXPERIMENT_ROOT [--out DIR]` (see __main__.py). The analysis reads only
the files training writes into each stage's MODEL_DIR (`run.json`, `metrics.jsonl`) and the launcher's
`launch_spec.json`, never model code, so it runs without JAX or TensorFlow.

Modules:
  collect.py   scan EXPERIMENT_ROOT/<run>/<stage>/ into one table of runs (CSV + Parquet)
  powerlaw.py  a straight line in log-log space, its alpha, R^2 and bootstrap interval
  compare.py   crossovers, best architecture per compute region, extrapolation, rank correlation
  study.py     every fit and comparison of a study, as tables
  figures.py   matplotlib figures (Agg; PNG and SVG)
  report.py    report.md and report.html
"""

from scaling_arch.errors import UserError


class AnalysisError(UserError):
  """The experiment cannot be analysed as asked (no runs, a missing metric, too few sizes): one line that
  says what is wrong and what to do."""

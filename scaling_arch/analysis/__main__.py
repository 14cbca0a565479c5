r"""Command line: `python -m scaling_arch.analysis EXPERIMENT_ROOT [--out DIR] [options]`.

Reads every run under EXPERIMENT_ROOT (<run>/<stage>/run.json and metrics.jsonl, as the launcher lays them
out), fits a scaling law per architecture, cost axis and metric, compares them, and writes into --out
(default EXPERIMENT_ROOT/analysis): runs.csv, runs.parquet, alphas.csv and the other result tables
(study.py), figures/*.png and *.svg, report.md and report.html.

Exit status: 0 done; 2 the experiment cannot be analysed as asked (one `error:` line says what to do).
"""

from __future__ import annotations

if __name__ == "__main__":
  from scaling_arch import runtime_env
  runtime_env.start(reexec=False)  # quiet TensorFlow (imported for gs:// roots only); see runtime_env.py

import argparse
import os
import sys
from typing import Optional, Sequence

from scaling_arch.analysis import AnalysisError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m scaling_arch.analysis",
                                   description="Scaling-law tables, fits, figures and report of an experiment.")
  parser.add_argument("root", metavar="EXPERIMENT_ROOT", help="the launcher's experiment root (local or gs://)")
  parser.add_argument("--out", help="output directory (local; default: EXPERIMENT_ROOT/analysis)")
  parser.add_argument("--series", default="ladder",
                      help="runs to fit: 'ladder' (bare sizes) or a depth/width series such as 'tiny-nl'")
  parser.add_argument("--baseline", default="vanilla", help="the architecture the others are drawn against")
  parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples per fit")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  parser.add_argument("--unigram_baseline", type=float,
                      help="the unigram baseline of the upstream loss (nats; `python -m tasks.package_corpus "
                           "--baseline` prints it), for the report")
  parser.add_argument("--downstream_chance", type=float,
                      help="the downstream score of guessing (e.g. 8.33 for the offline cloze task's 12 words)")
  parser.add_argument("--allow_missing", action="store_true",
                      help="leave complete runs that lack a metric out of the fits instead of stopping")
  return parser


def run(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the analysis; returns {'runs': table, 'study': Study, 'files': [paths written]}."""
  from scaling_arch.analysis import collect, figures, report, study as study_lib
  args = _parser().parse_args(argv)
  out = args.out or args.root.rstrip("/") + "/analysis"
  if "://" in out:
    raise AnalysisError(f"--out {out} is not a local directory; pass --out with a local path.")
  if args.bootstrap < 100:
    raise AnalysisError(f"--bootstrap {args.bootstrap} is too few for a percentile interval; use 100 or more.")
  runs = collect.collect(args.root, allow_missing=args.allow_missing)
  print(f"collected {len(runs)} runs from {args.root} ({int(runs.included.sum())} complete pretraining runs, "
        f"{int(runs.downstream_score.notna().sum())} with a downstream score)")
  result = study_lib.analyse(runs, series=args.series, baseline=args.baseline, n_boot=args.bootstrap,
                             seed=args.seed, unigram_baseline=args.unigram_baseline,
                             downstream_chance=args.downstream_chance)
  files = collect.write_table(runs, out)
  for name, table in result.tables().items():
    path = os.path.join(out, f"{name}.csv")
    table.to_csv(path, index=False)
    files.append(path)
  for row in result.alphas[result.alphas.axis == "flops"].itertuples():
    seeds = "" if row.seeds_max <= 1 else (
        f"  seeds {row.seeds_min}" + (f"-{row.seeds_max}" if row.seeds_max != row.seeds_min else "")
        + f" per point, seed sd {row.seed_sd:.4f}")
    print(f"  {row.architecture:<18} {row.metric:<10} alpha vs FLOPs {row.alpha:+.4f} "
          f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]  R2 {row.r2:.3f}  n={row.n}{seeds}")
  for note in result.notes:
    print(f"note: {note}")
  for row in result.targets.itertuples():
    print(f"target {'met' if row.met else 'NOT met'}: {row.target}: {row.measured}")
  for row in result.findings.itertuples():
    print(f"finding {row.verdict}: {row.finding}")
  made = figures.all_figures(result, os.path.join(out, "figures"))
  files += [p for paths in made.values() for p in paths]
  files += report.write_report(result, made, out, args.root)
  print(f"wrote {len(files)} files to {out}: report.md, report.html, runs.csv, runs.parquet, alphas.csv, "
        f"{len(made)} figures")
  return {"runs": runs, "study": result, "files": files}


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    run(argv)
  except AnalysisError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

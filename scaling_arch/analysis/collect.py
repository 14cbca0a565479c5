"""Collects every run of an experiment into one table (one row per run), from its files only.

Layout read (what the launcher writes, launch/grid.py): EXPERIMENT_ROOT/<run>/<stage>/ with run
`<architecture>-<variant>` and stage `pretrain` or `finetune`; each stage directory holds `run.json`,
`metrics.jsonl` and (when launched by the launcher) `launch_spec.json`. A run made by hand may keep its
`run.json` directly in EXPERIMENT_ROOT/<run>/ (read as its pretraining stage). Directories whose name
starts with `_` (the launcher's `_launch`) or `.`, and `analysis`, are not runs.

Columns:
  run, architecture, variant, size, knobs ('' or e.g. 'dl2'), protocol, series, path
  point, seed       the variant without its seed knob and the replicate (launch/grid.py): `tiny-dm128-s1`
                    is seed 1 of the point `tiny-dm128`, which is itself seed 0; knobs, protocol and series
                    are those of the point
  status            the pretraining stage's status (complete, running, preempted, stopped, failed_...)
  num_params, flops_per_step, steps, train_flops (= flops_per_step * steps, pretraining only),
  tokens_per_step, tokens (= tokens_per_step * steps), steps_per_sec, tokens_per_sec,
  step_time         1 / steps_per_sec: seconds per pretraining step (the throughput cost axis)
  devices, device_kind
  neg_log_perplexity  upstream quality: the final eval_neg_log_perplexity of pretraining (run.json, else
                    the last evaluation line of metrics.jsonl); upstream_loss is minus it
  eval_accuracy, final_loss
  downstream_score  the fine-tuning stage's downstream score (0-100; scaling_arch/downstream.py), with
                    glue_average, super_glue_average, squad_score; NaN when absent
  finetune_status
  included          whether the run enters the fits; skip_reason says why not

Protocol ("Scale Efficiently" naming, launch.grid.parse_variant): `ladder` for a bare size (tiny ... xxl);
`depth` when every knob is a depth knob (nl, el, dl); `width` when every knob is a width knob (dm, ff,
nh, kv); `depth+width` otherwise. Series: `ladder`, or `<size>-<knob names>` (e.g. `base-dl`,
`base-dm-nh`): the runs that move the same knobs away from the same size; the bare size run is that
series' anchor (its knobs at their default values) and belongs to it as well.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import pandas as pd

from launch import storage
from launch.grid import SIZES, SPEC_FILE, LaunchError, parse_variant
from scaling_arch.analysis import AnalysisError

RUN_RECORD = "run.json"
METRICS_FILE = "metrics.jsonl"
PRETRAIN, FINETUNE = "pretrain", "finetune"
DEPTH_KNOBS = ("nl", "el", "dl")
WIDTH_KNOBS = ("dm", "ff", "nh", "kv")
DOWNSTREAM_KEYS = ("downstream_score", "glue_average", "super_glue_average", "squad_score")
NOT_RUNS = ("analysis",)


def number(value: Any) -> float:
  """A run record's value as a float: NaN for None, missing, or a non-number ('nan' strings included)."""
  if isinstance(value, bool) or value is None:
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def protocol_of(knobs: tuple[tuple[str, int], ...]) -> str:
  """`ladder`, `depth`, `width` or `depth+width` for a variant's knobs (see the module docstring)."""
  names = {k for k, _ in knobs}
  if not names:
    return "ladder"
  if names <= set(DEPTH_KNOBS):
    return "depth"
  if names <= set(WIDTH_KNOBS):
    return "width"
  return "depth+width"


def series_of(size: str, knobs: tuple[tuple[str, int], ...]) -> str:
  """`ladder`, or `<size>-<knob names>` for a depth / width variant, e.g. `base-dm-nh`."""
  return "-".join([size] + [k for k, _ in knobs]) if knobs else "ladder"


def _join(*parts: str) -> str:
  return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


def _metrics_lines(stage_dir: str) -> list[dict]:
  text = storage.read_text(_join(stage_dir, METRICS_FILE)) or ""
  lines = []
  for line in text.splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a line being written
  return lines


def _last(lines: list[dict], key: str) -> float:
  for entry in reversed(lines):
    value = number(entry.get(key))
    if not math.isnan(value):
      return value
  return math.nan


def _identity(run: str, record: dict, spec: dict) -> tuple[str, Any]:
  """(architecture, Variant) from launch_spec.json, else the run directory's name, else run.json's size."""
  architecture = spec.get("architecture") or record.get("architecture")
  variant = spec.get("variant")
  if not variant and "-" in run:
    head, tail = run.split("-", 1)
    architecture = architecture or head
    variant = tail if (architecture == head) else None
  variant = variant or record.get("size")
  if not architecture or not variant:
    return architecture or "", None
  try:
    return architecture, parse_variant(variant)
  except LaunchError:
    try:
      return architecture, parse_variant(str(record.get("size")))
    except LaunchError:
      return architecture, None


def _stage_dirs(run_dir: str) -> dict[str, str]:
  """{stage name: its directory} for the stages of a run that hold a run.json."""
  stages = {}
  if storage.exists(_join(run_dir, RUN_RECORD)):
    stages[PRETRAIN] = run_dir
  for name in storage.listdir(run_dir):
    if storage.exists(_join(run_dir, name, RUN_RECORD)):
      stages[name] = _join(run_dir, name)
  return stages


def _downstream(stages: dict[str, str]) -> dict:
  """The downstream scores of a run's fine-tuning stage (`finetune`, else any stage that reports them)."""
  names = [FINETUNE] + sorted(n for n in stages if n not in (PRETRAIN, FINETUNE))
  for name in names:
    if name not in stages:
      continue
    record = storage.read_json(_join(stages[name], RUN_RECORD)) or {}
    out = {k: number(record.get(k)) for k in DOWNSTREAM_KEYS}
    if math.isnan(out["downstream_score"]):
      lines = _metrics_lines(stages[name])
      for key in DOWNSTREAM_KEYS:
        if math.isnan(out[key]):
          out[key] = _last(lines, f"downstream/{key}")
    if name == FINETUNE or not math.isnan(out["downstream_score"]):
      out["finetune_status"] = record.get("status", "")
      return out
  return {**{k: math.nan for k in DOWNSTREAM_KEYS}, "finetune_status": ""}


def read_run(root: str, run: str) -> Optional[dict]:
  """One row of the table for EXPERIMENT_ROOT/<run>, or None when the directory holds no stage."""
  run_dir = _join(root, run)
  stages = _stage_dirs(run_dir)
  if not stages:
    return None
  row: dict[str, Any] = {"run": run, "path": run_dir}
  pretrain = stages.get(PRETRAIN)
  record = (storage.read_json(_join(pretrain, RUN_RECORD)) or {}) if pretrain else {}
  spec = (storage.read_json(_join(pretrain or next(iter(stages.values())), SPEC_FILE)) or {})
  architecture, variant = _identity(run, record, spec)
  row.update(architecture=architecture, variant=variant.name if variant else "",
             size=variant.size if variant else str(record.get("size", "")),
             point=variant.point if variant else "", seed=variant.seed if variant else 0,
             knobs="-".join(f"{k}{v}" for k, v in variant.knobs) if variant else "",
             protocol=protocol_of(variant.knobs) if variant else "",
             series=series_of(variant.size, variant.knobs) if variant else "",
             status=record.get("status", "") if pretrain else "",
             stages_per_machine=number(spec.get("stages_per_machine")))
  steps = number(record.get("step"))
  steps_per_sec = number(record.get("steps_per_sec"))
  upstream = number(record.get("eval_neg_log_perplexity"))
  if pretrain and (math.isnan(upstream) or not steps_per_sec > 0):
    lines = _metrics_lines(pretrain)
    upstream = upstream if not math.isnan(upstream) else _last(lines, "eval_neg_log_perplexity")
    steps_per_sec = steps_per_sec if steps_per_sec > 0 else _last(lines, "steps_per_sec")
  row.update(
      num_params=number(record.get("num_params")), flops_per_step=number(record.get("flops_per_step")),
      steps=steps, tokens_per_step=number(record.get("tokens_per_step")),
      steps_per_sec=steps_per_sec, tokens_per_sec=number(record.get("tokens_per_sec")),
      devices=number(record.get("devices")), device_kind=str(record.get("device_kind", "")),
      neg_log_perplexity=upstream, eval_accuracy=number(record.get("eval_accuracy")),
      final_loss=number(record.get("final_loss")))
  row["train_flops"] = row["flops_per_step"] * steps
  row["tokens"] = row["tokens_per_step"] * steps
  row["step_time"] = 1.0 / steps_per_sec if steps_per_sec > 0 else math.nan
  row["upstream_loss"] = -upstream
  row.update(_downstream(stages))
  row["included"], row["skip_reason"] = _inclusion(row, pretrain)
  return row


REQUIRED = {"num_params": "num_params", "flops_per_step": "flops_per_step", "steps": "step",
            "neg_log_perplexity": "eval_neg_log_perplexity"}


def _inclusion(row: dict, pretrain: Optional[str]) -> tuple[bool, str]:
  if not pretrain:
    return False, "no pretrain stage"
  if not row["architecture"] or not row["variant"]:
    return False, ("cannot tell its architecture and size: name the run <architecture>-<variant> "
                   "(e.g. vanilla-base) or write launch_spec.json")
  if row["status"] != "complete":
    return False, f"pretraining {row['status'] or 'has no status'} (step {row['steps']:.0f})"
  missing = [name for column, name in REQUIRED.items() if math.isnan(row[column])]
  if missing:
    return False, "missing " + ", ".join(missing)
  return True, ""


def collect(root: str, allow_missing: bool = False) -> pd.DataFrame:
  """The table of every run under `root` (rows sorted by architecture, then cost); raises AnalysisError
  when there are no runs, or when a complete pretraining run lacks a metric and `allow_missing` is off."""
  if not storage.is_remote(root) and not os.path.isdir(root):
    raise AnalysisError(f"EXPERIMENT_ROOT {root} is not a directory; pass the directory the launcher wrote "
                        "(launch.Grid.experiment_root).")
  names = [n for n in storage.listdir(root) if n[0] not in "_." and n not in NOT_RUNS]
  rows = [r for r in storage.parallel_map(lambda n: read_run(root, n), names, storage.is_remote(root)) if r]
  if not rows:
    raise AnalysisError(f"EXPERIMENT_ROOT {root} holds no runs (no <run>/<stage>/run.json); pass the "
                        "directory the launcher wrote (launch.Grid.experiment_root) once a run has started.")
  table = pd.DataFrame(rows)
  missing = table[table.skip_reason.str.startswith("missing ")]
  if len(missing) and not allow_missing:
    which = "; ".join(f"{r.run}: {r.skip_reason[len('missing '):]}" for r in missing.itertuples())
    raise AnalysisError(f"complete pretraining runs lack a metric in run.json / metrics.jsonl ({which}); "
                        "re-run their evaluation, or pass --allow_missing to leave them out of the fits.")
  order = {s: i for i, s in enumerate(SIZES)}
  table["_size_order"] = table["size"].map(order)
  table = table.sort_values(["architecture", "_size_order", "train_flops", "run"]).drop(columns="_size_order")
  return table.reset_index(drop=True)


def write_table(table: pd.DataFrame, out_dir: str) -> list[str]:
  """Writes `runs.csv` and `runs.parquet` into out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "runs.csv"), os.path.join(out_dir, "runs.parquet")]
  table.to_csv(paths[0], index=False)
  table.to_parquet(paths[1], index=False)
  return paths


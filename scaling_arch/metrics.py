"""Metric writers (clu: TensorBoard events), `metrics.jsonl`, the run record `run.json`, and the progress
line. The analysis reads only `run.json` and `metrics.jsonl`."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers

RUN_RECORD = "run.json"
METRICS_FILE = "metrics.jsonl"


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item() if np.asarray(value).size == 1 else np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsLogger:
  """Writes scalars to TensorBoard (clu) and appends them as JSON lines; only process 0 writes."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(os.path.join(model_dir, "tensorboard"),
                                                       just_logging=not self.is_writer)
    self.path = os.path.join(model_dir, METRICS_FILE)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: _plain(v) for k, v in scalars.items()}
    numeric = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
    self.writer.write_scalars(step, numeric)
    if self.is_writer:
      with tf.io.gfile.GFile(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **scalars}, sort_keys=True) + "\n")

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def read_metrics(model_dir: str) -> list[dict]:
  path = os.path.join(model_dir, METRICS_FILE)
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_run_record(model_dir: str) -> dict:
  path = os.path.join(model_dir, RUN_RECORD)
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def update_run_record(model_dir: str, **fields) -> dict:
  """Merges fields into run.json (atomically: write then rename) and returns the record."""
  record = read_run_record(model_dir)
  record.update({k: _plain(v) for k, v in fields.items()})
  if jax.process_index() == 0:
    path = os.path.join(model_dir, RUN_RECORD)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
      json.dump(record, f, indent=1, sort_keys=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  return record


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, loss: float, steps_per_sec: float, tokens_per_sec: float) -> str:
  eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
  return (f"step {step}/{total}  loss {loss:.4f}  {steps_per_sec:.2f} steps/s  "
          f"{tokens_per_sec:,.0f} tokens/s  ETA {format_duration(eta)}")


class StepTimer:
  """Steps per second over the interval since the last call."""

  def __init__(self):
    self.last_time = time.perf_counter()
    self.last_step: Optional[int] = None

  def reset(self, step: int) -> None:
    self.last_time = time.perf_counter()
    self.last_step = step

  def rate(self, step: int) -> float:
    now = time.perf_counter()
    steps = step - (self.last_step if self.last_step is not None else step)
    rate = steps / (now - self.last_time) if now > self.last_time and steps > 0 else 0.0
    self.last_time, self.last_step = now, step
    return rate


def print_progress(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stdout, flush=True)

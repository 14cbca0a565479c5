"""What the launcher knows about each stage, from files only: the stage's run.json and metrics.jsonl
(written by training), and the launcher's own state directory (one log per stage, pid files).

Log files: `<state_dir>/logs/<run>/<stage>.log` holds the training output of every attempt, between
launcher lines `[launch <time>] <event>: <text>` with events started, exited, complete, failed, stopped.
Pid files: `<state_dir>/pids/<run>/<stage>.pid` while a stage runs; `<state_dir>/launcher.pid` while a
launcher runs the grid.

States: pending (never started), running, complete, failed (retries used up, or a non-finite loss),
preempted (SIGTERM: checkpointed, resumes on the next launch), stopped (ended without completing, e.g. the
launcher was killed; resumes on the next launch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Optional, Sequence

from launch import storage
from launch.grid import Stage

_EVENT = re.compile(r"^\[launch [^\]]*\] (started|exited|complete|failed|stopped|note)\b(.*)$")
STATES = ("pending", "running", "complete", "failed", "preempted", "stopped")


# ---- the state directory -----------------------------------------------------------------------------
class StateDir:
  """The launcher's own files for one grid: logs, pid files, the launcher lock."""

  def __init__(self, path: str):
    self.path = path

  def log_path(self, stage: Stage) -> str:
    return os.path.join(self.path, "logs", stage.run, f"{stage.name}.log")

  def pid_path(self, stage: Stage) -> str:
    return os.path.join(self.path, "pids", stage.run, f"{stage.name}.pid")

  @property
  def launcher_pid_path(self) -> str:
    return os.path.join(self.path, "launcher.pid")

  def write_pid(self, stage: Stage, pid: int) -> None:
    path = self.pid_path(stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(f"{pid}\n{stage.model_dir}\n")

  def read_pid(self, stage: Stage) -> Optional[int]:
    return read_pid_file(self.pid_path(stage))

  def remove_pid(self, stage: Stage) -> None:
    try:
      os.remove(self.pid_path(stage))
    except FileNotFoundError:
      pass

  def launcher_pid(self) -> Optional[int]:
    """The pid of a launcher running this grid now, if any."""
    pid = read_pid_file(self.launcher_pid_path)
    return pid if pid and pid != os.getpid() and process_alive(pid, ("launch",)) else None

  def event(self, stage: Stage, event: str, text: str = "") -> None:
    path = self.log_path(stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
      f.write(f"[launch {time.strftime('%Y-%m-%d %H:%M:%S')}] {event}{': ' + text if text else ''}\n")


def read_pid_file(path: str) -> Optional[int]:
  """The pid on the first line of a pid file, None if there is none."""
  try:
    with open(path) as f:
      return int(f.readline().strip())
  except (FileNotFoundError, ValueError):
    return None


def stage_markers(stage: Stage) -> tuple[str, ...]:
  """What the command line of a process running `stage` contains: its MODEL_DIR (a `scaling_arch.train`
  subprocess), or `launch.worker` (a warm worker, which runs the stages its pid file names)."""
  return (stage.model_dir, "launch.worker")


def process_alive(pid: int, markers: Sequence[str] = ()) -> bool:
  """Whether `pid` runs and (where /proc tells) its command line contains one of `markers`, so that a
  recycled pid is not taken for ours. Zombies count as dead."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      cmdline = f.read().decode(errors="replace")
  except OSError:
    return True  # no /proc: trust the signal check
  if not cmdline:
    return False  # a zombie
  return not markers or any(m in cmdline for m in markers)


# ---- one stage's state ---------------------------------------------------------------------------------
@dataclasses.dataclass
class StageStatus:
  stage: Stage
  state: str
  step: Optional[int] = None
  train_steps: Optional[int] = None
  loss: Optional[float] = None
  steps_per_sec: Optional[float] = None
  error: Optional[str] = None  # the last error line of the log, for failed stages
  log: Optional[str] = None

  @property
  def eta_s(self) -> Optional[float]:
    if self.state != "running" or not self.steps_per_sec or self.step is None or not self.train_steps:
      return None
    return max(self.train_steps - self.step, 0) / self.steps_per_sec


def log_events(path: str) -> list[tuple[str, str]]:
  """(event, text) of the launcher lines of a stage's log, oldest first."""
  text = storage.read_text(path) or ""
  return [(m.group(1), m.group(2).lstrip(": ")) for m in map(_EVENT.match, text.splitlines()) if m]


def last_error(path: str) -> Optional[str]:
  """The last `error:` line (or else the last non-launcher line) that training wrote to the log."""
  lines = [l.strip() for l in (storage.read_text(path) or "").splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:") or "Error" in l.split(":")[0]]
  if errors:
    return errors[-1]
  others = [l for l in lines if not l.startswith("[launch ")]
  return others[-1] if others else None


def last_metrics(model_dir: str) -> dict:
  """The last logged training metrics of a run (loss, steps_per_sec, step), {} if none."""
  text = storage.read_text(model_dir.rstrip("/") + "/metrics.jsonl") or ""
  for line in reversed(text.splitlines()):
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "loss" in entry:
      return entry
  return {}


def stage_status(stage: Stage, state_dir: StateDir) -> StageStatus:
  """The state of one stage, from run.json, metrics.jsonl and the launcher's log of it."""
  record = storage.read_json(stage.model_dir.rstrip("/") + "/run.json") or {}
  log = state_dir.log_path(stage)
  events = log_events(log)
  status = record.get("status")
  last, text = events[-1] if events else (None, "")
  if status == "complete":
    state = "complete"
  elif last == "failed":
    state = "failed"
  elif last == "started" and _started_alive(text, stage):
    state = "running"
  elif status and status.startswith("failed"):  # failed_nonfinite_loss, failed (data, disk)
    state = "failed"
  elif status in ("preempted", "stopped"):
    state = status
  elif status == "running":
    state = "stopped" if events else "running"  # no log here: trust the record (another machine's launch)
  elif events:
    state = "stopped"
  else:
    state = "pending"
  metrics = last_metrics(stage.model_dir) if record else {}
  step = record.get("step", metrics.get("step"))
  if state == "running" and metrics.get("step") is not None:
    # The live step: training appends to metrics.jsonl every log_every_steps steps (run.json's step may lag).
    step = max(int(metrics["step"]), int(step or 0))
  return StageStatus(stage=stage, state=state, step=step,
                     train_steps=record.get("train_steps"), loss=metrics.get("loss", record.get("final_loss")),
                     steps_per_sec=metrics.get("steps_per_sec") or record.get("steps_per_sec"),
                     error=last_error(log) if state == "failed" else None,
                     log=log if os.path.exists(log) else None)


def _started_alive(text: str, stage: Stage) -> bool:
  m = re.search(r"\(pid (\d+)\)", text)
  return bool(m) and process_alive(int(m.group(1)), (stage.model_dir, "launch"))


# ---- the table -----------------------------------------------------------------------------------------
def _duration(seconds: Optional[float]) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "-"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def table(statuses: Sequence[StageStatus]) -> str:
  """The status table (run, stage, state, step / total steps, last loss, steps/s, ETA) and a summary."""
  header = ("run", "stage", "state", "step", "loss", "steps/s", "ETA")
  rows = [header]
  for s in statuses:
    step = "-" if s.step is None else f"{s.step}/{s.train_steps if s.train_steps else '?'}"
    rows.append((s.stage.run, s.stage.name, s.state, step,
                 "-" if s.loss is None else f"{float(s.loss):.4f}",
                 "-" if not s.steps_per_sec else f"{float(s.steps_per_sec):.2f}", _duration(s.eta_s)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  lines.append("")
  lines.append(summary(statuses))
  for s in statuses:
    if s.state == "failed":
      lines.append(f"failed: {s.stage.key}: {s.error or 'see the log'} (log: {s.log or '-'})")
  return "\n".join(lines)


def summary(statuses: Sequence[StageStatus]) -> str:
  counts = {state: sum(s.state == state for s in statuses) for state in STATES}
  runs = {s.stage.run for s in statuses}
  done_runs = {r for r in runs if all(s.state == "complete" for s in statuses if s.stage.run == r)}
  parts = [f"{n} {state}" for state, n in counts.items() if n]
  known = [s for s in statuses if s.train_steps]
  steps = sum(min(s.step or 0, s.train_steps) for s in known)
  total = sum(s.train_steps for s in known)
  progress = f"; {steps:,}/{total:,} steps of started stages ({100 * steps / total:.1f}%)" if total else ""
  return (f"{len(done_runs)}/{len(runs)} runs complete; {len(statuses)} stages: {', '.join(parts) or 'none'}"
          f"{progress}")

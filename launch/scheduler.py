"""Runs a grid's stages on a backend: in order within a run, several runs at once, with retries.

Rules:
- a stage whose run.json says `complete` is skipped; so running a grid again resumes what is unfinished
  (training resumes from MODEL_DIR's checkpoint) and never touches what is finished;
- a run's stage starts only after the run's previous stage completed, initialized from its latest
  checkpoint (`--gin.INITIAL_CHECKPOINT`);
- at most `backend.slots` stages run at once; a failed attempt is retried up to `max_retries` times, then
  the stage is failed and its run's later stages are not started; the other runs go on;
- each stage's configuration is kept in MODEL_DIR/launch_spec.json; a stage whose MODEL_DIR holds results
  of a different configuration is refused before anything starts;
- SIGTERM / SIGINT stop the launcher: running stages get SIGTERM (they checkpoint) and are not retried.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Callable, Optional, Sequence

from launch import records, storage
from launch.grid import SPEC_FILE, LaunchError, Run, Stage


# ---- the backend interface ----------------------------------------------------------------------------
class Job:
  """One attempt of one stage, running somewhere."""

  pid: int

  def poll(self) -> Optional[int]:
    """The exit status once the attempt ended, else None."""
    raise NotImplementedError

  def terminate(self) -> None:
    """Ask the training to checkpoint and stop (SIGTERM)."""
    raise NotImplementedError

  def kill(self) -> None:
    raise NotImplementedError


class Backend:
  """Where stages run. Subclasses: launch.local.Local, launch.tpu_vm.TpuVm."""

  slots = 1
  max_retries = 2
  retry_delay_s = 0.0

  def stages_per_machine(self) -> int:
    """Stages that may run at once on one machine (their step times then share it)."""
    return 1

  def attach(self, grid, state_dir: records.StateDir) -> None:
    """Called once with the grid and its state directory before anything else."""

  def dry_run(self, stage: Stage, initial_checkpoint: Optional[str]) -> list[str]:
    """The commands `start` would run for this stage, for --dry-run."""
    raise NotImplementedError

  def dry_run_prepare(self) -> list[str]:
    return []

  def dry_run_finish(self) -> list[str]:
    return []

  def check(self, runs: Sequence[Run], out: Callable[[str], None]) -> None:
    """Before anything is written or created: refuse (LaunchError) what cannot work (tpu_vm: the plan)."""

  def prepare(self, out: Callable[[str], None]) -> None:
    """Before the first stage starts (e.g. create the TPU VMs)."""

  def start(self, stage: Stage, initial_checkpoint: Optional[str], log_path: str, slot: int) -> Job:
    raise NotImplementedError

  def finish(self, all_complete: bool, out: Callable[[str], None]) -> None:
    """After the last stage ended (e.g. delete the TPU VMs)."""

  def cancel(self, runs: Sequence[Run], state_dir: records.StateDir, out: Callable[[str], None]) -> int:
    raise NotImplementedError


# ---- launch specs --------------------------------------------------------------------------------------
def _spec_path(stage: Stage) -> str:
  return stage.model_dir.rstrip("/") + "/" + SPEC_FILE


def _has_results(stage: Stage) -> bool:
  base = stage.model_dir.rstrip("/")
  return storage.exists(base + "/run.json") or storage.latest_checkpoint(base) is not None


def _difference(saved: dict, spec: dict) -> str:
  for key in ("gin_files", "bindings"):
    a, b = saved.get(key, []), spec[key]
    if a != b:
      gone, new = [x for x in a if x not in b], [x for x in b if x not in a]
      if gone or new:
        return f"{key}: {gone} there, {new} now"
      return f"{key}: order {a} there, {b} now"
  for key in sorted(set(saved) | set(spec)):
    if key not in SPEC_RECORD_KEYS and saved.get(key) != spec.get(key):
      return f"{key}: {saved.get(key)!r} there, {spec.get(key)!r} now"
  return "hash differs"


def check_specs(stages: Sequence[Stage]) -> None:
  """Refuses (LaunchError) a stage whose MODEL_DIR holds results of another configuration."""
  remote = any(storage.is_remote(s.model_dir) for s in stages)
  saved_specs = storage.parallel_map(lambda s: storage.read_json(_spec_path(s)), stages, remote)
  for stage, saved in zip(stages, saved_specs):
    spec = stage.spec()
    if saved and saved.get("hash") != spec["hash"] and _has_results(stage):
      raise LaunchError(
          f"Run {stage.run} stage {stage.name}: {stage.model_dir} holds results of a different configuration "
          f"({_difference(saved, spec)}); nothing was started. Restore the grid's configuration for this "
          "run, or give the changed run a new name (another variant or EXPERIMENT_ROOT).")


# What write_spec adds beside the configuration: where and how the stage was launched.
SPEC_RECORD_KEYS = ("hash", "grid", "created", "stages_per_machine")


def write_spec(stage: Stage, grid_path: Optional[str], stages_per_machine: int = 1) -> None:
  """Keeps the stage's configuration in its MODEL_DIR, with how many stages could share its machine (the
  analysis says when step times were measured on a shared machine)."""
  spec = stage.spec()
  saved = storage.read_json(_spec_path(stage))
  if saved and saved.get("hash") == spec["hash"]:
    return
  storage.write_json(_spec_path(stage), {**spec, "grid": grid_path, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                         "stages_per_machine": int(stages_per_machine)})


def is_complete(stage: Stage) -> bool:
  record = storage.read_json(stage.model_dir.rstrip("/") + "/run.json") or {}
  return record.get("status") == "complete"


# ---- the scheduler -------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Running:
  job: Job
  slot: int
  attempt: int


def console(line: str) -> None:
  print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


class Scheduler:
  """Runs the stages of `runs` on `backend`; `run()` returns the exit status (0: all complete)."""

  def __init__(self, runs: Sequence[Run], backend: Backend, state_dir: records.StateDir, *,
               grid_path: Optional[str] = None, out: Callable[[str], None] = console,
               poll_s: float = 0.5, stale_wait_s: float = 180.0):
    self.runs = list(runs)
    self.backend = backend
    self.state = state_dir
    self.grid_path = grid_path
    self.out = out
    self.poll_s = poll_s
    self.stale_wait_s = stale_wait_s
    self.stopping = False
    self.killing = False
    self._signals: list[int] = []

  @property
  def stages(self) -> list[Stage]:
    return [s for r in self.runs for s in r.stages]

  # -- dry run ---------------------------------------------------------------------------------------
  def dry_run(self) -> int:
    check_specs(self.stages)
    for line in self.backend.dry_run_prepare():
      print(line)
    for stage in self.stages:
      if is_complete(stage):
        print(f"# {stage.key}: complete, skipped")
        continue
      checkpoint = None
      if stage.previous is not None:
        checkpoint = (storage.latest_checkpoint(stage.previous.model_dir) if is_complete(stage.previous)
                      else None) or f"{stage.previous.model_dir}/checkpoints/<final step of {stage.previous.name}>"
      print(f"# {stage.key}  (MODEL_DIR {stage.model_dir}; log {self.state.log_path(stage)})")
      for line in self.backend.dry_run(stage, checkpoint):
        print(line)
    for line in self.backend.dry_run_finish():
      print(line)
    return 0

  # -- real run --------------------------------------------------------------------------------------
  def _check_no_leftovers(self) -> None:
    other = self.state.launcher_pid()
    if other:
      raise LaunchError(f"Another launcher (pid {other}) is running this grid (state in {self.state.path}); "
                        "wait for it, or stop it with `python -m launch cancel GRID`.")
    deadline = time.time() + self.stale_wait_s
    for stage in self.stages:
      pid = self.state.read_pid(stage)
      if pid is None:
        continue
      if records.process_alive(pid, records.stage_markers(stage)):
        self.out(f"waiting for {stage.key} (pid {pid}) from an earlier launch to finish its checkpoint")
      while records.process_alive(pid, records.stage_markers(stage)) and time.time() < deadline:
        time.sleep(1.0)
      if records.process_alive(pid, records.stage_markers(stage)):
        raise LaunchError(f"Run {stage.run} stage {stage.name} is still running from an earlier launch "
                          f"(pid {pid}); wait for it, or stop it with `python -m launch cancel GRID`.")
      self.state.remove_pid(stage)

  def _on_signal(self, signum, frame) -> None:
    del frame
    self.killing = self.stopping
    self.stopping = True
    self._signals.append(signum)  # reported by the loop: printing here could re-enter a print

  def run(self) -> int:
    self.backend.check(self.runs, self.out)
    check_specs(self.stages)
    os.makedirs(self.state.path, exist_ok=True)
    self._check_no_leftovers()
    with open(self.state.launcher_pid_path, "w") as f:
      f.write(f"{os.getpid()}\n{' '.join(sys.argv)}\n")
    previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      return self._loop()
    finally:
      for s, h in previous_handlers.items():
        signal.signal(s, h)
      if records.read_pid_file(self.state.launcher_pid_path) == os.getpid():
        os.remove(self.state.launcher_pid_path)

  def _loop(self) -> int:
    stages = self.stages
    done = storage.parallel_map(is_complete, stages, any(storage.is_remote(s.model_dir) for s in stages))
    state = {stage.key: "complete" if complete else "todo" for stage, complete in zip(stages, done)}
    complete_runs = [r.name for r in self.runs if all(state[s.key] == "complete" for s in r.stages)]
    if complete_runs:
      self.out(f"skipping {len(complete_runs)} complete run(s): {', '.join(complete_runs)}")
    if all(v == "complete" for v in state.values()):
      self.out("nothing to do: every selected run is complete")
      self.backend.finish(True, self.out)
      return 0
    self.backend.prepare(self.out)
    attempts: dict[str, int] = {}
    not_before: dict[str, float] = {}
    running: dict[str, _Running] = {}
    free = list(range(self.backend.slots))
    tries = 1 + self.backend.max_retries
    terminated = False
    while True:
      while self._signals:
        name = signal.Signals(self._signals.pop(0)).name
        self.out(f"{name}: stopping; " + ("killing the running stages" if self.killing else
                                          "running stages checkpoint first (signal again to kill them)"))
      if self.stopping and not terminated:
        for r in running.values():
          r.job.terminate()
        terminated = True
      if self.killing:
        for r in running.values():
          r.job.kill()
      # start what is ready
      while free and not self.stopping:
        stage = self._next_ready(state, running, not_before)
        if stage is None:
          break
        slot = free.pop(0)
        attempts[stage.key] = attempts.get(stage.key, 0) + 1
        job = self._start(stage, attempts[stage.key], tries, slot)
        if job is None:  # could not start: counts as a failed attempt
          free.insert(0, slot)
          self._attempt_failed(stage, state, attempts, tries, not_before, "could not start")
          continue
        running[stage.key] = _Running(job, slot, attempts[stage.key])
      # collect what ended
      for key in list(running):
        r = running[key]
        code = r.job.poll()
        if code is None:
          continue
        del running[key]
        free.append(r.slot)
        free.sort()
        stage = next(s for s in self.stages if s.key == key)
        self.state.remove_pid(stage)
        if is_complete(stage):
          state[key] = "complete"
          self.state.event(stage, "complete", f"attempt {r.attempt}/{tries}")
          self.out(f"complete {key}")
        elif self.stopping:
          state[key] = "stopped"
          self.state.event(stage, "stopped", f"by the launcher (exit status {code}); the next launch resumes it")
          self.out(f"stopped  {key} (exit status {code})")
        else:
          record = storage.read_json(stage.model_dir.rstrip("/") + "/run.json") or {}
          self._attempt_failed(stage, state, attempts, tries, not_before,
                               f"exit status {code}, run.json status {record.get('status', 'absent')}")
      if not running and (self.stopping or self._next_ready(state, running, {}) is None):
        break
      time.sleep(self.poll_s)
    return self._finish(state)

  def _next_ready(self, state, running, not_before) -> Optional[Stage]:
    now = time.time()
    for run in self.runs:
      for stage in run.stages:
        if state[stage.key] == "complete":
          continue
        if state[stage.key] == "todo" and stage.key not in running and not_before.get(stage.key, 0) <= now:
          return stage
        break  # this run's later stages wait for this one
    return None

  def _start(self, stage: Stage, attempt: int, tries: int, slot: int) -> Optional[Job]:
    checkpoint = None
    log = self.state.log_path(stage)
    if stage.previous is not None:
      checkpoint = storage.latest_checkpoint(stage.previous.model_dir)
      if checkpoint is None:
        self.state.event(stage, "note", f"{stage.previous.key} is complete but {stage.previous.model_dir}"
                         "/checkpoints holds no finished checkpoint")
        return None
    write_spec(stage, self.grid_path, self.backend.stages_per_machine())
    try:
      job = self.backend.start(stage, checkpoint, log, slot)
    except (OSError, LaunchError) as e:
      self.state.event(stage, "note", f"could not start: {e}")
      return None
    self.state.write_pid(stage, job.pid)
    self.state.event(stage, "started", f"attempt {attempt}/{tries} (pid {job.pid})")
    self.out(f"start    {stage.key} (attempt {attempt}/{tries}); log {log}")
    return job

  def _attempt_failed(self, stage, state, attempts, tries, not_before, why: str) -> None:
    n = attempts[stage.key]
    self.state.event(stage, "exited", f"attempt {n}/{tries}: {why}")
    if n < tries:
      state[stage.key] = "todo"
      not_before[stage.key] = time.time() + self.backend.retry_delay_s
      self.out(f"retry    {stage.key} ({why}; attempt {n}/{tries})")
    else:
      state[stage.key] = "failed"
      self.state.event(stage, "failed", f"after {n} attempt(s) ({why})")
      error = records.last_error(self.state.log_path(stage))
      self.out(f"FAILED   {stage.key} after {n} attempt(s): {error or why}; log {self.state.log_path(stage)}")

  def _finish(self, state: dict) -> int:
    counts = {}
    for v in state.values():
      counts[v] = counts.get(v, 0) + 1
    all_complete = all(v == "complete" for v in state.values())
    self.backend.finish(all_complete, self.out)
    self.out("done: " + ", ".join(f"{n} {'pending (not started)' if k == 'todo' else k}"
                                  for k, n in sorted(counts.items())) + f" of {len(state)} stages")
    if self.stopping:
      return 128 + signal.SIGTERM
    return 0 if all_complete else 1

"""The local backend: each stage is a subprocess `python -m scaling_arch.train ...` on this machine, or,
with `reuse_processes`, a request to a warm worker process of its slot (`python -m launch.worker`, which
runs stage after stage with the trainer imported once).

Subprocesses run in their own sessions (a Ctrl-C in the terminal reaches only the launcher, which passes
SIGTERM on so they checkpoint) and, on Linux, get SIGTERM if the launcher dies, so a killed launcher
leaves checkpoints rather than orphans. Output goes to the stage's log file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

import gin

from launch import records
from launch.grid import Run, Stage
from launch.scheduler import Backend, Job

_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child
  _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
  _LIBC = None


def _repo_root() -> str:
  """The directory holding the `scaling_arch` package this launcher runs with."""
  import scaling_arch
  return os.path.dirname(os.path.dirname(os.path.abspath(scaling_arch.__file__)))


def _die_with_parent(parent: int) -> Callable[[], None]:
  def preexec():
    if _LIBC is not None:
      _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
      if os.getppid() != parent:  # the launcher died before prctl
        os.kill(os.getpid(), signal.SIGTERM)
  return preexec


class LocalJob(Job):
  """A training subprocess."""

  def __init__(self, command: Sequence[str], log_path: str, env: Mapping[str, str]):
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
      self.process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, env=dict(env), start_new_session=True,
                                      preexec_fn=_die_with_parent(os.getpid()))
    self.pid = self.process.pid

  def poll(self) -> Optional[int]:
    return self.process.poll()

  def terminate(self) -> None:
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()


WORKER_COMMAND = ("-m", "launch.worker")


class Worker:
  """A `python -m launch.worker` process serving one slot: stages go in on its stdin, statuses come back
  on its stdout (see launch/worker.py)."""

  def __init__(self, first_log_path: str, env: Mapping[str, str]):
    os.makedirs(os.path.dirname(first_log_path), exist_ok=True)
    with open(first_log_path, "ab") as log:  # its start-up output, before the first stage redirects it
      self.process = subprocess.Popen([sys.executable, *WORKER_COMMAND], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=log, env=dict(env),
                                      start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    os.set_blocking(self.process.stdout.fileno(), False)
    self.pid = self.process.pid
    self._answers = b""
    self.busy = False

  def idle(self) -> bool:
    return not self.busy and self.process.poll() is None

  def submit(self, argv: Sequence[str], log_path: str) -> "WorkerJob":
    self.busy = True
    self.process.stdin.write((json.dumps({"argv": list(argv), "log": log_path}) + "\n").encode())
    self.process.stdin.flush()
    return WorkerJob(self)

  def status(self) -> Optional[int]:
    """The running stage's exit status once it has ended, else None."""
    try:
      chunk = self.process.stdout.read()
    except (OSError, ValueError):
      chunk = None
    self._answers += chunk or b""
    if b"\n" in self._answers:
      line, self._answers = self._answers.split(b"\n", 1)
      self.busy = False
      return int(json.loads(line)["status"])
    code = self.process.poll()
    if code is not None:  # died mid-stage (killed, or crashed natively) without answering
      self.busy = False
      return code if code != 0 else 1
    return None

  def close(self) -> None:
    """End of input: an idle worker exits."""
    try:
      self.process.stdin.close()
    except OSError:
      pass


class WorkerJob(Job):
  """One stage running in a Worker."""

  def __init__(self, worker: Worker):
    self.worker = worker
    self.pid = worker.pid
    self._code: Optional[int] = None

  def poll(self) -> Optional[int]:
    if self._code is None:
      self._code = self.worker.status()
    return self._code

  def terminate(self) -> None:
    if self.worker.process.poll() is None:
      self.worker.process.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    if self.worker.process.poll() is None:
      self.worker.process.kill()


@gin.configurable(module="launch")
class Local(Backend):
  """Runs stages as subprocesses of this machine.

  Args:
    concurrency: stages running at once (each uses every core it is given: 1 on a small CPU host).
    max_retries: further attempts of a failed stage before it counts as failed.
    retry_delay_s: seconds before a failed stage is tried again.
    command: the training command (default: this Python, `-m scaling_arch.train`).
    env: extra environment variables for the stages, e.g. {'XLA_FLAGS': '...'}.
    compilation_cache_dir: JAX's persistent compilation cache for the stages (JAX_COMPILATION_CACHE_DIR,
      unless the environment already sets it; None: none). Seed replicates and reruns compile the same
      programs: a tiny CPU stage starts in 29 s instead of 46 s when its compiles are cached.
    reuse_processes: run the stages in one warm `python -m launch.worker` process per slot instead of a
      new `command` each, so imports and TensorFlow's pipeline tracing are paid once per slot (worth it
      for many short stages: the CPU study). `command` is then only what --dry-run prints; a stage that
      fails ends its worker, so its retry starts fresh.
  """

  def __init__(self, concurrency: int = 1, max_retries: int = 2, retry_delay_s: float = 0.0,
               command: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None,
               compilation_cache_dir: Optional[str] = "~/.cache/scaling_arch/jax_compilation",
               reuse_processes: bool = False):
    self.reuse_processes = bool(reuse_processes)
    self._workers: dict[int, Worker] = {}
    self.slots = int(concurrency)
    self.max_retries = int(max_retries)
    self.retry_delay_s = float(retry_delay_s)
    self.command = list(command) if command else [sys.executable, "-m", "scaling_arch.train"]
    self.env = {k: str(v) for k, v in (env or {}).items()}
    self.compilation_cache_dir = compilation_cache_dir

  def stages_per_machine(self) -> int:
    return self.slots

  def command_for(self, stage: Stage, initial_checkpoint: Optional[str]) -> list[str]:
    return self.command + stage.train_args(initial_checkpoint)

  def environment(self) -> dict[str, str]:
    env = dict(os.environ)
    root = _repo_root()
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p and p != root])
    env["PYTHONUNBUFFERED"] = "1"
    if self.compilation_cache_dir and "JAX_COMPILATION_CACHE_DIR" not in env:
      env["JAX_COMPILATION_CACHE_DIR"] = os.path.expanduser(self.compilation_cache_dir)
    env.update(self.env)
    return env

  def dry_run(self, stage: Stage, initial_checkpoint: Optional[str]) -> list[str]:
    return [shlex.join(self.command_for(stage, initial_checkpoint))]

  def start(self, stage: Stage, initial_checkpoint: Optional[str], log_path: str, slot: int) -> Job:
    if not self.reuse_processes:
      return LocalJob(self.command_for(stage, initial_checkpoint), log_path, self.environment())
    worker = self._workers.get(slot)
    if worker is not None and worker.idle():
      try:
        return worker.submit(stage.train_args(initial_checkpoint), log_path)
      except OSError:  # it ended since its last stage: a new one
        pass
    if worker is not None:
      worker.close()
    worker = self._workers[slot] = Worker(log_path, self.environment())
    return worker.submit(stage.train_args(initial_checkpoint), log_path)

  def finish(self, all_complete: bool, out: Callable[[str], None]) -> None:
    del all_complete, out
    workers, self._workers = list(self._workers.values()), {}
    for worker in workers:
      worker.close()
    for worker in workers:
      try:
        worker.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        worker.process.kill()

  def cancel(self, runs: Sequence[Run], state_dir: records.StateDir, out: Callable[[str], None],
             timeout_s: float = 600.0) -> int:
    """SIGTERMs the grid's launcher (which stops its stages), or else the selected stages' processes left
    by a killed launcher, then waits for them to exit."""
    targets = []
    launcher = state_dir.launcher_pid()
    if launcher:
      os.kill(launcher, signal.SIGTERM)
      out(f"sent SIGTERM to the launcher (pid {launcher}); it passes it to its stages, which checkpoint")
      targets.append((launcher, ("launch",), "the launcher"))
    for run in runs:
      for stage in run.stages:
        pid = state_dir.read_pid(stage)
        if not pid or not records.process_alive(pid, records.stage_markers(stage)):
          continue
        if not launcher:  # no launcher to pass the signal on (it was killed): signal the stage directly
          try:
            os.kill(pid, signal.SIGTERM)
          except ProcessLookupError:
            continue
          out(f"sent SIGTERM to {stage.key} (pid {pid}); it checkpoints and exits")
        targets.append((pid, records.stage_markers(stage), stage.key))
    if not targets:
      out("nothing is running for this grid")
      return 0
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(records.process_alive(p, m) for p, m, _ in targets):
      time.sleep(0.5)
    left = [what for p, m, what in targets if records.process_alive(p, m)]
    if left:
      out(f"still running after {timeout_s:.0f} s: {', '.join(left)}")
      return 1
    out("cancelled: every process stopped; `python -m launch run GRID` resumes from the checkpoints")
    return 0

"""The Cloud TPU VM backend: a pool of TPU VMs (the study's slice is v3-32: 16 TPU-v3 chips, 4 hosts), each
running one stage at a time on every worker through `gcloud compute tpus tpu-vm ssh --worker=all`.

Lifecycle of a pool VM `<prefix>-<i>`:
- `prepare` (each launch): describe it; create it if absent (or delete and recreate it if preempted or
  stopped), optionally as a spot / preemptible VM or through a queued resource; then install the code
  on every worker. Only what training needs travels: either the workers `git clone` repo_url at
  repo_ref, or a `git archive` of setup.py, scaling_arch/, tasks/ and gin/ at the local HEAD is copied
  (`tpu-vm scp --worker=all`); installation is skipped when that commit is already installed. Data,
  checkpoints and records live under gs:// paths, never copied.
- a stage: `ssh --worker=all` runs `python -m scaling_arch.train --distributed ...` on every worker,
  detached from the ssh session (nohup, output to a file on the worker that the session streams back into
  the stage's local log), so a lost connection or a killed launcher does not kill training; a rerun first
  stops (SIGTERM, then waits for the checkpoint) any training the worker still runs. When an attempt
  fails and the VM is no longer READY (preempted), the next attempt recreates it.
- `cancel` stops the training on the workers (SIGTERM: they checkpoint) and deletes the VMs;
  `delete_when_done` deletes them after the grid completes.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from typing import IO, Callable, Optional, Sequence

import gin

from launch import records
from launch.grid import LaunchError, Run, Stage
from launch.scheduler import Backend, Job

DEFAULT_INSTALL = ('{python} -m pip install -q -e ".[tpu]" && '
                   '{python} -m pip install -q --no-deps "t5==0.9.4"')
SHIP_PATHS = ("setup.py", "scaling_arch", "tasks", "gin")
REMOTE_PID = "~/.scaling_arch_train.pid"
REMOTE_ARCHIVE = "scaling-arch-code.tar.gz"
_WAIT_STATES = {"CREATING", "STARTING", "RESTARTING", "REPAIRING",  # a TPU VM's
                "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}  # a queued resource's


def vm_prefix(grid_name: str) -> str:
  """A valid TPU name prefix (lowercase letters, digits, '-') from a grid name."""
  name = re.sub(r"[^a-z0-9-]+", "-", f"scaling-arch-{grid_name}".lower()).strip("-")
  return name[:50]


class TpuJob(Job):
  """One stage attempt on one pool VM: (re)create the VM if needed, then ssh the training command."""

  def __init__(self, backend: "TpuVm", vm: str, stage: Stage, checkpoint: Optional[str], log_path: str):
    self.pid = os.getpid()  # the launcher holds the ssh session
    self.backend, self.vm, self.stage, self.checkpoint, self.log_path = backend, vm, stage, checkpoint, log_path
    self._code: Optional[int] = None
    self._stop = False
    self._proc: Optional[subprocess.Popen] = None
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    self._thread = threading.Thread(target=self._main, daemon=True, name=f"tpu-{stage.key}")
    self._thread.start()

  def _main(self) -> None:
    code = 1
    log = open(self.log_path, "ab", buffering=0)
    try:
      try:
        if self.backend.state(self.vm) != "READY":
          self.backend.ensure(self.vm, log)
        if not self._stop:
          self._proc = self.backend.popen(self.backend.train_command(self.vm, self.stage, self.checkpoint), log)
          code = self._proc.wait()
        if self._stop:
          self.backend.stop_remote(self.vm, log)
          code = 128 + signal.SIGTERM
        elif code != 0:
          state = self.backend.state(self.vm)
          if state != "READY":
            log.write(f"[launch] TPU VM {self.vm} is {state or 'gone'}; the next attempt recreates it\n".encode())
      except LaunchError as e:
        log.write(f"error: {e}\n".encode())
      except Exception as e:  # noqa: BLE001  (a failed attempt, never a hung launcher)
        log.write(f"error: {type(e).__name__}: {e}\n".encode())
    finally:
      log.close()
      self._code = code

  def poll(self) -> Optional[int]:
    return self._code

  def terminate(self) -> None:
    self._stop = True
    if self._proc is not None and self._proc.poll() is None:
      self._proc.terminate()

  def kill(self) -> None:
    self.terminate()


@gin.configurable(module="launch")
class TpuVm(Backend):
  """Runs stages on a pool of Cloud TPU VMs with gcloud.

  Args:
    zone, project: where the VMs live (project: gcloud's default when None).
    accelerator_type: e.g. 'v3-32' (the study's 16 TPU-v3 chips on 4 hosts); runtime_version: the VM image.
    num_vms: VMs in the pool = stages running at once.
    name_prefix: VM names are <prefix>-<i>; default scaling-arch-<grid name>.
    spot / preemptible: cheaper, preemptible capacity (spot is the current kind); queued_resource: ask
      through `gcloud compute tpus queued-resources` (waits for capacity; spot allowed).
    delete_when_done: delete the pool after every selected stage completed.
    max_retries / retry_delay_s: for failed attempts (a preemption counts as one).
    repo_url / repo_ref: workers `git clone` this repository at this ref; when None, a `git archive` of
      the local HEAD (ship_paths only) is copied instead.
    workdir, python, install_command: where and how the code is installed on each worker.
    gcloud: the gcloud executable.
  """

  def __init__(self, *, zone: Optional[str] = None, project: Optional[str] = None,
               accelerator_type: str = "v3-32", runtime_version: str = "tpu-ubuntu2204-base",
               num_vms: int = 1, name_prefix: Optional[str] = None, spot: bool = False,
               preemptible: bool = False, queued_resource: bool = False, delete_when_done: bool = False,
               max_retries: int = 5, retry_delay_s: float = 60.0, repo_url: Optional[str] = None,
               repo_ref: str = "main", ship_paths: Sequence[str] = SHIP_PATHS, workdir: str = "scaling-arch",
               python: str = "python3", install_command: str = DEFAULT_INSTALL, gcloud: str = "gcloud",
               poll_s: float = 30.0, create_timeout_s: float = 24 * 3600.0):
    if spot and preemptible:
      raise LaunchError("launch.TpuVm: set spot or preemptible, not both (spot is the current kind).")
    if queued_resource and preemptible:
      raise LaunchError("launch.TpuVm: queued resources take spot=True, not preemptible=True.")
    self.zone, self.project = zone, project
    self.accelerator_type, self.runtime_version = accelerator_type, runtime_version
    self.slots = int(num_vms)
    self.name_prefix = name_prefix
    self.spot, self.preemptible, self.queued_resource = spot, preemptible, queued_resource
    self.delete_when_done = delete_when_done
    self.max_retries, self.retry_delay_s = int(max_retries), float(retry_delay_s)
    self.repo_url, self.repo_ref, self.ship_paths = repo_url, repo_ref, tuple(ship_paths)
    self.workdir, self.python = workdir, python
    self.install_command = install_command.format(python=python)
    self.gcloud = gcloud
    self.poll_s, self.create_timeout_s = poll_s, create_timeout_s
    self.log_dir = tempfile.gettempdir()
    self._archive: Optional[tuple[str, str]] = None  # (local path, commit)

  def attach(self, grid, state_dir: records.StateDir) -> None:
    self.name_prefix = self.name_prefix or vm_prefix(grid.name)
    self.log_dir = os.path.join(state_dir.path, "vms")

  @property
  def vms(self) -> list[str]:
    return [f"{self.name_prefix or 'scaling-arch'}-{i}" for i in range(self.slots)]

  # -- gcloud command lines -------------------------------------------------------------------------------
  def _cmd(self, *args: str) -> list[str]:
    if not self.zone:
      raise LaunchError("launch.TpuVm.zone is not set: pass e.g. --gin.launch.TpuVm.zone=\"'europe-west4-a'\" "
                        "(or the grid's TPU_ZONE macro).")
    cmd = [self.gcloud, "compute", "tpus", *args, f"--zone={self.zone}"]
    return cmd + ([f"--project={self.project}"] if self.project else [])

  def describe_command(self, vm: str) -> list[str]:
    if self.queued_resource:
      return self._cmd("queued-resources", "describe", vm, "--format=value(state.state)")
    return self._cmd("tpu-vm", "describe", vm, "--format=value(state)")

  def create_command(self, vm: str) -> list[str]:
    if self.queued_resource:
      return self._cmd("queued-resources", "create", vm, f"--node-id={vm}",
                       f"--accelerator-type={self.accelerator_type}", f"--runtime-version={self.runtime_version}",
                       *(["--spot"] if self.spot else []))
    return self._cmd("tpu-vm", "create", vm, f"--accelerator-type={self.accelerator_type}",
                     f"--version={self.runtime_version}", *(["--spot"] if self.spot else []),
                     *(["--preemptible"] if self.preemptible else []))

  def delete_command(self, vm: str) -> list[str]:
    if self.queued_resource:
      return self._cmd("queued-resources", "delete", vm, "--force", "--quiet")
    return self._cmd("tpu-vm", "delete", vm, "--quiet")

  def ssh_command(self, vm: str, command: str) -> list[str]:
    return self._cmd("tpu-vm", "ssh", vm, "--worker=all", f"--command={command}")

  def scp_command(self, vm: str, archive: str) -> list[str]:
    return self._cmd("tpu-vm", "scp", archive, f"{vm}:~/{REMOTE_ARCHIVE}", "--worker=all")

  def setup_script(self, commit: str) -> str:
    """Installs the code on a worker, unless this commit is installed already."""
    q = shlex.quote
    stamp = f"{self.workdir}/.launch_installed"
    if self.repo_url:
      fetch = (f"if [ ! -d {q(self.workdir)}/.git ]; then git clone -q {q(self.repo_url)} {q(self.workdir)}; fi && "
               f"cd {q(self.workdir)} && git fetch -q origin && git checkout -q {q(commit)}")
    else:
      fetch = (f"rm -rf {q(self.workdir)} && mkdir -p {q(self.workdir)} && "
               f"tar xzf ~/{REMOTE_ARCHIVE} -C {q(self.workdir)} && cd {q(self.workdir)}")
    return (f"set -e; if [ \"$(cat {stamp} 2>/dev/null)\" != {q(commit)} ]; then {fetch} && "
            f"{self.install_command} && echo {q(commit)} > .launch_installed; fi")

  def train_command(self, vm: str, stage: Stage, checkpoint: Optional[str]) -> list[str]:
    """ssh --worker=all: stop a leftover training, start this stage detached, stream its output."""
    train = " ".join(map(_quote, [self.python, "-m", "scaling_arch.train", "--distributed",
                                  *stage.train_args(checkpoint)]))
    log = f"~/scaling_arch_logs/{stage.run}.{stage.name}.log"
    script = (f"cd {shlex.quote(self.workdir)} && mkdir -p ~/scaling_arch_logs && {self._stop_script()} && "
              f"nohup {train} > {log} 2>&1 & T=$!; echo $T > {REMOTE_PID}; tail -n +1 -f {log} & W=$!; "
              f"wait $T; S=$?; sleep 2; kill $W; exit $S")
    return self.ssh_command(vm, script)

  def _stop_script(self, wait_s: int = 900) -> str:
    return (f"P=$(cat {REMOTE_PID} 2>/dev/null || true); if [ -n \"$P\" ] && kill -0 $P 2>/dev/null; then "
            f"echo \"stopping training pid $P (SIGTERM: it checkpoints)\"; kill -TERM $P; "
            f"for i in $(seq {wait_s}); do kill -0 $P 2>/dev/null || break; sleep 1; done; fi; true")

  def stop_command(self, vm: str) -> list[str]:
    return self.ssh_command(vm, self._stop_script())

  # -- running gcloud -------------------------------------------------------------------------------------
  def popen(self, cmd: Sequence[str], log: IO[bytes]) -> subprocess.Popen:
    log.write(f"[launch] $ {shlex.join(cmd)}\n".encode())
    return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

  def _run(self, cmd: Sequence[str], log: Optional[IO[bytes]] = None) -> subprocess.CompletedProcess:
    if log is not None:
      log.write(f"[launch] $ {shlex.join(cmd)}\n".encode())
    try:
      result = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError:
      raise LaunchError(f"{self.gcloud!r} was not found: install the Google Cloud CLI (gcloud) or set "
                        "launch.TpuVm.gcloud.") from None
    if log is not None:
      log.write((result.stdout + result.stderr).encode())
    return result

  def state(self, vm: str) -> Optional[str]:
    """The VM's (or queued resource's) state, e.g. READY / ACTIVE / PREEMPTED; None if it does not exist."""
    result = self._run(self.describe_command(vm))
    if result.returncode != 0:
      if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
        return None
      raise LaunchError(f"`{shlex.join(self.describe_command(vm))}` failed: {_last_line(result.stderr)}; "
                        "check gcloud's login, project and zone.")
    state = result.stdout.strip().upper()
    return "READY" if state == "ACTIVE" else state

  def ensure(self, vm: str, log: IO[bytes]) -> None:
    """The VM exists, is READY and has the code installed; raises LaunchError with gcloud's reason."""
    deadline = time.time() + self.create_timeout_s
    state = self.state(vm)
    while state in _WAIT_STATES and time.time() < deadline:
      time.sleep(self.poll_s)
      state = self.state(vm)
    if state not in (None, "READY"):
      log.write(f"[launch] TPU VM {vm} is {state}: deleting it to create it again\n".encode())
      self._run(self.delete_command(vm), log)
      state = None
    if state is None:
      result = self._run(self.create_command(vm), log)
      if result.returncode != 0:
        raise LaunchError(
            f"Could not create TPU VM {vm} ({self.accelerator_type} in {self.zone}): "
            f"{_last_line(result.stderr or result.stdout)}. Check the quota and capacity of the zone (or set "
            "launch.TpuVm.queued_resource / spot), then run the grid again.")
      state = self.state(vm)
      while state != "READY" and time.time() < deadline:
        if state in ("FAILED", "SUSPENDED", "PREEMPTED", "TERMINATED"):
          raise LaunchError(f"TPU VM {vm} became {state} while being created; run the grid again later.")
        time.sleep(self.poll_s)
        state = self.state(vm)
      if state != "READY":
        raise LaunchError(f"TPU VM {vm} was not READY after {self.create_timeout_s:.0f} s (state {state}).")
    self.setup(vm, log)

  def _code(self) -> tuple[Optional[str], str]:
    """(local archive or None, commit) of the code to install."""
    if self.repo_url:
      return None, self.repo_ref
    if self._archive is None:
      from launch.local import _repo_root
      root = _repo_root()
      commit = _head_commit()
      try:
        if not commit:
          raise OSError("no git commit")
        path = os.path.join(tempfile.mkdtemp(prefix="scaling-arch-code-"), REMOTE_ARCHIVE)
        subprocess.run(["git", "-C", root, "archive", "--format=tar.gz", "-o", path, "HEAD", *self.ship_paths],
                       capture_output=True, text=True, check=True)
      except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"Could not archive the code in {root} with git ({e}); set launch.TpuVm.repo_url "
                          "to a repository the workers can clone.") from None
      self._archive = (path, commit)
    return self._archive

  def setup(self, vm: str, log: IO[bytes]) -> None:
    archive, commit = self._code()
    if archive:
      result = self._run(self.scp_command(vm, archive), log)
      if result.returncode != 0:
        raise LaunchError(f"Could not copy the code to TPU VM {vm}: {_last_line(result.stderr)}.")
    result = self._run(self.ssh_command(vm, self.setup_script(commit)), log)
    if result.returncode != 0:
      raise LaunchError(f"Installing the code on TPU VM {vm} failed: {_last_line(result.stderr or result.stdout)}; "
                        f"see {getattr(log, 'name', 'the log')}.")

  def stop_remote(self, vm: str, log: IO[bytes]) -> None:
    self._run(self.stop_command(vm), log)

  # -- the backend interface ------------------------------------------------------------------------------
  def dry_run_prepare(self) -> list[str]:
    lines = []
    for vm in self.vms:
      lines.append(f"# TPU VM {vm}: created unless it exists and is READY (recreated if preempted)")
      lines.append(shlex.join(self.describe_command(vm)))
      lines.append(shlex.join(self.create_command(vm)))
      if self.repo_url:
        commit = self.repo_ref
      else:
        from launch.local import _repo_root
        lines.append(f"git -C {shlex.quote(_repo_root())} archive --format=tar.gz -o /tmp/{REMOTE_ARCHIVE} HEAD "
                     f"{' '.join(self.ship_paths)}")
        lines.append(shlex.join(self.scp_command(vm, f"/tmp/{REMOTE_ARCHIVE}")))
        commit = _head_commit() or "<HEAD commit>"
      lines.append(shlex.join(self.ssh_command(vm, self.setup_script(commit))))
    return lines

  def dry_run_finish(self) -> list[str]:
    if not self.delete_when_done:
      return []
    return ["# once every selected stage is complete:"] + [shlex.join(self.delete_command(vm)) for vm in self.vms]

  def dry_run(self, stage: Stage, initial_checkpoint: Optional[str]) -> list[str]:
    vm = self.vms[0] if self.slots == 1 else f"{self.name_prefix}-<free VM of {self.slots}>"
    return [shlex.join(self.train_command(vm, stage, initial_checkpoint))]

  skip_plan = False  # the command line's --skip-plan

  def check(self, runs: Sequence[Run], out: Callable[[str], None]) -> None:
    """Plans the selected runs for the slice (launch/plan.py, cached) and refuses a grid that does not
    fit, before any VM exists."""
    if not self.skip_plan:
      from launch import plan
      plan.check_before_launch(runs, self.accelerator_type, out)

  def prepare(self, out: Callable[[str], None]) -> None:
    os.makedirs(self.log_dir, exist_ok=True)
    if not self.repo_url and _uncommitted(self.ship_paths):
      out(f"warning: uncommitted changes in {', '.join(self.ship_paths)} are not shipped: the VMs get HEAD")
    for vm in self.vms:
      path = os.path.join(self.log_dir, f"{vm}.log")
      out(f"preparing TPU VM {vm} ({self.accelerator_type} in {self.zone}); log {path}")
      with open(path, "ab", buffering=0) as log:
        self.ensure(vm, log)

  def start(self, stage: Stage, initial_checkpoint: Optional[str], log_path: str, slot: int) -> Job:
    return TpuJob(self, self.vms[slot], stage, initial_checkpoint, log_path)

  def finish(self, all_complete: bool, out: Callable[[str], None]) -> None:
    if self.delete_when_done and all_complete:
      self._delete_all(out)

  def _delete_all(self, out: Callable[[str], None], stop_first: bool = False) -> int:
    os.makedirs(self.log_dir, exist_ok=True)
    failed = 0
    for vm in self.vms:
      with open(os.path.join(self.log_dir, f"{vm}.log"), "ab", buffering=0) as log:
        if self.state(vm) is None:
          continue
        if stop_first:
          out(f"stopping training on {vm} (SIGTERM: it checkpoints)")
          self.stop_remote(vm, log)
        result = self._run(self.delete_command(vm), log)
        if result.returncode == 0:
          out(f"deleted TPU VM {vm}")
        else:
          failed += 1
          out(f"error: could not delete TPU VM {vm}: {_last_line(result.stderr)}")
    return failed

  def cancel(self, runs: Sequence[Run], state_dir: records.StateDir, out: Callable[[str], None],
             timeout_s: float = 1800.0) -> int:
    """Stops the local launcher (its stages checkpoint), then training on every pool VM, and deletes them."""
    del runs
    launcher = state_dir.launcher_pid()
    if launcher:
      os.kill(launcher, signal.SIGTERM)
      out(f"sent SIGTERM to the launcher (pid {launcher}); waiting for its stages to checkpoint")
      deadline = time.time() + timeout_s
      while records.process_alive(launcher, ("launch",)) and time.time() < deadline:
        time.sleep(1.0)
    return 1 if self._delete_all(out, stop_first=True) else 0


def _quote(arg: str) -> str:
  """Shell quoting that keeps gin's single-quoted strings readable: "--gin.MODEL_DIR='gs://b/x'"."""
  if "'" in arg and not any(c in arg for c in '"$`\\!'):
    return f'"{arg}"'
  return shlex.quote(arg)


def _head_commit() -> Optional[str]:
  """The local checkout's HEAD commit, None outside a git checkout."""
  from launch.local import _repo_root
  try:
    return subprocess.run(["git", "-C", _repo_root(), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _uncommitted(paths: Sequence[str]) -> bool:
  from launch.local import _repo_root
  try:
    return bool(subprocess.run(["git", "-C", _repo_root(), "status", "--porcelain", "--untracked-files=no", "--",
                                *paths], capture_output=True, text=True, check=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    return False


def _last_line(text: str) -> str:
  lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
  return lines[-1] if lines else "no message"

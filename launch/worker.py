"""A warm training process for the local launcher (`launch.Local.reuse_processes = True`).

Each `python -m scaling_arch.train` pays its imports (JAX, TensorFlow, seqio, t5: about 8 s on a 2-core
CPU) and TensorFlow's first tracing of the data pipeline again; for the CPU study's 192 stages of half a
minute of training each, that is a fifth of the grid's time. A worker pays them once: started by the
launcher for one of its slots, it imports the trainer, then runs stage after stage in this process with the
same flags, gin parsing and exit statuses as the command line (`scaling_arch.train.run`).

Protocol (one JSON object per line): the launcher writes `{"argv": [flags...], "log": path}` to the
worker's stdin; the worker appends the stage's output (file descriptors 1 and 2, so native libraries' lines
too) to `log`, runs it, and answers `{"status": N}` on the stdout it was started with. The worker exits
after any stage that did not end with status 0 (a retry starts a fresh process: nothing a failure left
behind carries over), when a stage leaves `train` asking for an immediate exit (full disk), and at the end
of its stdin. Between stages SIGTERM has its default effect (the process ends); during a stage the trainer's
handler checkpoints first, as on the command line.
"""

from __future__ import annotations

if __name__ == "__main__":
  from scaling_arch import runtime_env
  runtime_env.start()  # before JAX and TensorFlow, as scaling_arch.train's __main__ does
  from launch import worker as _package_module
  _package_module.main()  # exits

import gc
import json
import os
import sys
import traceback
from typing import Sequence


def _redirect_output(log_path: str) -> None:
  """Points file descriptors 1 and 2 (and so Python's and native code's output) at `log_path`."""
  sys.stdout.flush()
  sys.stderr.flush()
  os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
  fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  os.close(fd)


def run_stage(argv: Sequence[str]) -> tuple[int, bool]:
  """Runs one stage's flags as `python -m scaling_arch.train ARGV` would: (exit status, exit now)."""
  from absl import flags

  from scaling_arch import gin_utils, train
  flags_ = flags.FLAGS
  flags_.unparse_flags()  # multi-string flags would otherwise append to the previous stage's values
  try:
    flags_(gin_utils.rewrite_gin_args(["scaling_arch.train", *argv]))
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr, flush=True)
    return 1, False
  try:
    return train.run_command(argv)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()  # as absl's app.run would, before exiting 1
    return 1, False
  finally:
    sys.stdout.flush()
    sys.stderr.flush()


def main() -> None:
  answers = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # until the first stage: stray output goes where the launcher sent stderr (its log)
  from scaling_arch import train  # noqa: F401  the imports this process exists to pay once
  for line in sys.stdin:
    if not line.strip():
      continue
    request = json.loads(line)
    _redirect_output(request["log"])
    status, exit_now = run_stage(request["argv"])
    gc.collect()  # the stage's arrays, datasets and compiled programs, before the next stage allocates
    answers.write(json.dumps({"status": status}) + "\n")
    answers.flush()
    if status != 0 or exit_now:
      os._exit(status)  # pylint: disable=protected-access
  answers.close()
  sys.exit(0)

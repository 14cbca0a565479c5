"""One trainer per MODEL_DIR: an exclusive lock that a run holds while it writes there.

Two trainers writing one MODEL_DIR corrupt it: both save the same steps, one prunes the checkpoints the
other is about to restore, and metrics.jsonl interleaves their lines. So process 0 of a run takes
`fcntl.flock` on MODEL_DIR/.lock before it writes anything, and a second trainer is refused with one line
naming the holder (pid, host, start time: written into the lock file once it is held).

The kernel drops a flock when its process dies (even by kill -9), so a crashed run never leaves a stale
lock behind; its .lock file, if left, is simply taken over. A run that ends normally removes the file
(after checking that the path still names the file it locked, which makes removing it safe against a
trainer that opened it just before).

Local (and NFS-mounted) directories only. Object stores (gs://) have no flock, and tf.io.gfile offers no
create-if-absent write to build a race-free lease object on; there, one trainer per MODEL_DIR is the
launcher's job (see README, "Checkpoints and restarts").
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import json
import os
import socket
from typing import Optional

from absl import logging

from scaling_arch import errors

LOCK_FILE = ".lock"

# Locks this process holds, by MODEL_DIR's real path (a second acquire in the same process reuses it).
_HELD: dict[str, "ModelDirLock"] = {}


def is_local(model_dir: str) -> bool:
  return "://" not in model_dir


def describe_holder(text: str) -> str:
  """'pid 123 on host h (since ...)' from the lock file's contents, or a fallback for an empty file."""
  try:
    info = json.loads(text)
    return f"pid {info['pid']} on host {info['host']}, running since {info['since']}"
  except (ValueError, KeyError, TypeError):
    return "a process that has not yet written its pid"


class ModelDirLock:
  """flock on MODEL_DIR/.lock; `acquire` raises ModelDirLockedError when another process holds it."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self) -> None:
    os.makedirs(self.model_dir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        os.close(fd)
        raise errors.ModelDirLockedError(
            f"MODEL_DIR {self.model_dir} is in use by another trainer ({holder}; lock file {self.path}). "
            "Nothing was changed. One trainer per MODEL_DIR: wait for that one to end, or stop it, then "
            "rerun this command to resume.") from None
      # The holder we waited on may have removed the file before releasing it: then this lock guards a
      # file that no longer has the name, and another trainer could lock a new one. Retry on the new one.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.unlink(self.path)  # while still locked: no other process can hold this file now
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)  # releases the flock
      self._fd = None


def acquire(model_dir: str) -> Optional[ModelDirLock]:
  """Takes MODEL_DIR's lock for this process (creating MODEL_DIR if needed), or returns the one it already
  holds; None where no lock can be taken (object stores). Call from process 0 only."""
  if not is_local(model_dir):
    logging.info("MODEL_DIR %s is not a local path: no lock is taken (see README); one trainer per "
                 "MODEL_DIR is the launcher's job there.", model_dir)
    return None
  key = os.path.realpath(model_dir)
  if key not in _HELD:
    lock = ModelDirLock(model_dir)
    lock.acquire()
    _HELD[key] = lock
  return _HELD[key]


def release(model_dir: str) -> None:
  lock = _HELD.pop(os.path.realpath(model_dir), None) if is_local(model_dir) else None
  if lock is not None:
    lock.release()


def releasing(fn):
  """Decorator: releases every MODEL_DIR lock that a call of `fn` took, however the call ends (the CLI's
  process would drop them at exit anyway; in-process callers such as tests run many trainings)."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    before = set(_HELD)
    try:
      return fn(*args, **kwargs)
    finally:
      for key in [k for k in _HELD if k not in before]:
        _HELD.pop(key).release()
  return wrapper

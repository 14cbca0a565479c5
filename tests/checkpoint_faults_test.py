"""Fault injection on checkpoints and MODEL_DIR (issue 15, cases 1-4, 11, 12): what restore does with a
damaged checkpoint, a second trainer on the same MODEL_DIR, and a full disk.

One tiny run is trained once (module fixture: the tiny geometry of train_test, 30 of 40 steps, a checkpoint
every 5 steps, all six kept, every step logged); each test damages a copy of it
exactly as the issue describes, resumes in this process, and asserts the outcome: the step restored (or
the one `error:` line and exit status 2), the one line naming what was skipped and why, that nothing was
deleted (the skipped step is renamed aside, byte for byte), that the data order is the run's own (the
resumed step's loss equals the uninterrupted run's), and, where nothing may change, MODEL_DIR's digest.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest

from scaling_arch import checkpoints as checkpoints_lib
from scaling_arch import model_dir_lock
from train_test import (REPO, TINY, assert_one_clean_error, checkpoint_steps, compilation_cache,  # noqa: F401
                        model_dir_flag, read_json, read_jsonl, run_in_process, snapshot, train_lines)

BASE_STEPS, TOTAL_STEPS = 30, 40
ARGS = TINY + ["--gin.checkpoints.CheckpointConfig.save_every_steps=5", "--gin.checkpoints.CheckpointConfig.keep=6",
               f"--gin.TRAIN_STEPS={TOTAL_STEPS}"]
STEPS = [5, 10, 15, 20, 25, 30]


def resume(model_dir, capfd, steps: int = 1):
  """The issue's rerun: the same command, here stopping after `steps` more steps."""
  return run_in_process(ARGS + [model_dir_flag(model_dir), f"--gin.train.stop_after_steps={steps}"], capfd)


def tree_digest(root) -> dict:
  """{relative path: SHA-256 of the file's bytes, or 'dir'} of everything under root."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root)] = "dir"
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        out[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, compilation_cache):  # noqa: F811
  del compilation_cache
  model_dir = str(tmp_path_factory.mktemp("faults") / "run")
  status, _, _ = run_in_process(ARGS + [model_dir_flag(model_dir), f"--gin.train.stop_after_steps={BASE_STEPS}"])
  assert status == 0
  assert checkpoint_steps(model_dir) == STEPS
  assert not os.path.exists(os.path.join(model_dir, model_dir_lock.LOCK_FILE))  # released at the end
  return model_dir


@pytest.fixture
def run_copy(base_run, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(base_run, target)
  return target


def state_files(model_dir, step) -> list[str]:
  """The step's array data files (ocdbt), largest first."""
  files = glob.glob(os.path.join(model_dir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*"))
  return sorted(files, key=os.path.getsize, reverse=True)


def warning_line(out) -> str:
  warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warnings) == 1, out
  return warnings[0]


def assert_fell_back(model_dir, base_run, out, damaged: dict, reasons: dict, restored: int):
  """Resumed from `restored` with the one warning line naming each damaged step and why (`reasons`:
  {step: regex}), each damaged step kept aside byte for byte (`damaged`: {step: tree digest}), and the
  next step computed on the run's own data order from the run's own state."""
  line = warning_line(out)
  for step, reason in reasons.items():
    assert re.search(rf"step {step} \((?:{reason})", line), (step, line)
    aside = glob.glob(os.path.join(model_dir, "checkpoints", f"{step}{checkpoints_lib.SKIPPED_SUFFIX}*"))
    assert len(aside) == 1 and os.path.relpath(aside[0], model_dir) in line, (aside, line)
    assert tree_digest(aside[0]) == damaged[step]  # nothing deleted, nothing changed
    assert not os.path.exists(os.path.join(model_dir, "data_state", str(step)))  # the unit moved together
  assert f"resuming from step {restored}" in line, line
  assert f"Restored from MODEL_DIR checkpoint at step {restored}" in out, out
  last = read_jsonl(model_dir)[-1]  # the one step trained after the restore
  reference = train_lines(base_run)[restored + 1]
  assert last["step"] == restored + 1, last
  np.testing.assert_allclose(last["loss"], reference["loss"], rtol=1e-6)  # same data, same state
  assert last["num_tokens"] == reference["num_tokens"]
  assert checkpoint_steps(model_dir) == [s for s in STEPS if s <= restored] + [restored + 1]


# ---- 1. a damaged latest checkpoint ----------------------------------------------------------------------
def _truncate(path, size=None):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def test_damaged_checkpoints_fall_back_to_the_last_intact_step(run_copy, base_run, capfd):
  """The issue's four injections into a step's state (the fifth, signature.json, is the next test), one
  per step from the latest down: restore skips each for the one before, down to step 10 (before:
  tracebacks, exit 1, never a fall-back)."""
  os.remove(os.path.join(run_copy, "checkpoints/30/state/_METADATA"))
  os.remove(os.path.join(run_copy, "checkpoints/25/state/manifest.ocdbt"))
  shutil.rmtree(os.path.join(run_copy, "checkpoints/20/state"))
  _truncate(state_files(run_copy, 15)[0])
  damaged = {s: tree_digest(os.path.join(run_copy, "checkpoints", str(s))) for s in (15, 20, 25, 30)}
  status, out, err = resume(run_copy, capfd)
  assert status == 0, out + err
  assert "Traceback" not in out + err, err
  cannot_read_or_differs = "it cannot be read|its contents do not match the digest recorded"
  assert_fell_back(run_copy, base_run, out, damaged, {30: "it cannot be read", 25: "it cannot be read",
                                                      20: "it cannot be read", 15: cannot_read_or_differs}, 10)


def test_truncated_signature_is_rewritten_from_the_steps_records(run_copy, base_run, capfd):
  """signature.json says which configuration wrote the checkpoints. Truncated, it no longer says; but
  every step's own record carries the signature's hash: they match this configuration, so the damaged
  file is kept aside, rewritten, and the intact latest step (30) is restored."""
  path = os.path.join(run_copy, "checkpoints", checkpoints_lib.SIGNATURE_FILE)
  with open(path) as f:
    original = f.read()
  _truncate(path)
  truncated = open(path).read()
  status, out, err = resume(run_copy, capfd)
  assert status == 0, out + err
  assert "Traceback" not in out + err, err
  warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warnings) == 1 and "signature.json was damaged (not valid JSON" in warnings[0], out
  assert "Restored from MODEL_DIR checkpoint at step 30" in out, out
  assert json.loads(open(path).read()) == json.loads(original)
  kept = glob.glob(path + checkpoints_lib.SKIPPED_SUFFIX + "*")
  assert len(kept) == 1 and open(kept[0]).read() == truncated
  assert read_jsonl(run_copy)[-1]["step"] == 31 and checkpoint_steps(run_copy) == STEPS[1:] + [31]


def test_truncated_signature_without_records_is_refused(run_copy, capfd):
  """Checkpoints that carry no record of their own (written before digests existed): a truncated
  signature.json leaves no way to tell whose they are: one error line, nothing changed."""
  for step in STEPS:
    meta = os.path.join(run_copy, "checkpoints", str(step), "_CHECKPOINT_METADATA")
    record = json.load(open(meta))
    record["custom_metadata"] = {}
    json.dump(record, open(meta, "w"))
  _truncate(os.path.join(run_copy, "checkpoints", checkpoints_lib.SIGNATURE_FILE))
  before, before_times = tree_digest(run_copy), snapshot(run_copy)
  status, out, err = resume(run_copy, capfd)
  assert_one_clean_error(status, out, err, "signature.json", "is damaged (not valid JSON", str(STEPS),
                         "Nothing was changed")
  assert tree_digest(run_copy) == before and snapshot(run_copy) == before_times


# ---- 2. a bit-flipped checkpoint ------------------------------------------------------------------------
def xor_4k(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    block = f.read(4096)
    f.seek(offset)
    f.write(bytes(b ^ 0x5A for b in block))


def silent_flip_offset(model_dir, step):
  """(file, offset) in step's largest data file where 4 KiB XORed still restores (orbax's chunks are
  compressed without a checksum: most flips break decompression, some decode to other values); found on
  a scratch copy of the step, so the test always injects the silent kind."""
  import orbax.checkpoint as ocp
  import warnings
  state_dir = os.path.join(model_dir, "checkpoints", str(step), "state")
  path = state_files(model_dir, step)[0]
  scratch = os.path.join(os.path.dirname(model_dir), "scratch_state")
  for fraction in (0.1, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8, 0.15, 0.35, 0.65):
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(state_dir, scratch)
    offset = int(os.path.getsize(path) * fraction)
    xor_4k(os.path.join(scratch, os.path.relpath(path, state_dir)), offset)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ocp.PyTreeCheckpointer().restore(scratch)
    except Exception:  # pylint: disable=broad-except  (this flip broke decompression: not the silent kind)
      continue
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return path, offset
  pytest.fail("no 4 KiB flip in the largest data file restores silently")


def test_bit_flipped_checkpoint_falls_back(run_copy, base_run, capfd):
  """4 KiB XORed inside a parameter data file: the files still parse, the values are wrong; the digest
  recorded at save time says so (before: restored silently, NaN loss at step 31)."""
  path, offset = silent_flip_offset(run_copy, 30)
  xor_4k(path, offset)
  damaged = {30: tree_digest(os.path.join(run_copy, "checkpoints", "30"))}
  status, out, err = resume(run_copy, capfd)
  assert status == 0, out + err
  assert_fell_back(run_copy, base_run, out, damaged, {30: "its contents do not match the digest recorded"}, 25)
  assert all(np.isfinite(m["loss"]) for m in train_lines(run_copy).values())


# ---- 3. a step folder without _CHECKPOINT_METADATA ----------------------------------------------------------
def test_unfinished_step_folder_is_moved_aside_and_the_step_saved_again(run_copy, base_run, capfd):
  """Before: resumed from 25, then StepAlreadyExistsError re-saving 30, on every rerun."""
  os.remove(os.path.join(run_copy, "checkpoints", "30", "_CHECKPOINT_METADATA"))
  damaged = tree_digest(os.path.join(run_copy, "checkpoints", "30"))
  status, out, err = resume(run_copy, capfd, steps=5)
  assert status == 0, out + err
  assert "step 30 (its save never finished (no _CHECKPOINT_METADATA)" in warning_line(out), out
  assert "Restored from MODEL_DIR checkpoint at step 25" in out
  aside = glob.glob(os.path.join(run_copy, "checkpoints", "30" + checkpoints_lib.SKIPPED_SUFFIX + "*"))
  assert len(aside) == 1 and tree_digest(aside[0]) == damaged
  assert checkpoint_steps(run_copy) == STEPS  # step 30 saved anew: no collision
  assert os.path.exists(os.path.join(run_copy, "checkpoints", "30", "_CHECKPOINT_METADATA"))
  lines, reference = read_jsonl(run_copy)[-5:], train_lines(base_run)
  assert [m["step"] for m in lines] == [26, 27, 28, 29, 30]
  for m in lines:
    np.testing.assert_allclose(m["loss"], reference[m["step"]]["loss"], rtol=1e-6, err_msg=str(m["step"]))
  assert read_json(os.path.join(run_copy, "run.json"))["status"] == "stopped"


# ---- 4. missing data_state/<step> ----------------------------------------------------------------------------
def test_missing_data_state_makes_the_step_incomplete(run_copy, base_run, capfd):
  """Parameters without their input position would restart the data order (before: a log warning, and
  another trajectory). The step is incomplete: skipped like a damaged one."""
  shutil.rmtree(os.path.join(run_copy, "data_state", "30"))
  damaged = {30: tree_digest(os.path.join(run_copy, "checkpoints", "30"))}
  status, out, err = resume(run_copy, capfd)
  assert status == 0, out + err
  assert_fell_back(run_copy, base_run, out, damaged, {30: r"its input position \(data_state/30/"}, 25)


def test_no_intact_step_is_one_error_and_changes_nothing(run_copy, capfd):
  shutil.rmtree(os.path.join(run_copy, "checkpoints", "30", "state"))
  for step in STEPS[:-1]:
    shutil.rmtree(os.path.join(run_copy, "data_state", str(step)))
  before, before_times = tree_digest(run_copy), snapshot(run_copy)
  status, out, err = resume(run_copy, capfd)
  message = assert_one_clean_error(status, out, err, "No intact checkpoint", "step 30: it cannot be read",
                                   "step 25: its input position", "step 5: its input position",
                                   "Nothing was changed")
  assert "new MODEL_DIR" in message
  assert tree_digest(run_copy) == before and snapshot(run_copy) == before_times


# ---- 11. two trainers, one MODEL_DIR ------------------------------------------------------------------------
def test_second_trainer_on_a_model_dir_is_refused(run_copy, capfd):
  """Another process holds MODEL_DIR's lock as a running trainer does: this one is refused with one line
  that names it, and MODEL_DIR is not changed."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from scaling_arch import model_dir_lock as m; "
       f"lock = m.ModelDirLock({run_copy!r}); lock.acquire(); print('held', flush=True); sys.stdin.read(); "
       "lock.release()"],
      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before, before_times = tree_digest(run_copy), snapshot(run_copy)
    status, out, err = resume(run_copy, capfd)
    assert_one_clean_error(status, out, err, f"MODEL_DIR {run_copy} is in use by another trainer",
                           f"pid {holder.pid} on host {socket.gethostname()}", "Nothing was changed")
    assert tree_digest(run_copy) == before and snapshot(run_copy) == before_times
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  assert not os.path.exists(os.path.join(run_copy, model_dir_lock.LOCK_FILE))  # its holder removed it
  # A lock file left by a killed trainer (no process holds it) does not block the next one.
  with open(os.path.join(run_copy, model_dir_lock.LOCK_FILE), "w") as f:
    f.write('{"pid": 999999, "host": "gone", "since": "earlier"}\n')
  lock = model_dir_lock.acquire(run_copy)
  assert json.load(open(lock.path))["pid"] == os.getpid()
  model_dir_lock.release(run_copy)
  assert not os.path.exists(lock.path)


# ---- 12. disk full ------------------------------------------------------------------------------------------
def _mount_tmpfs(path, size_bytes) -> bool:
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path],
                        capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["tmpfs", "simulated"])
def test_disk_full_is_one_error_line_and_marks_the_run_failed(how, base_run, tmp_path, capfd, monkeypatch):
  """tmpfs (where this test may mount one: root): MODEL_DIR lives on a file system with room for less
  than one more checkpoint, so orbax's writers hit a real ENOSPC (tensorstore: RESOURCE_EXHAUSTED) in
  their threads. simulated (anywhere): the data-state write raises ENOSPC as TensorFlow reports it."""
  mount = str(tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}")
  real = False
  if how == "tmpfs":
    used = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(base_run) for f in fs)
    real = _mount_tmpfs(mount, used + 1_500_000)
    if not real:
      pytest.skip("cannot mount a tmpfs here (not root); the simulated case still runs")
  try:
    model_dir = os.path.join(mount, "run")
    shutil.copytree(base_run, model_dir)
    if how == "simulated":
      import tensorflow as tf

      def full(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, f"{model_dir}/data_state/31: No space left on device")
      monkeypatch.setattr(tf.train.Checkpoint, "write", full)
    kept = {s: tree_digest(os.path.join(model_dir, "checkpoints", str(s))) for s in STEPS}
    status, out, err = resume(model_dir, capfd)
    assert status == 2, (status, out, err)
    assert "Traceback" not in out + err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the disk of MODEL_DIR") and "No space left on device" in last, err
    assert "RESOURCE_EXHAUSTED" in last, last
    assert len(err.strip().splitlines()) <= 3, err  # not hundreds of lines of tracebacks
    assert "the last good checkpoint, step 30, is kept" in last
    assert read_json(os.path.join(model_dir, "run.json"))["status"] == "failed_disk_full"
    assert {s: tree_digest(os.path.join(model_dir, "checkpoints", str(s))) for s in STEPS} == kept
    assert checkpoint_steps(model_dir) == STEPS
    # The failed save's partial files are gone (on a full disk, they held the room run.json needed).
    assert not [n for n in os.listdir(os.path.join(model_dir, "checkpoints")) if "tmp" in n]
    assert sorted(int(n) for n in os.listdir(os.path.join(model_dir, "data_state"))) == STEPS
  finally:
    if real:
      subprocess.run(["umount", "-l", mount], check=False)

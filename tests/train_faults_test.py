"""Fault injection on the training entry point (issue 15, cases 5-10, 13 and SIGTERM): each test injects
one fault as a user would meet it and asserts the exact outcome: exit status, the one `error:` line, and
MODEL_DIR byte for byte before and after.

One tiny run (train_test's TINY geometry, 4 steps) is trained once per module and copied per test; the bad inputs are refused before any compilation, so most tests cost no more than
parsing gin. Two subprocesses check SIGTERM where no Python handler can run at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from unittest import mock

import pytest

import tasks
from launch import records
from launch.grid import Stage
from scaling_arch import checkpoints as checkpoints_lib
from scaling_arch import metrics as metrics_lib
from scaling_arch import train as train_lib
from train_test import (IN_PROCESS_DEVICES, REPO, TINY, assert_one_clean_error,  # noqa: F401
                        checkpoint_steps, compilation_cache, eval_lines, model_dir_flag, read_json,
                        run_in_process, subprocess_env, train_lines)

STEPS = 4  # save_every_steps is 2 in TINY: checkpoints 2 and 4


def digest(root) -> dict:
  """{relative path: (sha256 of the bytes, mtime_ns)} of every file, and every folder, under root."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = None
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
  return out


def args_for(model_dir, *extra) -> list[str]:
  return TINY + [model_dir_flag(model_dir), f"--gin.TRAIN_STEPS={STEPS}", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, compilation_cache):
  """A complete run of STEPS steps, with every update of its run.json."""
  del compilation_cache
  model_dir = str(tmp_path_factory.mktemp("finished") / "run")
  with mock.patch.object(metrics_lib, "update_run_record", wraps=metrics_lib.update_run_record) as spy:
    status, _, _ = run_in_process(args_for(model_dir))
  assert status == 0
  assert read_json(os.path.join(model_dir, "run.json"))["status"] == "complete"
  return {"dir": model_dir, "record_updates": [call.kwargs for call in spy.call_args_list]}


def copy_of(src, tmp_path) -> str:
  target = str(tmp_path / "run")
  shutil.copytree(src, target)
  return target


def no_initialization():
  """Patches the trainer so that a test fails if the run got as far as building the model."""
  def fail(*args, **kwargs):
    raise AssertionError("the bad input was not refused before initialization")
  return mock.patch.object(train_lib.trainer_lib, "Trainer", fail)


# ---- 5. a misspelt macro -----------------------------------------------------------------------------------
def test_unknown_macro_is_one_error_with_a_suggestion(tmp_path, capfd):
  model_dir = tmp_path / "run"
  status, out, err = run_in_process(args_for(model_dir, "--gin.TRAIN_STEPZ=5"), capfd)
  message = assert_one_clean_error(status, out, err, "TRAIN_STEPZ (did you mean TRAIN_STEPS?)",
                                   "nothing in the configuration uses it")
  assert "\n" not in message.strip()
  assert not model_dir.exists()


# ---- 6. results are immutable once complete ----------------------------------------------------------------
def test_rerunning_a_finished_run_writes_nothing(finished, tmp_path, capfd):
  model_dir = copy_of(finished["dir"], tmp_path)
  before = digest(model_dir)
  record = read_json(os.path.join(model_dir, "run.json"))
  status, out, err = run_in_process(args_for(model_dir), capfd)
  assert status == 0, out + err
  assert f"is complete (step {STEPS}/{STEPS}" in out and "nothing written" in out, out
  assert "Traceback" not in out + err and "error:" not in err
  assert digest(model_dir) == before
  assert record["final_loss"] == pytest.approx(train_lines(model_dir)[STEPS]["loss"])
  assert sorted(eval_lines(model_dir)) == [STEPS]  # no duplicate evaluation line


def test_config_gin_is_the_operative_config(finished):
  """config.gin is the operative config (defaults of the configurables that ran included, e.g. the
  optimizer's), not the bare bindings. (That a resumed invocation keeps it: the SIGTERM test below.)"""
  with open(os.path.join(finished["dir"], "config.gin")) as f:
    config = f.read()
  assert "train.batch_size = %BATCH_SIZE" in config and "BATCH_SIZE = 8" in config, config
  assert re.search(r"^adafactor\.\w+ = ", config, re.M), config  # only the operative config lists defaults


# ---- 7. a resume with another batch size or feature lengths ------------------------------------------------
@pytest.mark.parametrize("override, phrase", [
    ("--gin.BATCH_SIZE=4", "batch_size: 8 there, 4 now"),
    ("--gin.train.feature_lengths={'inputs': 32, 'targets': 16}",
     "feature_lengths: {'inputs': 64, 'targets': 16} there, {'inputs': 32, 'targets': 16} now"),
])
def test_resume_with_other_batches_is_refused(finished, tmp_path, capfd, override, phrase):
  model_dir = copy_of(finished["dir"], tmp_path)
  before = digest(model_dir)
  status, out, err = run_in_process(TINY + [model_dir_flag(model_dir), f"--gin.TRAIN_STEPS={STEPS + 2}",
                                            override], capfd)
  assert_one_clean_error(status, out, err, "different configuration", phrase, "Nothing was changed")
  assert digest(model_dir) == before


def test_initial_checkpoint_ignores_batch_size_and_lengths(finished):
  """Fine-tuning from INITIAL_CHECKPOINT compares only the parameter keys of the signature."""
  with open(os.path.join(finished["dir"], "checkpoints", checkpoints_lib.SIGNATURE_FILE)) as f:
    saved = json.load(f)
  assert saved["batch_size"] == 8 and saved["feature_lengths"] == {"inputs": 64, "targets": 16}
  other = dict(saved, batch_size=128, feature_lengths={"inputs": 512, "targets": 114},
               task="sa_offline_completion")
  checkpoints_lib.check_initial_checkpoint(os.path.join(finished["dir"], "checkpoints", str(STEPS)), other)
  with pytest.raises(checkpoints_lib.errors.CheckpointMismatchError, match="vocab_size"):
    checkpoints_lib.check_initial_checkpoint(os.path.join(finished["dir"], "checkpoints", str(STEPS)),
                                             dict(other, vocab_size=1))


# ---- 8. MODEL_DIR a file, or not writable ------------------------------------------------------------------
@pytest.mark.parametrize("case", ["file", "read_only", "read_only_parent"])
def test_model_dir_that_cannot_be_written_is_refused_first(case, tmp_path, capfd):
  parent = tmp_path / "parent"
  parent.mkdir()
  model_dir = parent / "run"
  if case == "file":
    model_dir.write_text("not a directory\n")
    phrase = "is a file, not a directory"
  elif case == "read_only":
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("kept\n")
    phrase = "is not writable"
  else:
    model_dir = parent / "missing" / "run"
    phrase = f"cannot be created: {parent} is not writable"
  before = digest(tmp_path)
  read_only = parent if case == "read_only_parent" else model_dir
  if case != "file":
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
  try:
    with no_initialization():
      status, out, err = run_in_process(args_for(model_dir), capfd)
  finally:
    read_only.chmod(0o755)
  assert_one_clean_error(status, out, err, f"MODEL_DIR {model_dir}", phrase)
  assert digest(tmp_path) == before


# ---- 9. microbatches that do not divide the batch ----------------------------------------------------------
def test_microbatches_that_do_not_divide_the_batch(tmp_path, capfd):
  model_dir = tmp_path / "run"
  with no_initialization():
    status, out, err = run_in_process(args_for(model_dir, "--gin.train.num_microbatches=3"), capfd)
  assert_one_clean_error(status, out, err, "train.num_microbatches = 3 does not divide the batch size 8")
  assert not model_dir.exists()


# ---- 10. an empty split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", ["train", "validation"])
def test_empty_split_is_one_error_naming_split_and_file(empty, tmp_path, capfd, monkeypatch):
  """The offline corpus in a cache folder of its own (the vocabulary copied, so none is trained), one of
  its two files emptied (blank lines only)."""
  files = tasks.corpus_files()
  vocab = tasks.offline_vocabulary().sentencepiece_model_file
  cache = tmp_path / "cache"
  folder = cache / os.path.relpath(os.path.dirname(files["train"]), tasks.cache.cache_dir())
  folder.mkdir(parents=True)
  (cache / "vocab").mkdir()
  shutil.copy(vocab, cache / "vocab" / os.path.basename(vocab))
  for split, path in files.items():
    if split == empty:
      (folder / os.path.basename(path)).write_text("\n  \n")
    else:
      shutil.copy(path, folder / os.path.basename(path))
  monkeypatch.setenv(tasks.cache.ENV_VAR, str(cache))
  assert tasks.corpus_files()[empty] == str(folder / os.path.basename(files[empty]))
  model_dir = tmp_path / "run"
  with no_initialization():
    status, out, err = run_in_process(args_for(model_dir), capfd)
  message = assert_one_clean_error(status, out, err, f"The '{empty}' split of task offline_span_corruption is "
                                   f"empty ({folder / os.path.basename(files[empty])})")
  assert "-0.0" not in out + err and "neg_log_perplexity" not in out, out
  assert "\n" not in message.strip()
  assert not model_dir.exists()


# ---- 13. the live step -------------------------------------------------------------------------------------
def test_run_record_step_follows_training(finished):
  """run.json's step was updated at every logged step (TINY logs every step), before the run completed."""
  updates = finished["record_updates"]
  live = [u["step"] for u in updates if set(u) == {"step"}]
  assert live == list(range(1, STEPS + 1)), updates
  assert updates[-1]["status"] == "complete"


def test_launch_status_shows_the_live_step(tmp_path):
  """A running stage whose run.json still says step 0 (written at start): status shows metrics.jsonl's
  last step, and the summary counts it."""
  model_dir = tmp_path / "experiment" / "r" / "pretrain"
  model_dir.mkdir(parents=True)
  (model_dir / "run.json").write_text(json.dumps({"status": "running", "step": 0, "train_steps": 40}))
  (model_dir / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "loss": 5.0 - s / 100, "steps_per_sec": 2.0}) + "\n" for s in (5, 10, 15, 20, 25))
      + json.dumps({"step": 20, "eval_neg_log_perplexity": -5.0}) + "\n")
  stage = Stage(run="r", name="pretrain", index=0, architecture="vanilla", variant="tiny",
                gin_files=(), bindings=(), model_dir=str(model_dir))
  state_dir = records.StateDir(str(tmp_path / "state"))
  trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(model_dir)])
  try:
    deadline = time.monotonic() + 30
    while str(model_dir) not in open(f"/proc/{trainer.pid}/cmdline").read():  # exec'd (the pid check reads it)
      assert time.monotonic() < deadline
      time.sleep(0.01)
    state_dir.event(stage, "started", f"attempt 1 (pid {trainer.pid})")
    status = records.stage_status(stage, state_dir)
  finally:
    trainer.kill()
    trainer.wait()
  assert (status.state, status.step, status.train_steps) == ("running", 25, 40)
  table = records.table([status])
  assert ["r", "pretrain", "running", "25/40", "4.7500", "2.00"] == table.splitlines()[2].split()[:6], table
  assert "25/40 steps of started stages (62.5%)" in table, table


# ---- SIGTERM where no Python handler runs at once ----------------------------------------------------------
def _start(args, tmp_path, cache_dir):
  stdout, stderr = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
  proc = subprocess.Popen([sys.executable, "-m", "scaling_arch.train", *args], cwd=REPO,
                          env=subprocess_env(IN_PROCESS_DEVICES, cache_dir), stdout=stdout, stderr=stderr)
  stdout.close()
  stderr.close()
  return proc


def _terminate_when(proc, tmp_path, pattern, deadline_s=300) -> tuple[int, float, str, str]:
  """Sends SIGTERM once stdout matches `pattern`; returns (exit status, seconds to exit, stdout, stderr)."""
  try:
    deadline = time.monotonic() + deadline_s
    while not re.search(pattern, (tmp_path / "stdout").read_text(), re.M):
      assert proc.poll() is None, f"exited early: {proc.returncode}\n{(tmp_path / 'stderr').read_text()}"
      assert time.monotonic() < deadline, "the pattern never appeared"
      time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
    elapsed = time.monotonic() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return returncode, elapsed, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def test_sigterm_during_first_compilation_exits_at_once(tmp_path):
  """Right after start-up (run.json written), in the first batch and the train step's compilation (a
  fresh compilation cache, so it takes seconds): exit 143 within 5 s, no checkpoint, run.json preempted."""
  model_dir = tmp_path / "run"
  proc = _start(args_for(model_dir), tmp_path, str(tmp_path / "empty_jax_cache"))
  returncode, elapsed, out, err = _terminate_when(proc, tmp_path, r"FLOPs/step")
  assert returncode == 143, (returncode, out, err)
  assert elapsed < 5, elapsed
  assert "nothing new to save" in err and "Traceback" not in err, err
  assert checkpoint_steps(model_dir) == []
  assert read_json(model_dir / "run.json")["status"] == "preempted"
  assert not os.path.exists(model_dir / "metrics.jsonl") or not train_lines(model_dir)


def test_sigterm_during_evaluation_stops_it_saves_and_exits(finished, tmp_path, compilation_cache):
  """A resumed run evaluating 5000 batches at step STEPS + 1: the evaluation stops, step STEPS + 1 is
  saved, exit 143 within 5 s, and no partial evaluation is logged. The resumed invocation trained a step
  but left config.gin as the run wrote it."""
  model_dir = copy_of(finished["dir"], tmp_path)
  config_before = digest(model_dir)["config.gin"]
  step = STEPS + 1
  args = TINY + [model_dir_flag(model_dir), "--gin.TRAIN_STEPS=1000", f"--gin.train.eval_every_steps={step}",
                 "--gin.train.eval_steps=5000"]
  proc = _start(args, tmp_path, compilation_cache)
  returncode, elapsed, out, err = _terminate_when(proc, tmp_path, rf"^step {step}/1000")
  assert returncode == 143, (returncode, out, err)
  assert elapsed < 5, elapsed
  assert f"SIGTERM received: checkpoint saved at step {step}" in err and "Traceback" not in err, err
  assert checkpoint_steps(model_dir)[-1] == step
  record = read_json(os.path.join(model_dir, "run.json"))
  assert (record["status"], record["step"]) == ("preempted", step)
  assert sorted(eval_lines(model_dir)) == [STEPS]  # the finished run's; none at the interrupted step
  assert digest(model_dir)["config.gin"] == config_before

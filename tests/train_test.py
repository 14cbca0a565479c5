"""End-to-end tests of the training entry point, `python -m scaling_arch.train`.

What a user does: the quickstart, restarts (split runs, SIGTERM), mistakes that must end in one readable
error with MODEL_DIR untouched, and a loss that turns non-finite.

Cost: every new Python process pays ~10 s of imports and ~15 s of TF autograph (the seqio / t5
preprocessors), and every new model geometry a compilation. So the real CLI runs in a subprocess only
where that is the point (quickstart, SIGTERM, one error case); the other runs go through the same
`train.run(argv, entry)` in this process (flags -> gin -> train -> exit status), all with one tiny geometry
so that JAX's persistent compilation cache (a module fixture) serves most runs after the first. In-process
runs use 4 of the 16 forced CPU devices (`train(partitioner_factory=...)`), much faster than 16 on a
2-core host; subprocesses force 1 or 4 devices.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest
from absl import flags

from scaling_arch import gin_utils, partitioning
from scaling_arch import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
IN_PROCESS_DEVICES = 4

# The tiny geometry every run but the quickstart uses (same shapes -> one compilation, cached).
TINY = [
    "--gin_file=gin/runs/quickstart.gin",
    "--gin.NUM_ENCODER_LAYERS=1", "--gin.NUM_DECODER_LAYERS=1", "--gin.EMBED_DIM=64", "--gin.MLP_DIM=128",
    "--gin.NUM_HEADS=2", "--gin.HEAD_DIM=32", "--gin.BATCH_SIZE=8",
    "--gin.train.feature_lengths={'inputs': 64, 'targets': 16}",
    "--gin.train.log_every_steps=1", "--gin.train.eval_steps=1", "--gin.train.eval_every_steps=0",
    "--gin.checkpoints.CheckpointConfig.save_every_steps=2",
]
STRAIGHT_STEPS = 6
SPLIT_AFTER = 2  # a multiple of save_every_steps: the stop checkpoint lands on a periodic one


# ---- helpers --------------------------------------------------------------------------------------------
def model_dir_flag(path) -> str:
  return f"--gin.MODEL_DIR='{path}'"


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache for this module's runs (in-process and subprocesses)."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (path, 0, -1)):
    jax.config.update(name, value)
  cc.reset_cache()
  yield path
  for name, value in previous.items():
    jax.config.update(name, value)
  cc.reset_cache()


def subprocess_env(devices: int, cache_dir: str) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f] +
      [f"--xla_force_host_platform_device_count={devices}"])
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def cli(args, *, devices: int, cache_dir: str, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python -m scaling_arch.train ARGS` in a fresh process, as a user runs it."""
  return subprocess.run([sys.executable, "-m", "scaling_arch.train", *args], cwd=REPO,
                        env=subprocess_env(devices, cache_dir), capture_output=True, text=True,
                        timeout=timeout)


def _partitioner(num_devices: int):
  return partitioning.Partitioner(devices=jax.devices()[:num_devices])


def run_in_process(args, capfd=None, *, devices: int | None = IN_PROCESS_DEVICES):
  """Runs the entry point here as the CLI does (absl flags -> `train.run`: gin, train, error -> status).

  Returns (exit status, stdout, stderr); the output is captured only with `capfd`. `devices`: the
  number of devices the mesh uses (None: all 16, as the CLI would).
  """
  if capfd is not None:
    capfd.readouterr()
  entry = train_lib.train
  if devices is not None:
    entry = functools.partial(train_lib.train, partitioner_factory=functools.partial(_partitioner, devices))
  FLAGS.unparse_flags()
  FLAGS(["scaling_arch.train", *gin_utils.rewrite_gin_args(list(args))])
  try:
    status = train_lib.run([], entry)
  finally:
    FLAGS.unparse_flags()
  out, err = capfd.readouterr() if capfd is not None else ("", "")
  return status, out, err


def read_jsonl(model_dir) -> list[dict]:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path) -> dict:
  with open(path) as f:
    return json.load(f)


def train_lines(model_dir) -> dict[int, dict]:
  return {m["step"]: m for m in read_jsonl(model_dir) if "loss" in m}


def eval_lines(model_dir) -> dict[int, dict]:
  return {m["step"]: m for m in read_jsonl(model_dir) if "eval_neg_log_perplexity" in m}


def checkpoint_steps(model_dir) -> list[int]:
  d = os.path.join(model_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def snapshot(root) -> dict:
  """{relative path: (size, mtime_ns)} of every file and folder under root ({} if it does not exist)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_size if name in filenames else 0, st.st_mtime_ns)
  return out


def restore_params(model_dir, step) -> dict:
  """The parameters of checkpoint `step`, as numpy, keyed by their path."""
  import orbax.checkpoint as ocp
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Sharding info not provided when restoring"
    state = ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, "checkpoints", str(step), "state"))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}


def assert_one_clean_error(status, out, err, *phrases):
  """Exit status 2, exactly one `error:` line, the phrases in it, and no traceback anywhere."""
  assert status == 2, (status, out, err)
  assert len(re.findall(r"^error: ", err, re.M)) == 1, err
  assert "Traceback" not in out + err, out + err
  message = err[err.index("error:"):]
  for phrase in phrases:
    assert phrase in message, (phrase, message)
  assert "In call to configurable" not in message, message  # gin's call chain is not for users
  return message


# ---- one straight run, shared ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, compilation_cache):
  """STRAIGHT_STEPS steps of the tiny model in one go (in this process, 4 devices): the reference for
  the restart tests and the source of a MODEL_DIR with checkpoints for the error tests."""
  del compilation_cache
  model_dir = str(tmp_path_factory.mktemp("straight") / "run")
  status, _, _ = run_in_process(TINY + [model_dir_flag(model_dir), f"--gin.TRAIN_STEPS={STRAIGHT_STEPS}"])
  assert status == 0
  return model_dir


def copy_of(model_dir, tmp_path) -> str:
  target = str(tmp_path / "copy")
  shutil.copytree(model_dir, target)  # copy2: sizes and modification times preserved
  return target


# ---- 1. quickstart ----------------------------------------------------------------------------------------
def test_quickstart_trains_end_to_end(tmp_path, compilation_cache):
  """gin/runs/quickstart.gin as shipped (vanilla, tiny 2+2 layers, offline corpus), 6 steps instead of
  60, through the CLI on a 1-device host."""
  model_dir = tmp_path / "quickstart"
  steps = 6
  result = cli(["--gin_file=gin/runs/quickstart.gin", model_dir_flag(model_dir), f"--gin.TRAIN_STEPS={steps}"],
               devices=1, cache_dir=compilation_cache)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "Traceback" not in result.stdout + result.stderr, result.stderr
  assert "training from scratch" in result.stdout
  assert f"step {steps}/{steps}" in result.stdout

  # Evaluation: at step 0 (where a fresh run starts) and at the end; the model must have learned.
  evals = eval_lines(model_dir)
  assert sorted(evals) == [0, steps], evals
  start, end = evals[0]["eval_neg_log_perplexity"], evals[steps]["eval_neg_log_perplexity"]
  assert start < -8.0, start  # ~ -log(4224): an untrained model over the 4k offline vocabulary
  assert end > start + 1.5, (start, end)  # measured: -9.60 -> -6.75

  # Training lines (quickstart logs every 5 steps, and the first and last step).
  lines = train_lines(model_dir)
  assert sorted(lines) == [1, 5, 6], sorted(lines)
  for m in lines.values():
    for key in ("step", "loss", "learning_rate", "steps_per_sec", "tokens_per_sec"):
      assert key in m, (key, m)
    assert np.isfinite(m["loss"]) and m["learning_rate"] == pytest.approx(0.01)  # 1/sqrt(10k warmup)
  assert lines[steps]["steps_per_sec"] > 0 and lines[steps]["tokens_per_sec"] > 0
  assert lines[steps]["loss"] < lines[1]["loss"] - 1.5, (lines[1]["loss"], lines[steps]["loss"])

  record = read_json(model_dir / "run.json")
  assert record["architecture"] == "vanilla" and record["size"] == "tiny"
  assert record["num_params"] > 1_000_000
  assert record["flops_per_step"] > 0
  assert record["tokens_per_step"] == 16 * (128 + 32)
  assert record["devices"] == 1 and record["processes"] == 1
  assert record["step"] == steps and record["status"] == "complete"
  assert record["eval_neg_log_perplexity"] == pytest.approx(end)
  assert record["final_loss"] == pytest.approx(lines[steps]["loss"])

  config = (model_dir / "config.gin").read_text()
  assert str(model_dir) in config and "EncoderDecoder.embed_dim = %EMBED_DIM" in config, config
  assert "EMBED_DIM = 256" in config and "TRAIN_STEPS = 6" in config, config
  assert checkpoint_steps(model_dir) == [steps]
  events = glob.glob(str(model_dir / "tensorboard" / "events.out.tfevents.*"))
  assert events and all(os.path.getsize(e) > 0 for e in events), events
  import tensorflow as tf
  tags = {v.tag for e in events for event in tf.compat.v1.train.summary_iterator(e) for v in event.summary.value}
  assert {"loss", "learning_rate", "eval_neg_log_perplexity"} <= tags, tags


# ---- 2. restarts are exact --------------------------------------------------------------------------------
def test_stop_and_resume_equals_straight_run(straight_run, tmp_path, capfd):
  """SPLIT_AFTER steps (stop_after_steps), then a second start to STRAIGHT_STEPS: same losses step by
  step (same data order: the input pipeline's position is restored) and the same final parameters."""
  model_dir = str(tmp_path / "split")
  args = TINY + [model_dir_flag(model_dir), f"--gin.TRAIN_STEPS={STRAIGHT_STEPS}"]
  status, out, err = run_in_process(args + [f"--gin.train.stop_after_steps={SPLIT_AFTER}"], capfd)
  assert status == 0, out + err
  assert f"Stopped after {SPLIT_AFTER} steps at step {SPLIT_AFTER}" in out
  record = read_json(os.path.join(model_dir, "run.json"))
  assert (record["status"], record["step"]) == ("stopped", SPLIT_AFTER)
  assert checkpoint_steps(model_dir) == [SPLIT_AFTER]

  status, out, err = run_in_process(args, capfd)
  assert status == 0, out + err
  assert f"Restored from MODEL_DIR checkpoint at step {SPLIT_AFTER}" in out, out
  assert "training from scratch" not in out
  record = read_json(os.path.join(model_dir, "run.json"))
  assert (record["status"], record["step"]) == ("complete", STRAIGHT_STEPS)

  straight, split = train_lines(straight_run), train_lines(model_dir)
  assert sorted(split) == sorted(straight) == list(range(1, STRAIGHT_STEPS + 1))
  for step in straight:
    # The batch itself: its token count is a property of the data alone.
    assert split[step]["num_tokens"] == straight[step]["num_tokens"], step
    np.testing.assert_allclose(split[step]["loss"], straight[step]["loss"], rtol=1e-6, err_msg=f"step {step}")
  # One evaluation, at the end (eval_every_steps=0), matching the straight run's.
  assert sorted(eval_lines(model_dir)) == [STRAIGHT_STEPS]
  np.testing.assert_allclose(eval_lines(model_dir)[STRAIGHT_STEPS]["eval_neg_log_perplexity"],
                             eval_lines(straight_run)[STRAIGHT_STEPS]["eval_neg_log_perplexity"], rtol=1e-6)

  a, b = restore_params(straight_run, STRAIGHT_STEPS), restore_params(model_dir, STRAIGHT_STEPS)
  assert sorted(a) == sorted(b) and len(a) > 10
  for name in a:
    np.testing.assert_allclose(b[name], a[name], atol=1e-6, rtol=0, err_msg=name)
  assert not np.allclose(a[sorted(a)[0]], restore_params(model_dir, 4)[sorted(a)[0]]), "params did not train"


# ---- 3. SIGTERM -------------------------------------------------------------------------------------------
def test_sigterm_checkpoints_and_next_start_resumes(tmp_path, compilation_cache, capfd):
  model_dir = tmp_path / "preempted"
  args = TINY + [model_dir_flag(model_dir), "--gin.TRAIN_STEPS=100000",
                 "--gin.checkpoints.CheckpointConfig.save_every_steps=100000"]
  with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
    proc = subprocess.Popen([sys.executable, "-m", "scaling_arch.train", *args], cwd=REPO,
                            env=subprocess_env(IN_PROCESS_DEVICES, compilation_cache), stdout=stdout,
                            stderr=stderr, text=True)
    try:
      deadline = time.monotonic() + 480
      metrics = model_dir / "metrics.jsonl"
      while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert proc.poll() is None, f"exited early: {proc.returncode}\n{(tmp_path / 'stderr').read_text()}"
        assert time.monotonic() < deadline, "no training step within the deadline"
        time.sleep(0.2)
      proc.send_signal(signal.SIGTERM)
      returncode = proc.wait(timeout=180)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
  assert returncode == 128 + signal.SIGTERM == 143, (returncode, out, err)
  assert "Traceback" not in out + err, err
  match = re.search(r"SIGTERM received: checkpoint saved at step (\d+)", err)
  assert match, err
  step = int(match.group(1))
  assert step > 0
  assert checkpoint_steps(model_dir) == [step]
  assert os.path.exists(model_dir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA")
  assert glob.glob(str(model_dir / "data_state" / str(step) / "process_0-of-1.*"))
  record = read_json(model_dir / "run.json")
  assert (record["status"], record["step"]) == ("preempted", step)
  assert max(train_lines(model_dir)) == step

  # The same command again (with a reachable number of steps) resumes where the first one stopped.
  status, out, err = run_in_process(args[:-2] + ["--gin.TRAIN_STEPS=%d" % (step + 2)], capfd)
  assert status == 0, out + err
  assert f"Restored from MODEL_DIR checkpoint at step {step}" in out, out
  record = read_json(model_dir / "run.json")
  assert (record["status"], record["step"]) == ("complete", step + 2)
  lines = train_lines(model_dir)
  assert [s for s in sorted(lines) if s > step] == [step + 1, step + 2]
  assert checkpoint_steps(model_dir)[-1] == step + 2


# ---- 4. mistakes: one readable error, nothing written -------------------------------------------------------
def _offline_spm_path() -> str:
  import tasks
  return tasks.offline_vocabulary().sentencepiece_model_file


ERROR_CASES = {
    # (a) an unset required macro: the model and size files need a run file's macros.
    "unset_macro": (lambda d: ["--gin_file=gin/models/vanilla.gin", "--gin_file=gin/sizes/tiny.gin",
                               model_dir_flag(d)],
                    ["Gin configuration error", "macro"]),
    # (b) unknown names: a misspelt parameter, an unknown configurable.
    "unknown_parameter": (lambda d: TINY + [model_dir_flag(d), "--gin.layers.MlpBlock.no_such_param=3"],
                          ["no_such_param", "MlpBlock"]),
    "unknown_configurable": (lambda d: TINY + [model_dir_flag(d), "--gin.NoSuchThing.x=1"],
                             ["No configurable matching 'NoSuchThing'", "spelling"]),
    # (c) a mesh that does not match the 16 devices.
    "mesh_mismatch": (lambda d: TINY + [model_dir_flag(d), "--gin.MESH_SHAPE=(3, 5)"],
                      ["Mesh shape (3, 5)", "15 devices", "16"]),
    # (d) the study's C4 run with a TFDS data dir that holds no C4 (the offline vocabulary, so no network).
    "missing_tfds_dataset": (lambda d: [
        "--gin_file=gin/models/vanilla.gin", "--gin_file=gin/sizes/tiny.gin", "--gin_file=gin/runs/pretrain_c4.gin",
        "--gin_file=gin/meshes/cpu.gin", "--gin.NUM_ENCODER_LAYERS=1", "--gin.NUM_DECODER_LAYERS=1",
        "--gin.EMBED_DIM=64", "--gin.MLP_DIM=128", "--gin.NUM_HEADS=2", "--gin.HEAD_DIM=32",
        f"--gin.SPM_PATH='{_offline_spm_path()}'", f"--gin.TFDS_DATA_DIR='{os.path.dirname(d)}/empty_tfds'",
        model_dir_flag(d)], ["c4/en:3.1.0", "not available", "tfds build"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_mistake_is_one_clean_error_and_writes_nothing(case, tmp_path, capfd, monkeypatch):
  monkeypatch.chdir(tmp_path)  # so a stray relative write would show up below
  (tmp_path / "empty_tfds").mkdir()
  model_dir = tmp_path / "model_dir"
  args, phrases = ERROR_CASES[case]
  args = args(str(model_dir))
  before = snapshot(tmp_path)
  status, out, err = run_in_process(args, capfd, devices=None)
  message = assert_one_clean_error(status, out, err, *phrases)
  if case == "unset_macro":  # names one of the run file's macros
    assert re.search(r"(ACTIVATION_DTYPE|DROPOUT_RATE|SCAN_LAYERS|REMAT_POLICY)", message), message
  assert not model_dir.exists()
  assert snapshot(tmp_path) == before


def test_missing_model_dir_macro(tmp_path, capfd, monkeypatch):
  monkeypatch.chdir(tmp_path)
  status, out, err = run_in_process(["--gin_file=gin/runs/quickstart.gin"], capfd, devices=None)
  assert_one_clean_error(status, out, err, "MODEL_DIR", "macro")
  assert os.listdir(tmp_path) == []


def test_checkpoint_of_another_configuration_is_refused(straight_run, tmp_path, capfd):
  """(e) A MODEL_DIR holding the tiny run's checkpoints, started with another EMBED_DIM: the error
  names the difference and not a byte of MODEL_DIR changes."""
  model_dir = copy_of(straight_run, tmp_path)
  before = snapshot(model_dir)
  args = TINY + [model_dir_flag(model_dir), f"--gin.TRAIN_STEPS={STRAIGHT_STEPS + 2}", "--gin.EMBED_DIM=32"]
  status, out, err = run_in_process(args, capfd)
  message = assert_one_clean_error(status, out, err, "different configuration", f"step {STRAIGHT_STEPS}",
                                   "Nothing was changed")
  assert re.search(r"shape \[[^\]]*64[^\]]*\] there, \[[^\]]*32[^\]]*\] now", message), message
  assert snapshot(model_dir) == before
  assert "Restored" not in out and "training from scratch" not in out


def test_mistake_through_the_cli(tmp_path, compilation_cache):
  """The real user path for a mistake: `python -m scaling_arch.train` exits with status 2 and one
  `error:` line (absl's app.run adds no traceback), and MODEL_DIR is not created."""
  model_dir = tmp_path / "model_dir"
  result = cli(TINY + [model_dir_flag(model_dir), "--gin.layers.MlpBlock.no_such_param=3"], devices=1,
               cache_dir=compilation_cache)
  assert_one_clean_error(result.returncode, result.stdout, result.stderr, "no_such_param", "MlpBlock")
  assert not model_dir.exists()


# ---- 5. non-finite loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("save_every, bad_step, phrase", [
    # The loss of step 8 is NaN (step 7's update, with an infinite learning rate, broke the parameters).
    (1000, STRAIGHT_STEPS + 2, f"The loss became nan at step {STRAIGHT_STEPS + 2}"),
    # A checkpoint is due right after the broken update, whose own loss was still finite: it must not be
    # written (and called the last good one).
    (1, STRAIGHT_STEPS + 1, f"non-finite at step {STRAIGHT_STEPS + 1}"),
])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(straight_run, tmp_path, capfd, save_every,
                                                             bad_step, phrase):
  """Resuming the tiny run with an absurd learning rate (1e39 overflows float32 to inf) is a reliable
  trigger: the first resumed step is computed from the good checkpoint, the next from broken
  parameters."""
  model_dir = copy_of(straight_run, tmp_path)
  checkpoints_before = snapshot(os.path.join(model_dir, "checkpoints"))
  status, out, err = run_in_process(
      TINY + [model_dir_flag(model_dir), f"--gin.TRAIN_STEPS={STRAIGHT_STEPS + 4}",
              "--gin.optimizers.rsqrt_schedule.base=1e39",
              f"--gin.checkpoints.CheckpointConfig.save_every_steps={save_every}"], capfd)
  assert f"Restored from MODEL_DIR checkpoint at step {STRAIGHT_STEPS}" in out
  message = assert_one_clean_error(status, out, err, phrase,
                                   f"last good checkpoint (step {STRAIGHT_STEPS})", "learning rate")
  assert f"step {bad_step}" in message
  assert checkpoint_steps(model_dir) == checkpoint_steps(straight_run)
  assert snapshot(os.path.join(model_dir, "checkpoints")) == checkpoints_before
  assert read_json(os.path.join(model_dir, "run.json"))["status"] == "failed_nonfinite_loss"
  lines = train_lines(model_dir)
  assert max(lines) == STRAIGHT_STEPS + 1 and all(np.isfinite(m["loss"]) for m in lines.values())

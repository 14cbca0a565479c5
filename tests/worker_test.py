"""Tests of the warm worker (`launch.Local.reuse_processes`, launch/worker.py): one process runs stage after
stage with the same results, output and exit statuses as `python -m scaling_arch.train`, and a failed stage
ends it.

Cost: about a minute on a 2-core CPU (one worker, one subprocess, tiny models, a few steps). No network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6

RUN_FILE = f"""\
include 'gin/meshes/cpu.gin'
BATCH_SIZE = 4
TRAIN_STEPS = {STEPS}
INPUT_LENGTH = 64
TARGET_LENGTH = 16
DROPOUT_RATE = 0.1
ACTIVATION_DTYPE = 'float32'
SCAN_LAYERS = True
REMAT_POLICY = 'none'
EMBED_DIM = 32
MLP_DIM = 64
NUM_HEADS = 1
HEAD_DIM = 32
train.model_dir = %MODEL_DIR
train.task_name = 'offline_span_corruption'
train.offline_vocab_size = 4000
train.feature_lengths = {{'inputs': %INPUT_LENGTH, 'targets': %TARGET_LENGTH}}
train.batch_size = %BATCH_SIZE
train.train_steps = %TRAIN_STEPS
train.eval_every_steps = %TRAIN_STEPS
train.eval_steps = 2
train.log_every_steps = 3
"""


def stage_args(run_file, model_dir, *extra) -> list[str]:
  return ["--gin_file=gin/models/vanilla.gin", "--gin_file=gin/sizes/tiny.gin", f"--gin_file={run_file}",
          f"--gin.MODEL_DIR={str(model_dir)!r}", *extra]


def wait(job, timeout: float = 300) -> int:
  deadline = time.time() + timeout
  while time.time() < deadline:
    code = job.poll()
    if code is not None:
      return code
    time.sleep(0.2)
  job.kill()
  raise AssertionError(f"the stage did not end within {timeout:.0f} s")


def record(model_dir) -> dict:
  with open(os.path.join(model_dir, "run.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  env = local.Local(compilation_cache_dir=None).environment()
  env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
              "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
              "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})
  return env


def test_one_worker_runs_stages_as_the_command_line_does_and_a_failure_ends_it(tmp_path, env):
  run_file = tmp_path / "run.gin"
  run_file.write_text(RUN_FILE)
  logs = tmp_path / "logs"
  # Two seeds, then the first again: the third stage follows a different one in the same process.
  seeds = {"a": 0, "b": 1, "c": 0}
  worker = local.Worker(str(logs / "a.log"), env)
  pids = []
  for name, seed in seeds.items():
    job = worker.submit(stage_args(run_file, tmp_path / name, f"--gin.train.seed={seed}"), str(logs / f"{name}.log"))
    pids.append(job.pid)
    assert wait(job) == 0, (logs / f"{name}.log").read_text()
  assert pids == [worker.pid] * 3 and worker.idle()

  # The same stage as a fresh `python -m scaling_arch.train`: the worker's results match it.
  with open(logs / "fresh.log", "wb") as log:
    subprocess.run([sys.executable, "-m", "scaling_arch.train",
                    *stage_args(run_file, tmp_path / "fresh", "--gin.train.seed=0")],
                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=300)
  fresh, a, b, c = (record(tmp_path / n) for n in ("fresh", "a", "b", "c"))
  for r in (a, b, c):
    assert (r["status"], r["step"]) == ("complete", STEPS)
  for key in ("final_loss", "eval_neg_log_perplexity"):
    assert a[key] == pytest.approx(fresh[key], rel=1e-5), key
    assert c[key] == pytest.approx(fresh[key], rel=1e-5), key  # nothing of stage b carried over
    assert abs(b[key] - fresh[key]) > 1e-4, key  # another seed: another run, not a cached result
  for name in ("a", "b", "c"):  # each stage's output (Python's and the trainer's) went to its own log
    text = (logs / f"{name}.log").read_text()
    assert f"step {STEPS}/{STEPS}" in text and f"eval at step {STEPS}" in text, text
    assert text.count("training from scratch") == 1, text

  # A wrong binding: the same one-line error and status 2 as the command line, and the worker exits.
  job = worker.submit(stage_args(run_file, tmp_path / "bad", "--gin.train.no_such_argument=1"),
                      str(logs / "bad.log"))
  assert wait(job) == 2
  assert "error: " in (logs / "bad.log").read_text() and "no_such_argument" in (logs / "bad.log").read_text()
  worker.process.wait(timeout=30)
  assert worker.process.returncode == 2 and not worker.idle()


def test_sigterm_mid_stage_checkpoints_and_ends_the_worker(tmp_path, env):
  run_file = tmp_path / "run.gin"
  run_file.write_text(RUN_FILE.replace(f"TRAIN_STEPS = {STEPS}", "TRAIN_STEPS = 100000")
                      + "train.checkpoint_config = @checkpoints.CheckpointConfig()\n"
                        "checkpoints.CheckpointConfig.save_every_steps = 100000\n")
  log = tmp_path / "stage.log"
  worker = local.Worker(str(log), env)
  job = worker.submit(stage_args(run_file, tmp_path / "run"), str(log))
  deadline = time.time() + 300
  while "step 3/100000" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
    assert job.poll() is None, log.read_text()
    time.sleep(0.2)
  job.terminate()
  assert wait(job, 120) == 143, log.read_text()
  r = record(tmp_path / "run")
  assert r["status"] == "preempted" and r["step"] >= 3
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / str(r["step"]))
  worker.process.wait(timeout=30)
  assert not worker.idle()

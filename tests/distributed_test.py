"""Multi-process training: two processes on localhost, JAX's distributed runtime and gloo CPU collectives,
2 CPU devices each, train the same tiny model as one process with 4 devices, to the same losses.

`tasks.get_dataset` builds the same global batch in every process and each keeps its rows, so the global
batches, hence the losses, do not depend on the process count. Both processes share MODEL_DIR (orbax
checkpointing is collective); only process 0 writes metrics.jsonl and run.json.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags

from scaling_arch import gin_utils, partitioning
from scaling_arch import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
ARGS = [
    "--gin_file=gin/runs/quickstart.gin",
    "--gin.NUM_ENCODER_LAYERS=1", "--gin.NUM_DECODER_LAYERS=1", "--gin.EMBED_DIM=64", "--gin.MLP_DIM=128",
    "--gin.NUM_HEADS=2", "--gin.HEAD_DIM=32", "--gin.BATCH_SIZE=8",
    "--gin.train.feature_lengths={'inputs': 64, 'targets': 16}",
    "--gin.train.log_every_steps=1", "--gin.train.eval_steps=1", "--gin.train.eval_every_steps=0",
    "--gin.checkpoints.CheckpointConfig.save_every_steps=2", f"--gin.TRAIN_STEPS={STEPS}",
]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache for the in-process reference run (shared with train_test.py,
  whose runs have the same shapes)."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  path = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
  for name, value in zip(names, (path, 0, -1)):
    jax.config.update(name, value)
  cc.reset_cache()
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  cc.reset_cache()


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env_with_devices(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f] +
      [f"--xla_force_host_platform_device_count={devices}"])
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return env


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_single_process_reference(model_dir: str) -> None:
  """The same run in this process on a 4-device mesh (4 of the 16 forced CPU devices)."""
  four = functools.partial(partitioning.Partitioner, devices=jax.devices()[:4])
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["scaling_arch.train", *gin_utils.rewrite_gin_args(ARGS + [f"--gin.MODEL_DIR='{model_dir}'"])])
  try:
    status = train_lib.run([], functools.partial(train_lib.train, partitioner_factory=four))
  finally:
    flags.FLAGS.unparse_flags()
  assert status == 0


def test_two_processes_train_like_one(tmp_path):
  model_dir = str(tmp_path / "two_processes")
  address = f"localhost:{free_port()}"
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "scaling_arch.train", *ARGS, f"--gin.MODEL_DIR='{model_dir}'",
             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env_with_devices(2), stdout=log, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 540
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: the other would wait for it until the runtime's own timeout
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  output = "\n".join(f"--- process {i}:\n{logs[i].read_text()[-5000:]}" for i in range(2))
  assert [p.returncode for p in procs] == [0, 0], output
  assert "Traceback" not in output, output

  reference_dir = str(tmp_path / "one_process")
  run_single_process_reference(reference_dir)

  two = read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
  one = read_jsonl(os.path.join(reference_dir, "metrics.jsonl"))
  # Only process 0 writes: every step once.
  assert [m["step"] for m in two] == [m["step"] for m in one] == list(range(1, STEPS + 1)) + [STEPS]
  for a, b in zip(two, one):
    for key in ("loss", "num_tokens", "eval_neg_log_perplexity"):
      if key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=f"{key} at step {b['step']}")
  assert two[0]["loss"] != two[STEPS - 1]["loss"]  # it trained

  record = json.load(open(os.path.join(model_dir, "run.json")))
  reference = json.load(open(os.path.join(reference_dir, "run.json")))
  assert (record["processes"], record["devices"], record["mesh"]) == (2, 4, {"data": 4, "model": 1})
  assert (record["status"], record["step"]) == ("complete", STEPS)
  np.testing.assert_allclose(record["final_loss"], reference["final_loss"], rtol=1e-4)
  np.testing.assert_allclose(record["eval_neg_log_perplexity"], reference["eval_neg_log_perplexity"], rtol=1e-4)

  # One shared checkpoint per step, and each process's input position.
  assert sorted(int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints")) if n.isdigit()) == [2, STEPS]
  states = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "data_state", str(STEPS), "*.index")))
  assert states == ["process_0-of-2.index", "process_1-of-2.index"], states

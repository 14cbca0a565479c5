r"""Train-step benchmark: `python -m scaling_arch.benchmark [--gin_file=...] [--gin.NAME=VALUE]`.

Times the compiled train step of a gin configuration after warm-up, on random token ids (no tokenizer, no
data pipeline), and reports step time, tokens/s, FLOPs per step and MFU against the dense float32 matmul
throughput of the same devices, which it measures in the same run.

With no --gin_file it benchmarks the vanilla T5 v1.0 baseline at "small" size (6+6 layers, d_model 512,
8 heads of 64, d_ff 2048) with a 32,128-token vocabulary, batch 8, 128 input and 32 target tokens, float32:

  python -m scaling_arch.benchmark
  python -m scaling_arch.benchmark --gin_file=gin/models/vanilla.gin --gin_file=gin/sizes/base.gin \
      --gin_file=gin/runs/benchmark.gin --batch_size=16 --json_out=/tmp/bench.json

Given gin files are used as they are, so list a run file (gin/runs/benchmark.gin sets the run macros).

What the figures mean:
  * step time: wall time of one `train_step` (forward, backward, Adafactor update) with the result
    blocked on; median and best of --steps steps after --warmup_steps (the first compiles).
  * FLOPs/step: XLA's cost analysis of the whole step with the layer scans unrolled (`Trainer.
    flops_per_step`): every floating-point operation XLA counts, matmuls (2 per multiply-add) and
    elementwise work alike, including the optimizer. It is not the analytic 6 * params * tokens.
  * matmul peak: the best throughput of a jitted dense float32 matmul among a few square sizes, run
    concurrently on every device of the mesh (so forced host devices sharing cores are not counted
    as independent machines), best of several timed trials of >= `peak_min_seconds` each, measured
    before and after the timed steps (the higher counts).
  * MFU: FLOPs/step / median step time / matmul peak. It is relative to a *measured* matmul peak, not to
    the hardware's theoretical peak, and is only as steady as the machine is quiet.
"""

from __future__ import annotations

if __name__ == "__main__":
  from scaling_arch import runtime_env
  runtime_env.start()  # before JAX and TensorFlow: huge-page malloc, quiet libraries (runtime_env.py)

import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec

from scaling_arch import errors, gin_utils
from scaling_arch import models as models_lib
from scaling_arch import optimizers, partitioning, runtime_env
from scaling_arch import train as train_lib  # registers `train` (the model files bind it) and the gin flags
from scaling_arch import trainer as trainer_lib

DEFAULT_GIN_FILES = ("gin/models/vanilla.gin", "gin/sizes/small.gin", "gin/runs/benchmark.gin")
DEFAULT_PEAK_SIZES = (512, 1024, 2048)
FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


# ---- the matmul peak ---------------------------------------------------------------------------------
def measure_matmul_peak(devices: Optional[Sequence[Any]] = None, *, sizes: Sequence[int] = DEFAULT_PEAK_SIZES,
                        min_seconds: float = 1.0, trials: int = 3, dtype=jnp.float32) -> dict:
  """Dense matmul throughput of `devices` (all of JAX's by default), all computing at once.

  For each size n, every device multiplies its own n x n pair (one [D, n, n] batched matmul sharded over
  the devices); a trial repeats it for at least `min_seconds`; the best trial counts. Returns the best
  size's figures: {'flops_per_sec' (all devices), 'flops_per_sec_per_device', 'size', 'devices',
  'by_size': {n: flops_per_sec}}.
  """
  devices = list(devices) if devices is not None else jax.devices()
  d = len(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
  sharding = NamedSharding(mesh, PartitionSpec("devices"))
  matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=sharding)
  rng = np.random.default_rng(0)
  by_size = {}
  for n in sizes:
    a = jax.device_put(rng.standard_normal((d, n, n), np.float32).astype(dtype), sharding)
    b = jax.device_put(rng.standard_normal((d, n, n), np.float32).astype(dtype), sharding)
    flops = 2.0 * d * n ** 3
    jax.block_until_ready(matmul(a, b))  # compile
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    reps = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    best = math.inf
    for _ in range(trials):
      start = time.perf_counter()
      out = None
      for _ in range(reps):
        out = matmul(a, b)
      jax.block_until_ready(out)
      best = min(best, (time.perf_counter() - start) / reps)
    by_size[int(n)] = flops / best
    del a, b, out
  size = max(by_size, key=by_size.get)
  return {"flops_per_sec": by_size[size], "flops_per_sec_per_device": by_size[size] / d, "size": size,
          "devices": d, "dtype": jnp.dtype(dtype).name, "by_size": by_size}


# ---- how busy the machine is --------------------------------------------------------------------------
def _cpu_snapshot() -> tuple[float, float, Optional[float]]:
  """(wall seconds, this process's CPU seconds, CPU seconds of all processes or None off Linux)."""
  wall, own = time.perf_counter(), time.process_time()
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:9]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
  except (OSError, ValueError, IndexError):
    busy = None
  return wall, own, busy


def cpu_load(start, end) -> dict:
  """This process's CPU seconds, and the cores other processes (and the hypervisor) kept busy."""
  wall = max(end[0] - start[0], 1e-9)
  own = end[1] - start[1]
  other = None if start[2] is None or end[2] is None else max(0.0, (end[2] - start[2]) - own) / wall
  return {"process_cpu_seconds": own, "other_busy_cores": other}


def _compiled_memory(compiled) -> dict:
  """XLA's buffer assignment for the compiled step: temporaries and peak, in bytes (None if unknown)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    stats = None
  return {"temp_bytes": getattr(stats, "temp_size_in_bytes", None),
          "peak_bytes": getattr(stats, "peak_memory_in_bytes", None)}


def _max_rss_bytes() -> Optional[int]:
  """This process's peak resident set size so far (Linux reports KiB), or None."""
  try:
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  except (ImportError, OSError):
    return None


# ---- the configuration -------------------------------------------------------------------------------
def _train_binding(name: str, default: Any) -> Any:
  """The value bound to `train.<name>` (references resolved, as gin would pass it), else `default`."""
  try:
    value = gin.query_parameter(f"train.{name}")
  except ValueError:
    return default
  return copy.deepcopy(value)  # gin resolves ConfigurableReferences and macros when copying them


def _macro(name: str, default: Any = None) -> Any:
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return default


def describe_config(gin_files: Sequence[str], gin_bindings: Sequence[str]) -> str:
  arch = _train_binding("architecture", "?")
  size = _train_binding("size", "?")
  geometry = []
  enc, dec = _macro("NUM_ENCODER_LAYERS"), _macro("NUM_DECODER_LAYERS")
  if enc is not None and dec is not None:
    geometry.append(f"{enc}+{dec} layers")
  for macro, label in (("EMBED_DIM", "d_model"), ("MLP_DIM", "d_ff")):
    if _macro(macro) is not None:
      geometry.append(f"{label} {_macro(macro)}")
  if _macro("NUM_HEADS") is not None:
    geometry.append(f"{_macro('NUM_HEADS')} heads of {_macro('HEAD_DIM', '?')}")
  if _macro("ACTIVATION_DTYPE") is not None:
    geometry.append(str(_macro("ACTIVATION_DTYPE")))
  if _macro("SCAN_LAYERS") is not None:
    geometry.append("scanned layers" if _macro("SCAN_LAYERS") else "unrolled layers")
  files = ", ".join(gin_files)
  extra = f"; {len(gin_bindings)} binding(s): {', '.join(b.strip() for b in gin_bindings)}" if gin_bindings else ""
  return f"{arch} {size} ({', '.join(geometry)}; {files}{extra})"


def random_batch(batch_size: int, input_length: int, target_length: int, vocab_size: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """This process's rows of a global batch of random token ids in [1, vocab_size) (no padding)."""
  if vocab_size < 2:
    raise errors.ConfigError(f"--vocab_size must be at least 2, got {vocab_size}.")
  rows = batch_size // jax.process_count()
  rng = np.random.default_rng(seed + jax.process_index())
  lengths = {"encoder_input_tokens": input_length, "decoder_input_tokens": target_length,
             "decoder_target_tokens": target_length}
  return {k: rng.integers(1, vocab_size, size=(rows, lengths[k]), dtype=np.int32) for k in FEATURES}


# ---- the benchmark -----------------------------------------------------------------------------------
def run_benchmark(*, gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (), batch_size: int = 8,
                  input_length: int = 128, target_length: int = 32, vocab_size: int = 32128,
                  warmup_steps: int = 3, steps: int = 10, json_out: Optional[str] = None,
                  peak_sizes: Sequence[int] = DEFAULT_PEAK_SIZES, peak_min_seconds: float = 1.0,
                  peak_trials: int = 3, print_fn: Callable[[str], None] = print) -> dict:
  """Parses the gin configuration, benchmarks its train step and returns (and prints) the figures."""
  for name, value in (("batch_size", batch_size), ("input_length", input_length),
                      ("target_length", target_length), ("steps", steps)):
    if value <= 0:
      raise errors.ConfigError(f"--{name} must be positive, got {value}.")
  if vocab_size < 2:
    raise errors.ConfigError(f"--vocab_size must be at least 2, got {vocab_size}.")
  if warmup_steps < 0:
    raise errors.ConfigError(f"--warmup_steps must be >= 0, got {warmup_steps}.")
  gin_files = list(gin_files) or list(DEFAULT_GIN_FILES)
  gin_utils.parse(gin_files, gin_bindings)
  config = describe_config(gin_files, gin_bindings)

  module_factory = _train_binding("module_factory", None)
  if module_factory is None:
    raise errors.ConfigError("No model: the gin files must bind train.module_factory (a model file from "
                             "gin/models/ does).")
  partitioner = gin_utils.call_configured(_train_binding("partitioner_factory", partitioning.Partitioner))
  lr_fn = gin_utils.call_configured(_train_binding("learning_rate_fn", optimizers.rsqrt_schedule))
  optimizer = gin_utils.call_configured(_train_binding("optimizer_factory", optimizers.adafactor), lr_fn)
  module = gin_utils.call_configured(module_factory, vocab_size=vocab_size)
  model = models_lib.EncoderDecoderModel(module)
  shapes = {"encoder_input_tokens": (batch_size, input_length),
            "decoder_input_tokens": (batch_size, target_length),
            "decoder_target_tokens": (batch_size, target_length)}
  trainer = gin_utils.call_configured(
      trainer_lib.Trainer, model, partitioner, optimizer=optimizer, learning_rate_fn=lr_fn, batch_shapes=shapes,
      num_microbatches=_train_binding("num_microbatches", 1), seed=_train_binding("seed", 0))
  devices = partitioner.mesh.devices.size
  print_fn(f"config: {config}")
  print_fn(f"params: {trainer.num_params:,}")
  print_fn(f"mesh: {dict(partitioner.mesh.shape)} ({devices} x {jax.devices()[0].device_kind})")

  def matmul_peak():
    return measure_matmul_peak(list(partitioner.mesh.devices.flat), sizes=peak_sizes,
                               min_seconds=peak_min_seconds, trials=peak_trials)

  # The peak is measured twice, before and after the timed steps, and the higher one counts: a machine's
  # matmul throughput drifts by 10-20% over a minute (clock, neighbours), and a low peak would flatter MFU.
  load_start = _cpu_snapshot()
  peak_before = matmul_peak()
  peak_load = cpu_load(load_start, _cpu_snapshot())

  flops = trainer.flops_per_step()
  start = time.perf_counter()
  compiled = trainer.compiled_train_step()
  compile_seconds = time.perf_counter() - start
  memory = _compiled_memory(compiled)
  state = trainer.init_state()
  batch = partitioner.put_batch(random_batch(batch_size, input_length, target_length, vocab_size))
  for _ in range(warmup_steps):
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready((state, metrics))
  times = []
  load_start = _cpu_snapshot()
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)  # the state is donated: keep only the returned one
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_load = cpu_load(load_start, _cpu_snapshot())
  load_start = _cpu_snapshot()
  peak_after = matmul_peak()
  peak_after_load = cpu_load(load_start, _cpu_snapshot())
  if (peak_after_load["other_busy_cores"] or 0.0) > (peak_load["other_busy_cores"] or 0.0):
    peak_load = peak_after_load
  peak = max(peak_before, peak_after, key=lambda p: p["flops_per_sec"])
  print_fn(f"matmul peak: {peak['flops_per_sec'] / 1e9:.1f} GFLOP/s (f32, {devices} devices; "
           f"{peak['flops_per_sec_per_device'] / 1e9:.1f} per device, best at {peak['size']}^3; "
           f"{peak_before['flops_per_sec'] / 1e9:.1f} before the steps, {peak_after['flops_per_sec'] / 1e9:.1f} after)")
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    raise errors.NonFiniteLossError(f"The benchmark's train step produced a non-finite loss ({loss}).")

  median, best = statistics.median(times), min(times)
  tokens_per_step = batch_size * (input_length + target_length)
  result = {
      "config": config, "gin_files": gin_files, "gin_bindings": list(gin_bindings),
      "architecture": _train_binding("architecture", None), "size": _train_binding("size", None),
      "num_params": trainer.num_params, "batch_size": batch_size, "input_length": input_length,
      "target_length": target_length, "vocab_size": vocab_size, "tokens_per_step": tokens_per_step,
      "devices": devices, "device_kind": jax.devices()[0].device_kind,
      "mesh": {k: int(v) for k, v in partitioner.mesh.shape.items()},
      "peak_flops_per_sec": peak["flops_per_sec"], "peak_flops_per_sec_per_device":
      peak["flops_per_sec_per_device"], "peak_matmul_size": peak["size"],
      "peak_by_size": {str(k): v for k, v in peak["by_size"].items()},
      "peak_flops_per_sec_before": peak_before["flops_per_sec"], "peak_flops_per_sec_after":
      peak_after["flops_per_sec"],
      "compile_seconds": compile_seconds, "xla_temp_bytes": memory["temp_bytes"],
      "xla_peak_bytes": memory["peak_bytes"], "max_rss_bytes": _max_rss_bytes(), "warmup_steps": warmup_steps, "steps": steps,
      "step_times": times, "step_time_median": median, "step_time_best": best,
      "tokens_per_sec": tokens_per_step / median, "flops_per_step": flops,
      "flops_per_sec": flops / median, "mfu": flops / median / peak["flops_per_sec"],
      "mfu_best": flops / best / peak["flops_per_sec"], "final_loss": loss,
      "cpu_seconds_per_step": step_load["process_cpu_seconds"] / steps,
      "other_busy_cores_steps": step_load["other_busy_cores"],
      "other_busy_cores_peak": peak_load["other_busy_cores"], "host_cpus": os.cpu_count(),
      "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }
  print_fn(f"compile: {compile_seconds:.1f} s")
  print_fn(f"step time: median {median * 1e3:.1f} ms, best {best * 1e3:.1f} ms ({steps} steps after "
           f"{warmup_steps} warm-up)")
  print_fn(f"tokens/s: {result['tokens_per_sec']:,.0f} ({tokens_per_step:,} tokens/step)")
  mib = lambda b: "?" if b is None else f"{b / 2**20:,.0f} MiB"
  print_fn(f"memory: {mib(memory['temp_bytes'])} XLA temporaries, {mib(memory['peak_bytes'])} XLA peak "
           f"(per device); {mib(result['max_rss_bytes'])} process peak RSS")
  print_fn(f"FLOPs/step: {flops:.4g} (XLA cost analysis; {flops / median / 1e9:.1f} GFLOP/s achieved)")
  print_fn(f"MFU: {100 * result['mfu']:.1f}% (median step; {100 * result['mfu_best']:.1f}% best step) "
           "of the measured f32 matmul peak")
  others = [x for x in (step_load["other_busy_cores"], peak_load["other_busy_cores"]) if x is not None]
  if others:
    print_fn(f"load: {result['cpu_seconds_per_step']:.2f} CPU-s per step in this process; other processes kept "
             f"{step_load['other_busy_cores']:.2f} (steps) / {peak_load['other_busy_cores']:.2f} (peak) of "
             f"{os.cpu_count()} cores busy")
    if max(others) > 0.25:
      print_fn("warning: the machine was not idle while timing; step times, the peak and MFU are unreliable "
               "(re-run on a quiet machine)")
  if json_out:
    import tensorflow as tf
    parent = os.path.dirname(json_out)
    if parent:
      tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(json_out, "w") as f:
      f.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print_fn(f"results written to {json_out}")
  return result


# ---- command line -------------------------------------------------------------------------------------
FLAGS = flags.FLAGS  # --gin_file and --gin_bindings (--gin.NAME=VALUE) come from scaling_arch.train
flags.DEFINE_integer("batch_size", 8, "Global batch size.")
flags.DEFINE_integer("input_length", 128, "Encoder input length.")
flags.DEFINE_integer("target_length", 32, "Decoder target length.")
flags.DEFINE_integer("vocab_size", 32128, "Vocabulary size (token ids are random; no tokenizer).")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps first (the first one compiles).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_string("json_out", None, "Optional path to write the results as JSON.")
# --malloc_hugepages (default on, Linux) comes from scaling_arch.runtime_env, which acts on it at start-up.


def main(argv):
  del argv
  if not (FLAGS["verbosity"].present or runtime_env.verbose()):
    logging.set_verbosity(logging.WARNING)
  try:
    train_lib.initialize_distributed()
    run_benchmark(gin_files=FLAGS.gin_file, gin_bindings=FLAGS.gin_bindings, batch_size=FLAGS.batch_size,
                  input_length=FLAGS.input_length, target_length=FLAGS.target_length,
                  vocab_size=FLAGS.vocab_size, warmup_steps=FLAGS.warmup_steps, steps=FLAGS.steps,
                  json_out=FLAGS.json_out)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  sys.exit(0)


if __name__ == "__main__":
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))

r"""Pretraining entry point: `python -m scaling_arch.train --gin_file=... --gin.NAME=VALUE`.

Gin files layer as model -> size -> run (+ mesh); both flags repeat and later wins. Example (CPU,
offline):

  python -m scaling_arch.train --gin_file=gin/runs/quickstart.gin --gin.MODEL_DIR="'/tmp/qs'"

MODEL_DIR receives config.gin, checkpoints/, tensorboard/, metrics.jsonl and run.json.
"""

from __future__ import annotations

if __name__ == "__main__":
  # `python -m scaling_arch.train` runs this file as `__main__`, while other modules (gin_utils, benchmark)
  # import it as `scaling_arch.train`. Run the CLI from that one module object, so its absl flags and gin
  # configurables are registered once (a second copy raises DuplicateFlagError or makes `train` ambiguous).
  from scaling_arch import train as _package_module
  _package_module.cli()  # exits

import contextlib
import hashlib
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from scaling_arch import checkpoints as checkpoints_lib
from scaling_arch import errors, gin_utils
from scaling_arch import evaluate as evaluate_lib  # noqa: F401  (registers InferenceEvaluator, decoding)
from scaling_arch import metrics as metrics_lib
from scaling_arch import models as models_lib
from scaling_arch import optimizers, partitioning  # noqa: F401  (registers configurables)
from scaling_arch import trainer as trainer_lib
from scaling_arch import registry  # noqa: F401  (registers every layer and architecture with gin)
import tasks  # before gin parses: t5 registers configurables on import

FEATURE_LENGTH_KEYS = {"inputs": ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions"),
                       "targets": ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                                   "decoder_segment_ids", "decoder_positions")}


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._previous = None

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):
  """Raised after the preemption checkpoint is written; the process exits with 128 + SIGTERM."""


def batch_shapes(feature_lengths: dict[str, int], batch_size: int, pack: bool = True) -> dict[str, tuple]:
  shapes = {}
  for feature, length in feature_lengths.items():
    for key in FEATURE_LENGTH_KEYS[feature]:
      shapes[key] = (batch_size, length)
  return shapes


def config_hash() -> str:
  return hashlib.sha256(gin.config_str().encode()).hexdigest()[:16]


def model_config_lines() -> list[str]:
  """The gin bindings that shape the model (layers / architectures / model), for the signature."""
  lines = []
  for line in gin.config_str().splitlines():
    key = line.split("=", 1)[0].strip()
    if key.startswith(("layers.", "architectures.", "EncoderDecoderModel.")) and "dropout" not in key:
      lines.append(" ".join(line.split()))
  return sorted(lines)


@jax.jit
def _all_finite_impl(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _all_finite(tree) -> bool:
  """Whether every floating-point leaf of `tree` (global, possibly sharded arrays) is finite."""
  return bool(jax.device_get(_all_finite_impl(tree)))


@gin.configurable(denylist=["model_dir_override"])
def train(*,
          model_dir: str = gin.REQUIRED,
          architecture: str = gin.REQUIRED,
          size: str = gin.REQUIRED,
          module_factory: Callable = gin.REQUIRED,
          task_name: str = gin.REQUIRED,
          feature_lengths: dict = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          spm_path: Optional[str] = None,
          offline_vocab_size: int = 4000,
          tfds_data_dir: Optional[str] = None,
          pack: bool = True,
          shuffle: bool = True,
          eval_every_steps: int = 1000,
          eval_steps: int = 20,
          log_every_steps: int = 100,
          seed: int = 0,
          data_seed: int = 42,
          num_microbatches: int = 1,
          learning_rate_fn: Callable = optimizers.rsqrt_schedule,
          optimizer_factory: Callable = optimizers.adafactor,
          partitioner_factory: Callable = partitioning.Partitioner,
          checkpoint_config: Optional[checkpoints_lib.CheckpointConfig] = None,
          initial_checkpoint: Optional[str] = None,
          restore_optimizer_state: bool = False,
          require_initial_checkpoint: bool = False,
          inference_evaluator: Optional[Callable] = None,
          infer_eval_every_steps: Optional[int] = None,
          stop_after_steps: Optional[int] = None,
          model_dir_override: Optional[str] = None) -> dict:
  """Pretrains (or continues) one run; returns its run record.

  Args:
    model_dir: where checkpoints, metrics and run.json go (local path or gs://).
    architecture / size: names recorded in run.json (the gin files set them).
    module_factory: the architecture's encoder-decoder class; called with vocab_size.
    task_name: 'offline_span_corruption' (no network) or 'c4_span_corruption' (TFDS c4/en); for
      fine-tuning 'sa_glue_super_glue_squad' (TFDS) or 'sa_offline_completion' (tasks/finetuning.py).
    feature_lengths: {'inputs': 512, 'targets': 114} for the study.
    require_initial_checkpoint: refuse to start from scratch (fine-tuning starts from a pretrained model).
    inference_evaluator: for fine-tuning, a factory of the decoding evaluation (evaluate.InferenceEvaluator),
      run every `infer_eval_every_steps` steps (if set) and at the end; None: none (pretraining).
    stop_after_steps: stop (with a checkpoint) after this many steps of this invocation: for tests of
      restarts and for splitting a long run into jobs.
  """
  model_dir = model_dir_override or model_dir
  checkpoint_config = checkpoint_config or checkpoints_lib.CheckpointConfig()
  for name, value in [("BATCH_SIZE", batch_size), ("TRAIN_STEPS", train_steps)]:
    if value <= 0:
      raise errors.ConfigError(f"{name} must be positive, got {value}.")

  # ---- everything that can fail on bad input happens before anything is written -----------------------
  partitioner = partitioner_factory()
  vocabulary = tasks.get_vocabulary(spm_path, offline_vocab_size=offline_vocab_size)
  vocab_size = tasks.padded_vocab_size(vocabulary)
  task = tasks.get_task(task_name, vocabulary=vocabulary, tfds_data_dir=tfds_data_dir)
  model = models_lib.EncoderDecoderModel(module_factory(vocab_size=vocab_size))
  lr_fn = learning_rate_fn()
  trainer = trainer_lib.Trainer(model, partitioner, optimizer=optimizer_factory(lr_fn), learning_rate_fn=lr_fn,
                                batch_shapes=batch_shapes(feature_lengths, batch_size, pack),
                                num_microbatches=num_microbatches, seed=seed)
  signature = checkpoints_lib.model_signature(
      architecture, trainer.param_shapes,
      {"vocab_size": vocab_size, "model_config": model_config_lines(), "task": task_name})
  checkpointer = checkpoints_lib.Checkpointer(model_dir, checkpoint_config, signature)
  resume_step = checkpointer.check_compatible()  # MODEL_DIR's own run (same model and task) wins
  if resume_step is None and initial_checkpoint:
    checkpoints_lib.check_initial_checkpoint(initial_checkpoint, signature)
  elif resume_step is None and require_initial_checkpoint:
    raise errors.ConfigError("INITIAL_CHECKPOINT is not set: this run starts from a pretrained checkpoint (a "
                             "step directory such as PRETRAIN_MODEL_DIR/checkpoints/524288); set "
                             "--gin.INITIAL_CHECKPOINT, or train.require_initial_checkpoint=False.")
  infer = None
  if inference_evaluator is not None:
    infer = inference_evaluator(trainer=trainer, task=task, vocabulary=vocabulary,
                                feature_lengths=feature_lengths, model_dir=model_dir)

  def dataset(split, repeat, shuffle_split):
    return tasks.get_dataset(task, split=split, feature_lengths=feature_lengths, global_batch_size=batch_size,
                             seed=data_seed, shuffle=shuffle_split, repeat=repeat, pack=pack,
                             process_index=jax.process_index(), process_count=jax.process_count())

  train_ds = dataset("train", True, shuffle)
  train_iter = iter(train_ds)

  # ---- state: resume, initialize from a checkpoint, or start fresh --------------------------------
  if resume_step is not None:
    state = checkpointer.restore(resume_step, trainer.abstract_state, train_iter)
    logging.info("Resuming from %s at step %d.", checkpointer.directory, resume_step)
    metrics_lib.print_progress(f"Restored from MODEL_DIR checkpoint at step {resume_step} "
                               f"({checkpointer.directory}); resuming.")
  elif initial_checkpoint:
    if restore_optimizer_state:
      state = checkpoints_lib.Checkpointer(os.path.dirname(os.path.dirname(initial_checkpoint.rstrip("/"))),
                                           checkpoint_config, signature).restore(
          int(os.path.basename(initial_checkpoint.rstrip("/"))), trainer.abstract_state)
      state = state.replace(step=np.zeros((), np.int32)) if hasattr(state, "replace") else state
      how = "parameters and optimizer state"
    else:
      params = checkpoints_lib.restore_params(initial_checkpoint, trainer.abstract_state.params)
      state = trainer.state_from_params(params)
      how = "parameters only; fresh optimizer state"
    metrics_lib.print_progress(f"Initialized from INITIAL_CHECKPOINT {initial_checkpoint} ({how}).")
  else:
    state = trainer.init_state()
    metrics_lib.print_progress(f"No checkpoint in {model_dir} and no INITIAL_CHECKPOINT: training from "
                               "scratch.")

  # ---- outputs -------------------------------------------------------------------------------------
  import tensorflow as tf
  tf.io.gfile.makedirs(model_dir)
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  logger = metrics_lib.MetricsLogger(model_dir)
  tokens_per_step = int(batch_size * (feature_lengths["inputs"] + feature_lengths["targets"]))
  flops = trainer.flops_per_step()
  record = metrics_lib.update_run_record(
      model_dir, architecture=architecture, size=size, config_hash=config_hash(), num_params=trainer.num_params,
      flops_per_step=flops, tokens_per_step=tokens_per_step, target_tokens_per_step=batch_size *
      feature_lengths["targets"], batch_size=batch_size, feature_lengths=dict(feature_lengths),
      devices=jax.device_count(), device_kind=jax.devices()[0].device_kind, processes=jax.process_count(),
      mesh={k: int(v) for k, v in partitioner.mesh.shape.items()}, task=task_name, vocab_size=vocab_size,
      train_steps=train_steps, step=int(jax.device_get(state.step)), status="running")
  metrics_lib.print_progress(
      f"{architecture} ({size}): {trainer.num_params:,} parameters, {flops:.3e} FLOPs/step, "
      f"{tokens_per_step:,} tokens/step, mesh {dict(partitioner.mesh.shape)}")

  # ---- loop ----------------------------------------------------------------------------------------
  preemption = _Preemption()
  preemption.install()
  step = int(jax.device_get(state.step))
  start_step = step
  timer = metrics_lib.StepTimer()
  timer.reset(step)
  pending: list[tuple[int, Any]] = []  # (step after update, device metrics) not yet checked on host
  last_good_checkpoint = resume_step
  last_loss = float("nan")
  steps_per_sec = 0.0
  first_step_done = False

  def nonfinite(what: str) -> errors.NonFiniteLossError:
    return errors.NonFiniteLossError(
        f"{what}. Training stopped; the last good checkpoint "
        f"({'step ' + str(last_good_checkpoint) if last_good_checkpoint is not None else 'none'}) in "
        f"{checkpointer.directory} is kept. Lower the learning rate, use float32 activations, or "
        "check the data.")

  def check(entries) -> None:
    nonlocal last_loss
    for s, m in entries:
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise nonfinite(f"The loss became {loss} at step {s}")
      last_loss = loss

  def save(s):
    nonlocal last_good_checkpoint
    if s == last_good_checkpoint:
      return  # already saved at this step (a periodic save, then preemption or stop_after_steps)
    check(pending)
    pending.clear()
    # The loss of step s was computed before its update; the update itself may have made the state
    # non-finite (which only the next step's loss would show). Never write such a state as a checkpoint.
    if not _all_finite(state):
      raise nonfinite(f"The parameters or optimizer state became non-finite at step {s} (its loss, "
                      f"{last_loss}, was still finite)")
    checkpointer.save(s, state, train_iter)
    last_good_checkpoint = s

  def evaluate(s):
    sums = {"cross_entropy_sum": 0.0, "num_tokens": 0.0, "accuracy_sum": 0.0}
    for batch in dataset("validation", True, False).take(eval_steps).as_numpy_iterator():
      out = jax.device_get(trainer.eval_step(state.params, partitioner.put_batch(batch)))
      for k in sums:
        sums[k] += float(out[k])
    n = max(sums["num_tokens"], 1.0)
    result = {"eval_neg_log_perplexity": -sums["cross_entropy_sum"] / n, "eval_accuracy": sums["accuracy_sum"] / n}
    logger.write(s, result)
    metrics_lib.print_progress(f"eval at step {s}: neg_log_perplexity {result['eval_neg_log_perplexity']:.4f}")
    return result

  final_eval = None
  if step == 0 and eval_every_steps:
    evaluate(0)  # where a fresh run starts, for comparison with later evaluations
  try:
    with contextlib.ExitStack():
      while step < train_steps:
        batch = partitioner.put_batch(next(train_iter))
        state, step_metrics = trainer.train_step(state, batch)
        step += 1
        pending.append((step, step_metrics))
        if not first_step_done:
          check(pending)
          pending.clear()
          first_step_done = True
          timer.reset(step)
          if jax.process_index() == 0:
            with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
              f.write(gin.operative_config_str())
        elif len(pending) > 1:
          check(pending[:-1])
          del pending[:-1]
        if step % log_every_steps == 0 or step == train_steps or step == start_step + 1:
          check(pending)
          pending.clear()
          host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          steps_per_sec = timer.rate(step) or steps_per_sec
          tokens_per_sec = steps_per_sec * tokens_per_step
          logger.write(step, {**host, "steps_per_sec": steps_per_sec, "tokens_per_sec": tokens_per_sec})
          metrics_lib.print_progress(metrics_lib.progress_line(step, train_steps, host["loss"], steps_per_sec,
                                                               tokens_per_sec))
        if step % checkpoint_config.save_every_steps == 0 and step < train_steps:
          save(step)
        if eval_every_steps and step % eval_every_steps == 0 and step < train_steps:
          evaluate(step)
          timer.reset(step)
        if infer and infer_eval_every_steps and step % infer_eval_every_steps == 0 and step < train_steps:
          infer(step, state.params, logger)
          timer.reset(step)
        if preemption.requested:
          save(step)
          checkpointer.wait()
          metrics_lib.update_run_record(model_dir, step=step, status="preempted")
          raise Preempted(f"SIGTERM received: checkpoint saved at step {step} in {checkpointer.directory}. "
                          "Run the same command again to resume.")
        if stop_after_steps is not None and step - start_step >= stop_after_steps and step < train_steps:
          save(step)
          checkpointer.wait()
          metrics_lib.update_run_record(model_dir, step=step, status="stopped")
          metrics_lib.print_progress(f"Stopped after {stop_after_steps} steps at step {step}; checkpoint saved.")
          return metrics_lib.read_run_record(model_dir)
      # final
      if last_good_checkpoint != step:
        save(step)
      final_eval = evaluate(step)
      if infer:
        infer(step, state.params, logger)
      checkpointer.wait()
  except errors.NonFiniteLossError:
    metrics_lib.update_run_record(model_dir, status="failed_nonfinite_loss")
    raise
  finally:
    preemption.uninstall()
    logger.flush()
    checkpointer.close()

  return metrics_lib.update_run_record(
      model_dir, step=step, status="complete", final_loss=last_loss, steps_per_sec=steps_per_sec,
      tokens_per_sec=steps_per_sec * tokens_per_step, **(final_eval or {}))


# ---- command line -------------------------------------------------------------------------------------
FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files, in order (model, size, run, mesh); later wins.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings; also written --gin.NAME=VALUE.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection "
                  "(Cloud TPU VMs, SLURM).")


def initialize_distributed() -> None:
  if FLAGS.coordinator_address:
    # CPU processes exchange collectives over gloo; accelerators use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()


def _message(e: BaseException) -> str:
  """The exception's message without the "In call to configurable 'x' (<function x at 0x...>)" lines
  that gin appends to any exception passing through a configurable."""
  return "\n".join(line for line in str(e).splitlines()
                   if not re.match(r"\s*In call to configurable '", line)).strip()


def run(argv: Sequence[str], entry: Callable[..., Any]) -> int:
  """Parses gin, runs `entry` and turns user errors into one readable line (exit status 2)."""
  del argv
  try:
    initialize_distributed()
    gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings)
    gin_utils.call_configured(entry)
  except Preempted as e:
    print(_message(e), file=sys.stderr, flush=True)
    return 128 + signal.SIGTERM
  except errors.UserError as e:
    print(f"error: {_message(e)}", file=sys.stderr, flush=True)
    return 2
  return 0


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # checkpointing libraries log every file at INFO
  sys.exit(run(argv, train))


def cli() -> None:
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))

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
  from scaling_arch import runtime_env
  runtime_env.start()  # before JAX and TensorFlow: huge-page malloc, quiet libraries (runtime_env.py)
  from scaling_arch import train as _package_module
  _package_module.cli()  # exits

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
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
from scaling_arch import model_dir_lock
from scaling_arch import models as models_lib
from scaling_arch import optimizers, partitioning  # noqa: F401  (registers configurables)
from scaling_arch import trainer as trainer_lib
from scaling_arch import registry  # noqa: F401  (registers every layer and architecture with gin)
import tasks  # before gin parses: t5 registers configurables on import

FEATURE_LENGTH_KEYS = {"inputs": ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions"),
                       "targets": ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                                   "decoder_segment_ids", "decoder_positions")}


class _Preemption:
  """SIGTERM, honoured within seconds wherever it lands.

  Once this invocation has trained a step (there is something new to save), SIGTERM is a flag that the
  loop checks after each step and each evaluation batch: it then saves and exits with 143. Before that
  (start-up, restore, the step-0 evaluation, the first compilation) there is nothing to save, and the main
  thread may sit for a minute inside a C++ compilation where no Python signal handler runs; so a watchdog
  thread, woken through `signal.set_wakeup_fd` (written by the C-level handler, whatever the main thread
  does), ends the process at once with 143, after marking run.json "preempted" if this invocation wrote it.
  """

  def __init__(self):
    self.requested = False
    self.nothing_to_save = True  # until the first step of this invocation has finished
    self.model_dir: Optional[str] = None  # set once this invocation has written run.json
    self._previous = None
    self._previous_fd = None
    self._sockets = None

  def install(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler, no watchdog
      self._previous = None
      return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    self._sockets = (reader, writer)
    threading.Thread(target=self._watch, args=(reader,), name="sigterm-watchdog", daemon=True).start()

  def _watch(self, reader) -> None:
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return  # uninstalled
      if signal.SIGTERM not in data:
        continue
      self.requested = True
      if not self.nothing_to_save:
        continue  # the training loop saves and exits
      try:
        if self.model_dir is not None:
          metrics_lib.update_run_record(self.model_dir, status="preempted")
      finally:
        print("SIGTERM received before this run trained a step: nothing new to save; exiting. Run the same "
              "command again to resume.", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)  # pylint: disable=protected-access

  def uninstall(self):
    if self._previous is not None:
      signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    if self._sockets is not None:
      self._sockets[1].close()  # the watchdog reads end-of-file and returns
      self._sockets = None


_ACTIVE_PREEMPTION: list[_Preemption] = []


def _with_preemption(fn):
  """Runs `fn` with a `_Preemption` installed from its first line to its last (see `_active_preemption`)."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    preemption = _Preemption()
    preemption.install()
    _ACTIVE_PREEMPTION.append(preemption)
    try:
      return fn(*args, **kwargs)
    finally:
      _ACTIVE_PREEMPTION.pop()
      preemption.uninstall()
  return wrapper


def _active_preemption() -> _Preemption:
  return _ACTIVE_PREEMPTION[-1] if _ACTIVE_PREEMPTION else _Preemption()


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


def write_config_once(model_dir: str) -> None:
  """Writes MODEL_DIR/config.gin, the operative configuration, unless the run already has one: it is
  written once per run (after its first step, when every configurable has been called) and never
  replaced, so it keeps describing how the run was started."""
  import tensorflow as tf
  path = os.path.join(model_dir, "config.gin")
  if jax.process_index() != 0 or tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(gin.operative_config_str())
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def completed_run(model_dir: str, train_steps: int, signature: dict) -> Optional[dict]:
  """The run record of MODEL_DIR if it holds a complete run of this configuration that reached
  `train_steps`, else None; reads only. (A complete run of another configuration is left to the
  checkpointer's refusal.)"""
  import tensorflow as tf
  record = metrics_lib.read_run_record(model_dir)
  if record.get("status") != "complete" or int(record.get("step", -1)) < train_steps:
    return None
  path = os.path.join(model_dir, "checkpoints", checkpoints_lib.SIGNATURE_FILE)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      if json.load(f) != signature:
        return None
  return record


def check_model_dir(model_dir: str) -> None:
  """Raises a ConfigError unless MODEL_DIR is a writable directory or can be created as one; writes
  nothing. Object stores (gs://...) are checked by their first write. A directory without any write
  permission bit counts as read-only even for root (who could write to it), as its owner meant."""
  if not model_dir:
    raise errors.ConfigError("MODEL_DIR is empty; set --gin.MODEL_DIR=\"'/path/to/run'\".")
  if "://" in model_dir:
    return
  path = os.path.abspath(model_dir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f"MODEL_DIR {model_dir} is a file, not a directory; give a directory path "
                             "(it is created if missing).")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.ConfigError(f"MODEL_DIR {model_dir} cannot be created: {existing} is a file.")
  if not os.access(existing, os.W_OK | os.X_OK) or not os.stat(existing).st_mode & 0o222:
    what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
    raise errors.ConfigError(f"MODEL_DIR {model_dir} {what}; give a writable directory, or fix its "
                             "permissions.")


def _disk_full(model_dir: str, checkpointer, cause: str, last_good: Optional[int]) -> errors.DiskFullError:
  """Marks the run failed (if there is room even for that) and says why in one line. The pending save
  is abandoned first, so that its own errors (the same full disk) are not raised over this one."""
  checkpointer.abandon()
  try:
    metrics_lib.update_run_record(model_dir, status="failed_disk_full")
    marked = "run.json is marked failed_disk_full"
  except Exception:  # pylint: disable=broad-except  (no room even for run.json)
    marked = "run.json could not be marked failed either"
  kept = f"step {last_good}" if last_good is not None else "none"
  return errors.DiskFullError(
      f"the disk of MODEL_DIR {model_dir} is full ({marked}; the last good checkpoint, {kept}, is kept). "
      "Free space there (or raise the quota) and rerun the same command to resume. Cause: " + cause)


EVAL_DATA_SEED = 42  # the validation batches' seed (train's default data_seed, so default runs are unchanged)


@gin.configurable(denylist=["model_dir_override"])
@_with_preemption
@model_dir_lock.releasing
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
  check_model_dir(model_dir)  # first: a MODEL_DIR that cannot be written must not cost a compilation
  checkpoint_config = checkpoint_config or checkpoints_lib.CheckpointConfig()
  for name, value in [("BATCH_SIZE", batch_size), ("TRAIN_STEPS", train_steps)]:
    if value <= 0:
      raise errors.ConfigError(f"{name} must be positive, got {value}.")
  if num_microbatches <= 0 or batch_size % num_microbatches:
    raise errors.ConfigError(f"train.num_microbatches = {num_microbatches} does not divide the batch size "
                             f"{batch_size}; use a divisor of BATCH_SIZE (1 for no gradient accumulation).")

  # ---- everything that can fail on bad input happens before anything is written -----------------------
  partitioner = partitioner_factory()
  vocabulary = tasks.get_vocabulary(spm_path, offline_vocab_size=offline_vocab_size)
  vocab_size = tasks.padded_vocab_size(vocabulary)
  task = tasks.get_task(task_name, vocabulary=vocabulary, tfds_data_dir=tfds_data_dir)
  for split in ("train", "validation"):  # an empty split would train on nothing or score -0.0 ("perfect")
    tasks.check_split_not_empty(task, split)
  model = models_lib.EncoderDecoderModel(module_factory(vocab_size=vocab_size))
  lr_fn = learning_rate_fn()
  trainer = trainer_lib.Trainer(model, partitioner, optimizer=optimizer_factory(lr_fn), learning_rate_fn=lr_fn,
                                batch_shapes=batch_shapes(feature_lengths, batch_size, pack),
                                num_microbatches=num_microbatches, seed=seed)
  signature = checkpoints_lib.model_signature(
      architecture, trainer.param_shapes,
      {"vocab_size": vocab_size, "model_config": model_config_lines(), "task": task_name,
       # a resume must see the batches the run was started with (not part of PARAMETER_SIGNATURE_KEYS:
       # fine-tuning from INITIAL_CHECKPOINT may change them)
       "batch_size": batch_size, "feature_lengths": {k: int(v) for k, v in feature_lengths.items()}})
  finished = completed_run(model_dir, train_steps, signature)
  if finished is not None:  # results are immutable once complete: report them and write nothing
    metrics_lib.print_progress(
        f"The run in {model_dir} is complete (step {finished['step']}/{train_steps}, final loss "
        f"{finished.get('final_loss', '?')}); nothing to do, nothing written. To train further, "
        "raise TRAIN_STEPS; for a new run, use a new MODEL_DIR.")
    return finished
  checkpointer = checkpoints_lib.Checkpointer(model_dir, checkpoint_config, signature)
  resume_step = checkpointer.check_compatible()  # MODEL_DIR's own run (same model and task) wins
  if resume_step is None and initial_checkpoint:
    # Prefixes of longer position-indexed parameters are cut for parameters only, not optimizer state.
    checkpoints_lib.check_initial_checkpoint(initial_checkpoint, signature,
                                             position_dims=None if restore_optimizer_state else trainer.position_dims)
  elif resume_step is None and require_initial_checkpoint:
    raise errors.ConfigError("INITIAL_CHECKPOINT is not set: this run starts from a pretrained checkpoint (a "
                             "step directory such as PRETRAIN_MODEL_DIR/checkpoints/524288); set "
                             "--gin.INITIAL_CHECKPOINT, or train.require_initial_checkpoint=False.")
  infer = None
  if inference_evaluator is not None:
    infer = inference_evaluator(trainer=trainer, task=task, vocabulary=vocabulary,
                                feature_lengths=feature_lengths, model_dir=model_dir)

  def dataset(split, repeat, shuffle_split, seed=data_seed):
    return tasks.get_dataset(task, split=split, feature_lengths=feature_lengths, global_batch_size=batch_size,
                             seed=seed, shuffle=shuffle_split, repeat=repeat, pack=pack,
                             process_index=jax.process_index(), process_count=jax.process_count())

  train_ds = dataset("train", True, shuffle)
  train_iter = iter(train_ds)

  # ---- state: resume, initialize from a checkpoint, or start fresh --------------------------------
  if jax.process_index() == 0:
    model_dir_lock.acquire(model_dir)  # one trainer per MODEL_DIR, before the first write (below)
  # The latest intact step (verified against its digest, finite, with its input position); damaged
  # steps are skipped and renamed aside, with one line; none intact: CheckpointDamagedError.
  resume_step, state, note = checkpointer.prepare_restore(trainer.abstract_state, train_iter)
  if note:
    metrics_lib.print_progress(note)
  if resume_step is not None:
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
      prefixes = checkpoints_lib.prefix_parameters(initial_checkpoint, signature, trainer.position_dims)
      params = checkpoints_lib.restore_params(initial_checkpoint, trainer.abstract_state.params, prefixes)
      state = trainer.state_from_params(params)
      how = "parameters only; fresh optimizer state"
      if prefixes:
        how += (f"; {len(prefixes)} position-indexed parameters cut to this run's lengths, e.g. "
                f"{next(iter(prefixes))} {next(iter(prefixes.values()))} -> "
                f"{signature['param_shapes'][next(iter(prefixes))]}")
    metrics_lib.print_progress(f"Initialized from INITIAL_CHECKPOINT {initial_checkpoint} ({how}).")
  else:
    state = trainer.init_state()
    metrics_lib.print_progress(f"No checkpoint in {model_dir} and no INITIAL_CHECKPOINT: training from "
                               "scratch.")

  # ---- outputs -------------------------------------------------------------------------------------
  import tensorflow as tf
  tf.io.gfile.makedirs(model_dir)  # config.gin: written once per run, after its first step (the operative one)
  logger = metrics_lib.MetricsLogger(model_dir)
  tokens_per_step = int(batch_size * (feature_lengths["inputs"] + feature_lengths["targets"]))
  flops = trainer.flops_per_step()
  record = metrics_lib.update_run_record(
      model_dir, architecture=architecture, size=size, config_hash=config_hash(), num_params=trainer.num_params,
      flops_per_step=flops, tokens_per_step=tokens_per_step, target_tokens_per_step=batch_size *
      feature_lengths["targets"], batch_size=batch_size, feature_lengths=dict(feature_lengths),
      devices=jax.device_count(), device_kind=jax.devices()[0].device_kind, processes=jax.process_count(),
      mesh={k: int(v) for k, v in partitioner.mesh.shape.items()}, task=task_name, vocab_size=vocab_size,
      train_steps=train_steps, step=int(jax.device_get(state.step)), status="running",
      # tokens_per_step is row capacity; with input_alignment > 1 (Funnel) each packed example's inputs are
      # padded to that multiple first, so fewer real input tokens fill a row (tasks/data.py).
      pack=bool(pack), input_alignment=tasks.data.input_alignment())
  preemption = _active_preemption()
  preemption.model_dir = model_dir  # a SIGTERM before the first step marks the record "preempted"
  if infer is not None and hasattr(infer, "should_stop"):
    infer.should_stop = lambda: preemption.requested  # a decoding evaluation stops within one batch
  metrics_lib.print_progress(
      f"{architecture} ({size}): {trainer.num_params:,} parameters, {flops:.3e} FLOPs/step, "
      f"{tokens_per_step:,} tokens/step, mesh {dict(partitioner.mesh.shape)}")

  # ---- loop ----------------------------------------------------------------------------------------
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
    digest, finite = checkpoints_lib.state_digest(state)  # one pass: the checksums and the finiteness
    if not finite:
      raise nonfinite(f"The parameters or optimizer state became non-finite at step {s} (its loss, "
                      f"{last_loss}, was still finite)")
    checkpointer.save(s, state, train_iter, digest=digest)
    last_good_checkpoint = s

  def evaluate(s):
    """Logs and returns the validation metrics at step s; None if SIGTERM interrupted it."""
    sums = {"cross_entropy_sum": 0.0, "num_tokens": 0.0, "accuracy_sum": 0.0}
    for batch in eval_ds.as_numpy_iterator():  # each pass reads the same batches (fixed seed, no shuffle)
      if preemption.requested:
        return None  # the caller saves and exits; a partial evaluation is not logged
      out = jax.device_get(trainer.eval_step(state.params, partitioner.put_batch(batch)))
      for k in sums:
        sums[k] += float(out[k])
    if sums["num_tokens"] <= 0:  # never report a -0.0 ("perfect") score for no data
      metrics_lib.update_run_record(model_dir, status="failed")
      raise errors.DataError(f"The 'validation' split of task {tasks.data.base_task_name(task.name)} gave no "
                             f"full batch of {batch_size} rows to evaluate at step {s}; give it more text.")
    n = sums["num_tokens"]
    result = {"eval_neg_log_perplexity": -sums["cross_entropy_sum"] / n, "eval_accuracy": sums["accuracy_sum"] / n}
    logger.write(s, result)
    metrics_lib.print_progress(f"eval at step {s}: neg_log_perplexity {result['eval_neg_log_perplexity']:.4f}")
    return result

  # Built once, during start-up (where SIGTERM exits at once): building the pipeline takes seconds.
  # The same evaluation batches (and span-corruption noise) whatever data_seed orders the training data,
  # so seed replicates of a point are compared on one validation set.
  eval_ds = dataset("validation", True, False, EVAL_DATA_SEED).take(eval_steps)
  final_eval = None
  if step == 0 and eval_every_steps:
    evaluate(0)  # where a fresh run starts, for comparison with later evaluations
  elif step != 0:  # compile the evaluation now, where SIGTERM exits at once, not in the middle of training
    local_rows = batch_size // jax.process_count()
    zeros = {k: np.zeros((local_rows,) + tuple(shape[1:]), np.int32) for k, shape in trainer.batch_shapes.items()}
    jax.block_until_ready(trainer.eval_step(state.params, partitioner.put_batch(zeros)))
  checkpoints_lib.state_digest(state)  # compiles the check that every save runs, so a preemption save does not wait for it
  try:
    with contextlib.ExitStack():
      while step < train_steps:
        try:
          batch = partitioner.put_batch(next(train_iter))
        except StopIteration:
          raise errors.DataError(f"The 'train' split of task {tasks.data.base_task_name(task.name)} ran out of "
                                 f"examples at step {step}; give it more text.") from None
        state, step_metrics = trainer.train_step(state, batch)
        step += 1
        pending.append((step, step_metrics))
        if not first_step_done:
          check(pending)
          pending.clear()
          first_step_done = True
          preemption.nothing_to_save = False  # from now on SIGTERM saves this invocation's steps
          timer.reset(step)
          write_config_once(model_dir)
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
          metrics_lib.update_run_record(model_dir, step=step)  # `launch status` shows the live step
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
      if preemption.requested:  # during the final evaluation; the final checkpoint is written
        checkpointer.wait()
        metrics_lib.update_run_record(model_dir, step=step, status="preempted")
        raise Preempted(f"SIGTERM received during the final evaluation: checkpoint saved at step {step} in "
                        f"{checkpointer.directory}. Run the same command again to evaluate and complete.")
      if infer:
        infer(step, state.params, logger)
        if preemption.requested:  # during the final decoding evaluation; the final checkpoint is written
          checkpointer.wait()
          metrics_lib.update_run_record(model_dir, step=step, status="preempted")
          raise Preempted(f"SIGTERM received during the final inference evaluation: checkpoint saved at step "
                          f"{step} in {checkpointer.directory}. Run the same command again to evaluate and "
                          "complete.")
      checkpointer.wait()
  except errors.NonFiniteLossError:
    metrics_lib.update_run_record(model_dir, status="failed_nonfinite_loss")
    raise
  except errors.DataError:
    metrics_lib.update_run_record(model_dir, status="failed")
    raise
  except Exception as e:  # pylint: disable=broad-except
    cause = checkpoints_lib.disk_full_cause(e)
    if cause is None:
      raise
    raise _disk_full(model_dir, checkpointer, cause, last_good_checkpoint) from None
  finally:
    logger.flush()
    checkpointer.close()

  return metrics_lib.update_run_record(
      model_dir, step=step, status="complete", final_loss=last_loss, steps_per_sec=steps_per_sec,
      tokens_per_sec=steps_per_sec * tokens_per_step, **(final_eval or {}))


# ---- command line -------------------------------------------------------------------------------------
from scaling_arch import runtime_env  # noqa: E402  (defines --malloc_hugepages; start-up settings)

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
  runtime_env.initialize_backends()  # now, so probes of absent platforms stay quiet (runtime_env.py)


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
    gin_utils.check_macros_referenced(FLAGS.gin_bindings)  # `--gin.TRAIN_STEPZ=5` is a typo, not a no-op
    gin_utils.call_configured(entry)
  except Preempted as e:
    print(_message(e), file=sys.stderr, flush=True)
    _EXIT_AT_ONCE.append(128 + signal.SIGTERM)  # saved and flushed; interpreter shutdown took ~8 s
    return 128 + signal.SIGTERM
  except errors.UserError as e:
    print(f"error: {_message(e)}", file=sys.stderr, flush=True)
    if isinstance(e, errors.DiskFullError):
      _EXIT_AT_ONCE.append(2)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    cause = checkpoints_lib.disk_full_cause(e)  # a full disk outside the training loop's own handling
    if cause is None:
      raise
    print(f"error: the disk is full: {cause}. Free space there (or raise the quota) and rerun the same "
          "command to resume.", file=sys.stderr, flush=True)
    _EXIT_AT_ONCE.append(2)
    return 2
  return 0


# Set after a full disk: orbax's abandoned writes would print tracebacks at interpreter shutdown, after
# the error line; the CLI exits without that shutdown.
_EXIT_AT_ONCE: list[int] = []


def run_command(argv: Sequence[str]) -> tuple[int, bool]:
  """The command line once absl has parsed its flags (also each stage of a launch.worker): quiet
  libraries unless verbose, then `run`. Returns (exit status, whether to exit at once)."""
  if not (FLAGS["verbosity"].present or runtime_env.verbose()):
    logging.set_verbosity(logging.WARNING)  # checkpointing libraries log every file at INFO
  del _EXIT_AT_ONCE[:]
  status = run(argv, train)
  return status, bool(_EXIT_AT_ONCE)


def main(argv):
  status, exit_at_once = run_command(argv)
  if exit_at_once:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def cli() -> None:
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))

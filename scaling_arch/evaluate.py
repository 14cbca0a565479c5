r"""Inference evaluation: decode each task's validation split, score it with the task's own metrics.

Two ways in:
- During fine-tuning: `train.inference_evaluator = @evaluate.InferenceEvaluator` and
  `train.infer_eval_every_steps = N` (gin/runs/finetune.gin) evaluate every N steps and at the end.
- For a checkpoint: the gin files of the run, then gin/runs/eval.gin:

    python -m scaling_arch.evaluate --gin_file=gin/models/vanilla.gin --gin_file=gin/sizes/base.gin \
      --gin_file=gin/runs/finetune.gin --gin_file=gin/runs/eval.gin --gin.MODEL_DIR="'/runs/ft'" \
      --gin.CHECKPOINT_PATH="'/runs/ft/checkpoints/100000'"

  (or, for a local MODEL_DIR, `--gin_file=MODEL_DIR/config.gin --gin_file=gin/runs/eval.gin ...`: the run's
  own configuration).

Each evaluation writes, under MODEL_DIR: per-task metrics (`infer/<task>/<metric>`) and the averages
(`downstream/...`) to TensorBoard and `metrics.jsonl`; the predictions to
`inference_eval/<task>-<step>.jsonl` (inputs, target, prediction); and to `run.json` the per-task
metrics and scores, the GLUE and SuperGLUE averages, SQuAD EM / F1 and the downstream score
(scaling_arch/downstream.py defines them).
"""

from __future__ import annotations

if __name__ == "__main__":
  # As in train.py: run the CLI from the package module, so gin configurables are registered once.
  from scaling_arch import runtime_env
  runtime_env.start()  # before JAX and TensorFlow: huge-page malloc, quiet libraries (runtime_env.py)
  from scaling_arch import evaluate as _package_module
  _package_module.cli()  # exits

import functools
import inspect
import json
import math
import os
import sys
from typing import Any, Callable, Optional

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags, logging

from scaling_arch import checkpoints as checkpoints_lib
from scaling_arch import decoding, downstream, errors, gin_utils
from scaling_arch import metrics as metrics_lib
from scaling_arch import models as models_lib
import tasks
from tasks import finetuning

PREDICTIONS_DIR = "inference_eval"
SUMMARY_KEYS = ("glue_average", "super_glue_average", "squad_em", "squad_f1", "squad_score",
                "offline_score", "downstream_score")


class _Interrupted(Exception):
  """Raised inside seqio's evaluation when `InferenceEvaluator.should_stop()` turns true."""


@gin.configurable
class InferenceEvaluator:
  """Decodes a task's (or each task of a mixture's) evaluation split and computes its metrics.

  Attributes:
    batch_size: rows decoded at once (a multiple of the data-parallel devices); the last batch is padded.
    split: the split to evaluate ('validation').
    num_examples: evaluate only the first this many examples of each task (None: all of them).
    decoder_factory: returns the decoding function (decoding.decoder: greedy by default, or beam search).
    write_predictions: write MODEL_DIR/inference_eval/<task>-<step>.jsonl.
  """

  def __init__(self, *, trainer, task, vocabulary, feature_lengths: dict, model_dir: str,
               batch_size: int = 32, split: str = "validation", num_examples: Optional[int] = None,
               decoder_factory: Callable = decoding.decoder, write_predictions: bool = True):
    partitioner = trainer.partitioner
    multiple = math.lcm(partitioner.data_parallel_size, jax.process_count())
    if batch_size <= 0 or batch_size % multiple:
      raise errors.ConfigError(
          f"InferenceEvaluator.batch_size {batch_size} must be a positive multiple of {multiple} (the "
          "data-parallel devices and the processes).")
    self.trainer, self.model_dir, self.batch_size = trainer, model_dir, batch_size
    # Checked before each decoding batch: the trainer sets it to "SIGTERM received", so a preemption stops
    # the evaluation within one batch (nothing of it is recorded) instead of after the whole of it.
    self.should_stop: Callable[[], bool] = lambda: False
    log_dir = os.path.join(model_dir, PREDICTIONS_DIR)
    try:
      self.evaluator = seqio.Evaluator(
          task.name, feature_converter=seqio.EncDecFeatureConverter(pack=False), eval_split=split,
          sequence_length=dict(feature_lengths), num_examples=num_examples, use_memory_cache=True,
          async_compute_metrics=False, logger_cls=[PredictionsLogger] if write_predictions else [],
          log_dir=log_dir)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
      failed = next((t for t in seqio.get_subtasks(task) if isinstance(t.source, seqio.TfdsDataSource)), None)
      if failed is None:
        raise
      raise finetuning.missing_dataset_error(failed, e) from e
    decode = functools.partial(decoder_factory(), trainer.model, max_length=feature_lengths["targets"],
                               eos_id=vocabulary.eos_id, vocab_size=vocabulary.vocab_size)
    self._decode = jax.jit(lambda params, tokens: decode(params, tokens)[0],
                           in_shardings=(trainer.param_shardings, partitioner.batch_sharding),
                           out_shardings=partitioner.replicated)

  def predict(self, params, dataset: tf.data.Dataset) -> list[tuple[int, np.ndarray]]:
    """seqio's predict_fn: (index, output tokens) for each example of an enumerated model dataset."""
    out = []
    count, index = jax.process_count(), jax.process_index()
    local = self.batch_size // count
    for ids, features in dataset.batch(self.batch_size).as_numpy_iterator():
      if self.should_stop():
        raise _Interrupted()
      tokens = features["encoder_input_tokens"]
      padded = np.zeros((self.batch_size,) + tokens.shape[1:], np.int32)
      padded[:len(tokens)] = tokens
      batch = self.trainer.partitioner.put_batch({"tokens": padded[index * local:(index + 1) * local]})
      with self.trainer.mesh_context():
        decoded = np.asarray(jax.device_get(self._decode(params, batch["tokens"])))
      out += list(zip(ids.tolist(), decoded[:len(tokens)]))
    return out

  def __call__(self, step: int, params, logger: Optional[metrics_lib.MetricsLogger] = None) -> dict:
    """Evaluates `params` (the model's, placed as the trainer places them) at `step`; logs the
    metrics, updates run.json and returns {'task_metrics': {task: {metric: value}}, **scores}."""
    if not self.evaluator.eval_tasks:
      metrics_lib.print_progress(f"inference eval at step {step}: no task with an evaluation split and metrics.")
      return {"task_metrics": {}}
    try:
      future, _ = self.evaluator.evaluate(compute_metrics=True, step=int(step),
                                          predict_fn=functools.partial(self.predict, params))
    except _Interrupted:
      metrics_lib.print_progress(f"inference eval at step {step}: stopped by SIGTERM; nothing recorded.")
      return {"task_metrics": {}, "interrupted": True}
    task_metrics = {finetuning.base_name(name): {k: _number(v) for k, v in values.items()}
                    for name, values in sorted(future.result().items())}
    scores = downstream.downstream_score(task_metrics)
    scalars = {f"infer/{task}/{metric}": value for task, values in task_metrics.items()
               for metric, value in values.items()}
    scalars.update({f"downstream/{k}": scores[k] for k in SUMMARY_KEYS if k in scores})
    scalars.update({f"downstream/task/{k}": v for k, v in scores["task_scores"].items()})
    if logger is not None:
      logger.write(step, scalars)
      logger.flush()
    # Every key is written, so no value of an earlier evaluation survives that this one lacks.
    metrics_lib.update_run_record(self.model_dir, downstream_step=int(step), task_metrics=task_metrics,
                                  task_scores=scores["task_scores"], missing=scores.get("missing", []),
                                  **{k: scores.get(k) for k in SUMMARY_KEYS})
    metrics_lib.print_progress(summary_line(step, task_metrics, scores))
    return {"task_metrics": task_metrics, **scores}


def _number(value):
  """A metric as a float; an undefined one (NaN) as the string 'nan', as metrics.jsonl writes it."""
  value = float(value)
  return value if math.isfinite(value) else str(value)


def summary_line(step: int, task_metrics: dict, scores: dict) -> str:
  """One progress line: the averages when there are, else each task's score."""
  parts = [f"{name} {scores[key]:.2f}" for key, name in
           (("glue_average", "GLUE"), ("super_glue_average", "SuperGLUE"), ("squad_em", "SQuAD EM"),
            ("squad_f1", "SQuAD F1"), ("downstream_score", "downstream")) if key in scores]
  if not parts:
    parts = [f"{task} {downstream.task_score(values):.2f}" for task, values in task_metrics.items()]
  return f"inference eval at step {step} ({len(task_metrics)} tasks): " + ", ".join(parts)


class PredictionsLogger(seqio.Logger):
  """Writes each task's predictions to <output_dir>/<task>-<step>.jsonl: inputs, target, prediction."""

  def __call__(self, task_name, step, metrics, dataset, inferences, targets) -> None:
    del metrics
    if jax.process_index() != 0 or not inferences or targets is None or dataset is None:
      return
    tf.io.gfile.makedirs(self.output_dir)
    path = os.path.join(self.output_dir, f"{finetuning.base_name(task_name)}-{step}.jsonl")
    predictions = inferences.get("prediction", [None] * len(targets))
    outputs = inferences.get("output", [None] * len(targets))
    with tf.io.gfile.GFile(path, "w") as f:
      for example, target, prediction, output in zip(tfds.as_numpy(dataset), targets, predictions, outputs):
        record = {"inputs": example.get("inputs_pretokenized"), "target": target, "prediction": prediction,
                  "output": output}
        f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(value):
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  if isinstance(value, (tuple, set)):
    return list(value)
  return str(value)


# ---- evaluating a checkpoint ------------------------------------------------------------------------
def _train_settings() -> dict[str, Any]:
  """train()'s arguments as the parsed gin files bind them (its defaults otherwise)."""
  from scaling_arch import train as train_lib
  settings = {name: p.default for name, p in inspect.signature(train_lib.train).parameters.items()}
  settings.update(gin.get_bindings("train"))
  for name in ("model_dir", "architecture", "module_factory", "task_name", "feature_lengths"):
    if settings.get(name) is gin.REQUIRED or settings.get(name) is None:
      raise errors.ConfigError(f"train.{name} is not bound: pass the run's gin files (model, size, run) "
                               "before gin/runs/eval.gin.")
  return settings


@gin.configurable
def evaluate(*, checkpoint_path: str = gin.REQUIRED, partitioner_factory: Optional[Callable] = None) -> dict:
  """Evaluates the checkpoint `checkpoint_path` (a step directory, MODEL_DIR/checkpoints/<step>) with
  inference evaluation on the run's task; writes into MODEL_DIR and returns the evaluator's result.

  The model, task, vocabulary, lengths and mesh are those the gin files bind for train(); the
  evaluator is train.inference_evaluator when bound, else InferenceEvaluator.
  """
  from scaling_arch import train as train_lib
  if not checkpoint_path:
    raise errors.ConfigError("CHECKPOINT_PATH is not set: give the step directory to evaluate, e.g. "
                             "--gin.CHECKPOINT_PATH=\"'MODEL_DIR/checkpoints/100000'\".")
  s = _train_settings()
  partitioner = (partitioner_factory or s["partitioner_factory"])()
  vocabulary = tasks.get_vocabulary(s["spm_path"], offline_vocab_size=s["offline_vocab_size"])
  vocab_size = tasks.padded_vocab_size(vocabulary)
  task = tasks.get_task(s["task_name"], vocabulary=vocabulary, tfds_data_dir=s["tfds_data_dir"])
  model = models_lib.EncoderDecoderModel(s["module_factory"](vocab_size=vocab_size))
  lr_fn = s["learning_rate_fn"]()
  from scaling_arch import trainer as trainer_lib
  batch = max(partitioner.data_parallel_size, 1)
  trainer = trainer_lib.Trainer(model, partitioner, optimizer=s["optimizer_factory"](lr_fn), learning_rate_fn=lr_fn,
                                batch_shapes=train_lib.batch_shapes(s["feature_lengths"], batch))
  signature = checkpoints_lib.model_signature(s["architecture"], trainer.param_shapes, {"vocab_size": vocab_size})
  checkpoints_lib.check_initial_checkpoint(checkpoint_path, signature, what="CHECKPOINT_PATH")
  step_name = os.path.basename(checkpoint_path.rstrip("/"))
  step = int(step_name) if step_name.isdigit() else 0
  evaluator = (s["inference_evaluator"] or InferenceEvaluator)(
      trainer=trainer, task=task, vocabulary=vocabulary, feature_lengths=s["feature_lengths"],
      model_dir=s["model_dir"])
  params = checkpoints_lib.restore_params(checkpoint_path, trainer.abstract_state.params)
  metrics_lib.print_progress(f"Evaluating {checkpoint_path} (step {step}) on {s['task_name']}; results go to "
                             f"{s['model_dir']}.")
  tf.io.gfile.makedirs(s["model_dir"])
  logger = metrics_lib.MetricsLogger(s["model_dir"])
  try:
    return evaluator(step, params, logger)
  finally:
    logger.close()


# ---- command line -------------------------------------------------------------------------------------
def main(argv):
  from scaling_arch import runtime_env, train as train_lib
  if not (flags.FLAGS["verbosity"].present or runtime_env.verbose()):
    logging.set_verbosity(logging.WARNING)
  sys.exit(train_lib.run(argv, evaluate))


def cli() -> None:
  from scaling_arch import train as train_lib  # noqa: F401  (defines the --gin_file / --gin flags)
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))

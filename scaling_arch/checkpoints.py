"""Checkpoints (orbax) and the restore policy, said out loud.

Policy, in order:
1. MODEL_DIR has a checkpoint written by the same model configuration and task (the signature): resume
   from its latest step (train state and input position).
2. Otherwise, if INITIAL_CHECKPOINT is given: initialize from it (parameters only by default, the
   optimizer state too when asked), starting at step 0. Its run's signature.json must agree on the
   architecture, vocabulary size and parameter shapes (`check_initial_checkpoint`), else a one-line error.
3. Otherwise: from scratch.
A MODEL_DIR whose checkpoint came from a different configuration is refused (nothing is written).

Layout of MODEL_DIR: `checkpoints/<step>/state` (orbax), `checkpoints/signature.json` (what model wrote
them), `data_state/<step>/process_<i>-of-<n>*` (the tf.data iterator, so input order survives a restart).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import gin
import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

from scaling_arch import errors

SIGNATURE_FILE = "signature.json"


def model_signature(architecture: str, param_shapes, extra: Optional[dict] = None) -> dict:
  """What identifies the model a checkpoint belongs to: architecture and every parameter's shape."""
  flat = jax.tree_util.tree_flatten_with_path(param_shapes)[0]
  shapes = {jax.tree_util.keystr(p): list(x.shape) for p, x in flat}
  return {"architecture": architecture, "param_shapes": shapes, **(extra or {})}


def describe_difference(saved: dict, current: dict) -> str:
  if saved.get("architecture") != current.get("architecture"):
    return f"architecture {saved.get('architecture')!r} there, {current.get('architecture')!r} now"
  a, b = saved.get("param_shapes", {}), current.get("param_shapes", {})
  for name in sorted(set(a) | set(b)):
    if a.get(name) != b.get(name):
      return f"parameter {name}: shape {a.get(name)} there, {b.get(name)} now"
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      return f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now"
  return "no difference"


@gin.configurable
class CheckpointConfig:
  """How often to checkpoint and how many to keep (the final step is always saved)."""

  def __init__(self, save_every_steps: int = 1000, keep: int = 3, async_save: bool = True):
    self.save_every_steps = save_every_steps
    self.keep = keep
    self.async_save = async_save


class Checkpointer:
  """Saves and restores the train state and the data iterator under MODEL_DIR/checkpoints."""

  def __init__(self, model_dir: str, config: CheckpointConfig, signature: dict):
    self.model_dir = model_dir
    self.directory = os.path.join(model_dir, "checkpoints")
    self.config = config
    self.signature = signature
    self._manager: Optional[ocp.CheckpointManager] = None

  # -- inspection (read-only: safe before anything is written) -------------------------------------------
  def existing_steps(self) -> list[int]:
    if not tf.io.gfile.isdir(self.directory):
      return []
    steps = []
    for name in tf.io.gfile.listdir(self.directory):
      name = name.rstrip("/")
      if name.isdigit() and tf.io.gfile.exists(os.path.join(self.directory, name, "_CHECKPOINT_METADATA")):
        steps.append(int(name))
    return sorted(steps)

  def check_compatible(self) -> Optional[int]:
    """The latest step to resume from, None if there is none; raises if it is another config's."""
    steps = self.existing_steps()
    if not steps:
      return None
    path = os.path.join(self.directory, SIGNATURE_FILE)
    if not tf.io.gfile.exists(path):
      raise errors.CheckpointMismatchError(
          f"MODEL_DIR {self.model_dir} holds checkpoints {steps} but no {SIGNATURE_FILE}, so it cannot be "
          "told whether they belong to this configuration. Use a new MODEL_DIR.")
    with tf.io.gfile.GFile(path) as f:
      saved = json.load(f)
    if saved != self.signature:
      raise errors.CheckpointMismatchError(
          f"MODEL_DIR {self.model_dir} holds a checkpoint (step {steps[-1]}) of a different configuration "
          f"({describe_difference(saved, self.signature)}). Nothing was changed. Use a new MODEL_DIR for "
          "this configuration, or rerun with the configuration that wrote it.")
    return steps[-1]

  # -- writing ---------------------------------------------------------------------------------------
  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      options = ocp.CheckpointManagerOptions(max_to_keep=self.config.keep, create=True,
                                             enable_async_checkpointing=self.config.async_save)
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state",))
    return self._manager

  def save(self, step: int, state, data_iterator=None) -> None:
    if jax.process_index() == 0:
      path = os.path.join(self.directory, SIGNATURE_FILE)
      if not tf.io.gfile.exists(path):
        tf.io.gfile.makedirs(self.directory)
        with tf.io.gfile.GFile(path, "w") as f:
          json.dump(self.signature, f, indent=1, sort_keys=True)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    if data_iterator is not None:
      prefix = self._data_prefix(step)
      tf.io.gfile.makedirs(os.path.dirname(prefix))
      tf.train.Checkpoint(iterator=data_iterator).write(prefix)
    self._prune_data_states()

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None

  # -- restoring -------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, data_iterator=None):
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    state = restored["state"]
    if data_iterator is not None:
      prefix = self._data_prefix(step)
      if tf.io.gfile.exists(prefix + ".index"):
        tf.train.Checkpoint(iterator=data_iterator).read(prefix).assert_consumed()
      else:
        logging.warning("No data iterator state for step %d: the input pipeline restarts from its "
                        "beginning.", step)
    return state

  def _data_prefix(self, step: int) -> str:
    return os.path.join(self.model_dir, "data_state", str(step),
                        f"process_{jax.process_index()}-of-{jax.process_count()}")

  def _prune_data_states(self) -> None:
    root = os.path.join(self.model_dir, "data_state")
    if jax.process_index() != 0 or not tf.io.gfile.isdir(root):
      return
    self.wait()
    keep = set(self.manager.all_steps())
    for name in tf.io.gfile.listdir(root):
      name = name.rstrip("/")
      if name.isdigit() and int(name) not in keep and keep:
        # Only prune states older than every kept checkpoint (a newer one may be mid-save).
        if int(name) < min(keep):
          tf.io.gfile.rmtree(os.path.join(root, name))


# What must agree for a checkpoint's parameters to initialize a model (dropout, activation dtype, remat
# and the task may differ: fine-tuning changes them).
PARAMETER_SIGNATURE_KEYS = ("architecture", "vocab_size", "param_shapes")


def check_initial_checkpoint(checkpoint_path: str, signature: dict, what: str = "INITIAL_CHECKPOINT") -> None:
  """Raises a one-line error unless `checkpoint_path` (a step directory, MODEL_DIR/checkpoints/<step>)
  holds parameters this model can load: the same architecture, vocabulary size and parameter shapes,
  according to the signature.json its run wrote (a checkpoint without one is checked at restore)."""
  step_dir = checkpoint_path.rstrip("/")
  if not tf.io.gfile.exists(os.path.join(step_dir, "state")):
    raise errors.UserError(
        f"{what} {checkpoint_path} is not a checkpoint of this codebase (no 'state' item); give a step "
        "directory such as MODEL_DIR/checkpoints/1000.")
  path = os.path.join(os.path.dirname(step_dir), SIGNATURE_FILE)
  if not tf.io.gfile.exists(path):
    logging.warning("%s has no %s next to it; its parameters are checked when restored.", checkpoint_path,
                    SIGNATURE_FILE)
    return
  with tf.io.gfile.GFile(path) as f:
    saved = json.load(f)
  saved = {k: saved.get(k) for k in PARAMETER_SIGNATURE_KEYS}
  current = {k: signature.get(k) for k in PARAMETER_SIGNATURE_KEYS}
  if saved != current:
    raise errors.CheckpointMismatchError(
        f"{what} {checkpoint_path} was written by a different model ({describe_difference(saved, current)}); "
        "its parameters cannot initialize this one. Use the architecture and size (gin/models, gin/sizes, "
        "depth/width overrides) and the vocabulary it was trained with.")


def restore_params(checkpoint_path: str, abstract_params) -> Any:
  """Parameters only, from a checkpoint step directory (`.../checkpoints/<step>`) written by this
  codebase, placed with the shardings of `abstract_params`."""
  state_dir = os.path.join(checkpoint_path, "state")
  if not tf.io.gfile.exists(state_dir):
    raise errors.UserError(
        f"INITIAL_CHECKPOINT {checkpoint_path} has no 'state' item; give a step directory such as "
        "MODEL_DIR/checkpoints/1000.")
  checkpointer = ocp.PyTreeCheckpointer()
  target = {"params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.CheckpointMismatchError(
        f"Checkpoint {checkpoint_path} does not hold parameters of this model's shapes "
        f"(different architecture or size?): {first_line}") from None
  return restored["params"]

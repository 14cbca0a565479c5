"""Checkpoints (orbax) and the restore policy, said out loud.

Policy, in order:
1. MODEL_DIR has a checkpoint written by the same model configuration and task (the signature): resume
   from its latest intact step (train state and input position; see "Verified restore" below).
2. Otherwise, if INITIAL_CHECKPOINT is given: initialize from it (parameters only by default, the
   optimizer state too when asked), starting at step 0. Its run's signature.json must agree on the
   architecture, vocabulary size and parameter shapes (`check_initial_checkpoint`), else a one-line error.
3. Otherwise: from scratch.
A MODEL_DIR whose checkpoint came from a different configuration is refused (nothing is written).

Layout of MODEL_DIR: `checkpoints/<step>/state` (orbax), `checkpoints/signature.json` (what model wrote
them), `data_state/<step>/process_<i>-of-<n>*` (the tf.data iterator, so input order survives a restart).

Verified restore. A step is one unit: the train state and the input position. Each save records, in the
step's own `_CHECKPOINT_METADATA` (which orbax writes when it finalizes the step, so the record exists
exactly when the step is complete), a digest: a checksum of every array of the state as it was in memory,
the SHA-256 of this process's data_state files, and the SHA-256 of the signature. Restore tries the
latest step first and accepts it only if the state restores, matches its digest and is finite, and its
data state is there, matches and restores. A step that fails is skipped for the previous one; once a good
step is found, every skipped step (and any step folder that orbax never finalized) is renamed aside to
`<step>.skipped-<UTC time>` (orbax recognizes only all-digit step folders, so it ignores them and a later
save of that step does not collide), with one printed line saying what and why. Nothing is deleted. No
intact step at all: one error, and nothing is changed.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
from typing import Any, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

from scaling_arch import errors

SIGNATURE_FILE = "signature.json"
DIGEST_KEY = "scaling_arch_digest"  # in custom_metadata of each step's _CHECKPOINT_METADATA
SKIPPED_SUFFIX = ".skipped-"  # + UTC time; orbax lists only all-digit step folders, so it ignores these


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


def signature_hash(signature: dict) -> str:
  return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


# ---- digests: what a step held when it was saved ---------------------------------------------------------
def _leaf_checksum(x) -> jax.Array:
  """Two position-weighted sums (mod 2**32) of the array's bits: any single changed bit changes both
  (the weights are odd), and a swap of two elements changes them too. Independent of sharding."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize >= 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing dimension of 2
  else:
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  w1 = index * jnp.uint32(2) + jnp.uint32(1)
  w2 = (index * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
  return jnp.stack([jnp.sum(bits * w1, dtype=jnp.uint32), jnp.sum((bits ^ (bits >> 7)) * w2, dtype=jnp.uint32)])


@jax.jit
def _checksums_and_finite(tree):
  leaves = jax.tree.leaves(tree)
  finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  return [_leaf_checksum(x) for x in leaves], (jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True))


def state_digest(state) -> tuple[dict[str, str], bool]:
  """({array path: checksum}, whether every floating-point array is finite) of a (sharded) train state."""
  sums, finite = jax.device_get(_checksums_and_finite(state))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  return {p: "%08x%08x" % tuple(int(v) for v in s) for p, s in zip(paths, sums)}, bool(finite)


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


# ---- disk full ---------------------------------------------------------------------------------------------
_DISK_FULL_PHRASES = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")


def disk_full_cause(exc: BaseException) -> Optional[str]:
  """The line that says the disk (or quota) is full, if that is what `exc` (or an exception it was raised
  from, or one it groups) comes down to; else None."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return f"{errno.errorcode[e.errno]} ({os.strerror(e.errno)})" + (f" writing {e.filename}" if e.filename else "")
    if isinstance(e, tf.errors.ResourceExhaustedError):
      return _compact_cause("RESOURCE_EXHAUSTED: " + str(e.message))
    for line in str(e).splitlines():
      if any(p in line for p in _DISK_FULL_PHRASES):
        return _compact_cause(line)
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return None


def _compact_cause(line: str) -> str:
  """'RESOURCE_EXHAUSTED: No space left on device (writing /path)' from a storage library's long line."""
  words = [w for w in _DISK_FULL_PHRASES if w in line]
  path = re.findall(r'"((?:/|[a-z0-9]+://)[^"]+)"', line)
  return ": ".join(words) + (f" (writing {path[-1]})" if path else "") if words else " ".join(line.split())[:300]


def quiet_disk_full_logs() -> None:
  """Drops log records about a full disk (orbax's threads and asyncio log one traceback per array they
  could not write: hundreds of lines); the entry point reports the cause once, in its error line."""
  import logging as py_logging
  handler = logging.get_absl_handler()
  if any(isinstance(f, _DiskFullLogFilter) for f in handler.filters):
    return

  class Filter(_DiskFullLogFilter, py_logging.Filter):
    pass
  handler.addFilter(Filter())


class _DiskFullLogFilter:
  def filter(self, record) -> bool:
    try:
      if record.exc_info and record.exc_info[1] is not None and disk_full_cause(record.exc_info[1]):
        return False
      text = record.getMessage()
      return not any(p in text for p in _DISK_FULL_PHRASES)
    except Exception:  # pylint: disable=broad-except  (never let a filter break logging)
      return True


def _first_line(e: BaseException) -> str:
  line = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
  line = line.split(" See full TensorStore details")[0]
  line = line if len(line) <= 200 else line[:200] + "..."
  return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


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
    self._signature_to_rewrite: Optional[str] = None  # why, when check_compatible found it damaged
    quiet_disk_full_logs()

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

  def step_record(self, step: int) -> Optional[dict]:
    """The digest this codebase recorded in step's _CHECKPOINT_METADATA; None if there is none (a step
    saved before digests were recorded) or the file is unreadable."""
    try:
      with tf.io.gfile.GFile(os.path.join(self.directory, str(step), "_CHECKPOINT_METADATA")) as f:
        return (json.load(f).get("custom_metadata") or {}).get(DIGEST_KEY)
    except (ValueError, AttributeError, tf.errors.OpError):
      return None

  def check_compatible(self) -> Optional[int]:
    """The latest step to resume from, None if there is none; raises if it is another config's.

    A missing or damaged signature.json (the disk filled while it was written, say) is not the end: the
    steps' own records carry the signature's hash. If they all match this configuration, the file is set
    aside and rewritten at `prepare_restore`; without such records the run is refused (nothing changed)."""
    self._signature_to_rewrite = None
    steps = self.existing_steps()
    if not steps:
      return None
    path = os.path.join(self.directory, SIGNATURE_FILE)
    problem = None
    if not tf.io.gfile.exists(path):
      problem = "missing"
    else:
      try:
        with tf.io.gfile.GFile(path) as f:
          saved = json.load(f)
        if not isinstance(saved, dict):
          problem = f"damaged (a JSON {type(saved).__name__}, not an object)"
      except (ValueError, UnicodeDecodeError) as e:
        problem = f"damaged (not valid JSON: {str(e).splitlines()[0][:120]})"
    if problem:
      recorded = {s: (self.step_record(s) or {}).get("signature_sha256") for s in steps}
      recorded = {s: h for s, h in recorded.items() if h}
      if recorded and all(h == signature_hash(self.signature) for h in recorded.values()):
        self._signature_to_rewrite = problem
        return steps[-1]
      if recorded:
        raise errors.CheckpointMismatchError(
            f"MODEL_DIR {self.model_dir} holds checkpoints {steps} of a different configuration (their "
            f"records' signature differs from this one's; {SIGNATURE_FILE} is {problem}). Nothing was "
            "changed. Use a new MODEL_DIR for this configuration, or rerun with the one that wrote them.")
      raise errors.CheckpointDamagedError(
          f"MODEL_DIR {self.model_dir} holds checkpoints {steps} but its {SIGNATURE_FILE}, the record of which "
          f"configuration wrote them, is {problem}, and the checkpoints carry no record of their own, so it "
          "cannot be told whether they belong to this configuration. Nothing was changed. Use a new "
          f"MODEL_DIR, or restore {path} from a copy.")
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

  def save(self, step: int, state, data_iterator=None, digest: Optional[dict] = None) -> None:
    """Writes the data state, then has orbax save the train state with the step's digest in its
    _CHECKPOINT_METADATA (written when orbax finalizes the step: the commit of the whole unit).
    `digest`: the state's `state_digest` when the caller computed it already."""
    if jax.process_index() == 0:
      path = os.path.join(self.directory, SIGNATURE_FILE)
      if not tf.io.gfile.exists(path):
        tf.io.gfile.makedirs(self.directory)
        with tf.io.gfile.GFile(path, "w") as f:
          json.dump(self.signature, f, indent=1, sort_keys=True)
    data_files = {}
    if data_iterator is not None:
      prefix = self._data_prefix(step)
      tf.io.gfile.makedirs(os.path.dirname(prefix))
      tf.train.Checkpoint(iterator=data_iterator).write(prefix)
      data_files = self._data_file_digests(step)
    arrays = digest if digest is not None else state_digest(state)[0]
    record = {"state": arrays, "data_state": data_files, "signature_sha256": signature_hash(self.signature)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True,
                      custom_metadata={DIGEST_KEY: record})
    self._prune_data_states()

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None

  def abandon(self) -> None:
    """Closes after a failure that is already being reported: a pending save's own error (the same full
    disk, typically) is logged, not raised over the first one."""
    manager, self._manager = self._manager, None
    if manager is not None:
      try:
        manager.wait_until_finished()
        manager.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("While closing the checkpoint manager after a failure: %s", _first_line(e))
    self._remove_uncommitted()

  def _remove_uncommitted(self) -> None:
    """Deletes what a failed save left half-written: orbax's temporary step folders and data_state folders
    newer than the latest committed step. On a full disk that frees the room to mark the run failed;
    committed steps are never touched."""
    if jax.process_index() != 0:
      return
    try:
      latest = max(self.existing_steps(), default=-1)
      if tf.io.gfile.isdir(self.directory):
        for name in tf.io.gfile.listdir(self.directory):
          if ocp.step.TMP_DIR_SUFFIX in name:
            tf.io.gfile.rmtree(os.path.join(self.directory, name.rstrip("/")))
      root = os.path.join(self.model_dir, "data_state")
      if tf.io.gfile.isdir(root):
        for name in tf.io.gfile.listdir(root):
          name = name.rstrip("/")
          if name.isdigit() and int(name) > latest:
            tf.io.gfile.rmtree(os.path.join(root, name))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("While removing a failed save's partial files: %s", _first_line(e))

  # -- restoring -------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, data_iterator=None):
    """The train state of `step` (and the input position into `data_iterator`), unverified: for
    INITIAL_CHECKPOINT. Reads the step folder directly, so no manager lists this directory's steps."""
    checkpointer = ocp.StandardCheckpointer()
    try:
      state = checkpointer.restore(os.path.join(self.directory, str(step), "state"), abstract_state)
    finally:
      checkpointer.close()
    if data_iterator is not None:
      tf.train.Checkpoint(iterator=data_iterator).read(self._data_prefix(step)).assert_consumed()
    return state

  def _check_step(self, step: int, abstract_state, data_iterator) -> tuple[Optional[str], Any]:
    """(None, state) if `step` restores intact, else (why not, None). Restores the input position
    into `data_iterator` only for an intact step."""
    record = self.step_record(step)
    prefix = self._data_prefix(step)
    if data_iterator is not None and not tf.io.gfile.exists(prefix + ".index"):
      return (f"its input position (data_state/{step}/{os.path.basename(prefix)}.*) is missing, and parameters "
              "without it would restart the data order"), None
    if record is not None and not self._signature_ok(record):
      return "its record names another configuration's signature", None
    try:
      checkpointer = ocp.StandardCheckpointer()
      try:
        state = checkpointer.restore(os.path.join(self.directory, str(step), "state"), abstract_state)
      finally:
        checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except  (whatever orbax / tensorstore raise)
      return f"it cannot be read ({_first_line(e)})", None
    arrays, finite = state_digest(state)
    if record is not None:
      differ = sorted(k for k in set(arrays) | set(record.get("state", {})) if arrays.get(k) != record["state"].get(k))
      if differ:
        return (f"its contents do not match the digest recorded when it was saved ({len(differ)} of "
                f"{len(arrays)} arrays differ, e.g. {differ[0]})"), None
    if not finite:
      return "it holds non-finite values (NaN or Inf)", None
    if data_iterator is not None:
      own = os.path.basename(prefix) + "."  # the record holds the files of the process that wrote it (0)
      expected = {n: h for n, h in ((record or {}).get("data_state") or {}).items() if n.startswith(own)}
      try:
        actual = self._data_file_digests(step, names=expected or None)
      except tf.errors.OpError as e:
        return f"its input position cannot be read ({_first_line(e)})", None
      if expected and actual != expected:
        return "its input position (data_state) does not match the digest recorded when it was saved", None
      try:
        tf.train.Checkpoint(iterator=data_iterator).read(prefix).assert_consumed()
      except Exception as e:  # pylint: disable=broad-except
        return f"its input position cannot be restored ({_first_line(e)})", None
    return None, state

  def _signature_ok(self, record: dict) -> bool:
    return record.get("signature_sha256") in (None, signature_hash(self.signature))

  def prepare_restore(self, abstract_state, data_iterator=None) -> tuple[Optional[int], Any, Optional[str]]:
    """(step, state, note): the latest intact step and its state (the input position restored into
    `data_iterator`), or (None, None, note) when there is no step. Only if a usable step is found (or
    there is none at all) is anything written: skipped steps, unfinished step folders and a damaged
    signature.json are renamed aside, and `note` is the one line that says so (None if nothing was).
    Raises CheckpointDamagedError, changing nothing, if steps exist but none is intact."""
    steps = self.existing_steps()
    skipped: list[tuple[int, str]] = []
    found, state = None, None
    for step in reversed(steps):
      reason, state = self._check_step(step, abstract_state, data_iterator)
      if _all_processes_agree(reason is None):
        found = step
        break
      skipped.append((step, reason or "another process could not restore its part"))
    if steps and found is None:
      raise errors.CheckpointDamagedError(
          f"No intact checkpoint in {self.directory}: " +
          "; ".join(f"step {s}: {r}" for s, r in skipped) +
          ". Nothing was changed. To train this configuration from scratch use a new MODEL_DIR (or move "
          "this one's checkpoints/ and data_state/ aside).")
    unfinished = [(s, "its save never finished (no _CHECKPOINT_METADATA)") for s in self._unfinished_steps()]
    note = self._set_aside(skipped + unfinished, found)
    return found, state, note

  def _unfinished_steps(self) -> list[int]:
    """Step folders orbax would count as steps (and so refuse to save again) that were never finalized."""
    if not tf.io.gfile.isdir(self.directory):
      return []
    return sorted(int(n.rstrip("/")) for n in tf.io.gfile.listdir(self.directory)
                  if n.rstrip("/").isdigit() and not tf.io.gfile.exists(
                      os.path.join(self.directory, n.rstrip("/"), "_CHECKPOINT_METADATA")))

  def _set_aside(self, steps: list[tuple[int, str]], found: Optional[int]) -> Optional[str]:
    if not steps and not self._signature_to_rewrite:
      return None
    suffix = SKIPPED_SUFFIX + _utc_stamp()
    parts = []
    if jax.process_index() == 0:
      for step, reason in steps:
        moved = []
        for root in (self.directory, os.path.join(self.model_dir, "data_state")):
          path = os.path.join(root, str(step))
          if tf.io.gfile.exists(path):
            _rename_dir(path, path + suffix)
            moved.append(os.path.relpath(path + suffix, self.model_dir))
        parts.append(f"step {step} ({reason}; moved to {' and '.join(moved)})")
      if self._signature_to_rewrite:
        path = os.path.join(self.directory, SIGNATURE_FILE)
        if tf.io.gfile.exists(path):
          tf.io.gfile.rename(path, path + suffix)
        with tf.io.gfile.GFile(path, "w") as f:
          json.dump(self.signature, f, indent=1, sort_keys=True)
        parts.append(f"{SIGNATURE_FILE} was {self._signature_to_rewrite}; the steps' own records show they "
                     "belong to this configuration, so it was rewritten" +
                     (f" (the old one kept as {SIGNATURE_FILE}{suffix})" if "missing" not in
                      self._signature_to_rewrite else ""))
        self._signature_to_rewrite = None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("scaling_arch: checkpoints set aside")
    where = f"resuming from step {found}" if found is not None else "no step left to resume from"
    return f"warning: checkpoint {'; '.join(parts)}; {where}." if parts else None

  def _data_file_digests(self, step: int, names=None) -> dict[str, str]:
    """{file name: SHA-256} of this process's data_state files of `step` (only `names`, if given)."""
    prefix = self._data_prefix(step)
    folder, base = os.path.dirname(prefix), os.path.basename(prefix)
    if names is None:
      names = sorted(n for n in tf.io.gfile.listdir(folder) if n.startswith(base + "."))
    return {n: _sha256_file(os.path.join(folder, n)) for n in names}

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


def _rename_dir(source: str, target: str) -> None:
  """Renames a folder; where the file system cannot rename folders (object stores), copies it file by
  file, then removes the source."""
  try:
    tf.io.gfile.rename(source, target)
    return
  except (tf.errors.UnimplementedError, tf.errors.FailedPreconditionError):
    if "://" not in source:
      raise
  for folder, _, files in tf.io.gfile.walk(source):
    rel = os.path.relpath(folder, source)
    tf.io.gfile.makedirs(os.path.normpath(os.path.join(target, rel)))
    for name in files:
      tf.io.gfile.copy(os.path.join(folder, name), os.path.normpath(os.path.join(target, rel, name)))
  tf.io.gfile.rmtree(source)


def _all_processes_agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (all of them must restore the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


# What must agree for a checkpoint's parameters to initialize a model (dropout, activation dtype, remat
# and the task may differ: fine-tuning changes them).
PARAMETER_SIGNATURE_KEYS = ("architecture", "vocab_size", "param_shapes")


def prefix_fits(saved: Sequence[int], current: Sequence[int], dims: Sequence[int]) -> bool:
  """Whether a saved parameter of shape `saved` initializes one of shape `current` by its prefix: the same
  rank, equal extents except along `dims` (its position axes), and no shorter there."""
  return (len(saved) == len(current) and list(saved) != list(current) and
          all(s == c or (i in dims and s > c) for i, (s, c) in enumerate(zip(saved, current))))


def _prefix_shapes(saved: dict, current: dict, position_dims: Optional[dict]) -> dict:
  """{parameter name: saved shape} of the saved `param_shapes` that initialize `current` by their prefix."""
  return {name: saved[name] for name, dims in (position_dims or {}).items()
          if name in saved and name in current and prefix_fits(saved[name], current[name], dims)}


def _saved_signature(checkpoint_path: str) -> Optional[dict]:
  path = os.path.join(os.path.dirname(checkpoint_path.rstrip("/")), SIGNATURE_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def prefix_parameters(checkpoint_path: str, signature: dict, position_dims: Optional[dict]) -> dict:
  """{parameter name: saved shape} of the parameters that `checkpoint_path` holds longer along their
  position axes than this model (see partitioning.POSITION_AXES); {} without a signature.json."""
  return _prefix_shapes((_saved_signature(checkpoint_path) or {}).get("param_shapes") or {},
                        signature.get("param_shapes") or {}, position_dims)


def check_initial_checkpoint(checkpoint_path: str, signature: dict, what: str = "INITIAL_CHECKPOINT",
                             position_dims: Optional[dict] = None) -> None:
  """Raises a one-line error unless `checkpoint_path` (a step directory, MODEL_DIR/checkpoints/<step>)
  holds parameters this model can load: the same architecture, vocabulary size and parameter shapes,
  according to the signature.json its run wrote (a checkpoint without one is checked at restore). A
  parameter longer along its position axes (`position_dims`, Trainer.position_dims) is accepted: its
  prefix initializes this model (restore_params)."""
  step_dir = checkpoint_path.rstrip("/")
  if not tf.io.gfile.exists(os.path.join(step_dir, "state")):
    raise errors.UserError(
        f"{what} {checkpoint_path} is not a checkpoint of this codebase (no 'state' item); give a step "
        "directory such as MODEL_DIR/checkpoints/1000.")
  saved = _saved_signature(step_dir)
  if saved is None:
    logging.warning("%s has no %s next to it; its parameters are checked when restored.", checkpoint_path,
                    SIGNATURE_FILE)
    return
  saved = {k: saved.get(k) for k in PARAMETER_SIGNATURE_KEYS}
  current = {k: signature.get(k) for k in PARAMETER_SIGNATURE_KEYS}
  prefixes = _prefix_shapes(saved["param_shapes"] or {}, current["param_shapes"] or {}, position_dims)
  if prefixes:
    saved["param_shapes"] = {**saved["param_shapes"], **{n: current["param_shapes"][n] for n in prefixes}}
  if saved != current:
    raise errors.CheckpointMismatchError(
        f"{what} {checkpoint_path} was written by a different model ({describe_difference(saved, current)}); "
        "its parameters cannot initialize this one. Use the architecture and size (gin/models, gin/sizes, "
        "depth/width overrides) and the vocabulary it was trained with.")


def restore_params(checkpoint_path: str, abstract_params, prefixes: Optional[dict] = None) -> Any:
  """Parameters only, from a checkpoint step directory (`.../checkpoints/<step>`) written by this
  codebase, placed with the shardings of `abstract_params`. `prefixes` ({parameter name: saved shape},
  from prefix_parameters) are read at their saved shape and cut to the prefix this model uses."""
  state_dir = os.path.join(checkpoint_path, "state")
  if not tf.io.gfile.exists(state_dir):
    raise errors.UserError(
        f"INITIAL_CHECKPOINT {checkpoint_path} has no 'state' item; give a step directory such as "
        "MODEL_DIR/checkpoints/1000.")
  prefixes = prefixes or {}

  def saved_shape(path, leaf):
    shape = prefixes.get(jax.tree_util.keystr(path))
    return leaf if shape is None else jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=leaf.sharding)

  checkpointer = ocp.PyTreeCheckpointer()
  target = {"params": jax.tree_util.tree_map_with_path(saved_shape, abstract_params)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.CheckpointMismatchError(
        f"Checkpoint {checkpoint_path} does not hold parameters of this model's shapes "
        f"(different architecture or size?): {first_line}") from None
  if not prefixes:
    return restored["params"]

  def cut(path, value, leaf):
    if jax.tree_util.keystr(path) not in prefixes:
      return value
    return jax.device_put(value[tuple(slice(0, n) for n in leaf.shape)], leaf.sharding)

  return jax.tree_util.tree_map_with_path(cut, restored["params"], abstract_params)

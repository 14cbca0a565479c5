"""Batches for the trainer: a seqio Task -> packed encoder-decoder features -> this process's rows.

Every process builds the same global batch and keeps its own contiguous slice of rows, so what a step
trains on does not depend on the number of processes. The dataset is deterministic for a given seed and
its iterator can be saved with `tf.train.Checkpoint(iterator=...)`, so a restarted run resumes at the
same input position.
"""

import os

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from scaling_arch.errors import DataError

FEATURES = ('encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions',
            'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
            'decoder_segment_ids', 'decoder_positions')


def get_dataset(task: seqio.Task, *, split: str, feature_lengths: dict[str, int],
                global_batch_size: int, seed: int | None, shuffle: bool, repeat: bool,
                pack: bool = True, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Returns batches of `global_batch_size // process_count` rows with the int32 `FEATURES`.

  Args:
    task: a seqio Task with `inputs` and `targets` features (see `tasks.pretraining`).
    split: a split of the task, e.g. 'train' or 'validation'.
    feature_lengths: `{'inputs': ..., 'targets': ...}` token lengths of the packed rows.
    global_batch_size: rows per step over all processes; a multiple of `process_count`.
    seed: seed for shuffling and the random preprocessing; same seed, same batches.
    shuffle: whether to shuffle examples (buffer of the task's size).
    repeat: repeat the split forever (training) or read it once (evaluation; a last partial global
      batch is dropped).
    pack: pack several examples per row (seqio's packing); else one example per row.
    process_index: this process's rank; it keeps rows [index*local, (index+1)*local) of each batch.
    process_count: number of processes reading the same global batches.
  """
  if global_batch_size <= 0 or process_count <= 0 or global_batch_size % process_count:
    raise DataError(f'global_batch_size {global_batch_size} must be a positive multiple of the '
                    f'process count {process_count}; change the batch size.')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in [0, {process_count}).')
  if split not in task.splits:
    raise DataError(f'Task {task.name} has no split {split!r}; its splits are {list(task.splits)}.')
  ds = _task_dataset(task, sequence_length=dict(feature_lengths), split=split, shuffle=shuffle,
                     seed=seed, num_epochs=None if repeat else 1, use_cached=False,
                     try_in_mem_cache=False)
  ds = to_features(ds, feature_lengths, pack=pack)
  ds = ds.batch(global_batch_size, drop_remainder=True)
  if process_count > 1:
    local = global_batch_size // process_count
    start, stop = process_index * local, (process_index + 1) * local
    ds = ds.map(lambda batch: {k: v[start:stop] for k, v in batch.items()})
  options = tf.data.Options()
  options.deterministic = True
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


# Stands for an input position that must be padding in the model's rows (see `align_inputs`). Not 0: seqio's
# packer drops the zeros of an example; not a vocabulary id: they are all >= 0.
FILLER = -1


@gin.configurable(module='tasks')
def input_alignment(multiple: int = 1) -> int:
  """The multiple every example's inputs are padded to before packing (1: none). The Funnel's gin file
  sets it to its total pooling factor, so every packed example starts at a pooling-window boundary."""
  if multiple < 1:
    raise DataError(f'tasks.input_alignment.multiple must be >= 1, got {multiple}.')
  return multiple


def align_inputs(example, multiple: int):
  """Pads an example's `inputs` with FILLER to a multiple of `multiple` (empty inputs: to `multiple`).

  The empty case matters for every architecture: seqio numbers each feature's packed segments by counting
  the examples that have tokens in it, so an example without inputs would shift the encoder's segment ids
  against the decoder's and its targets would cross-attend to the next example's inputs. With FILLER
  positions (padding after `to_features`) it keeps its number and simply has no encoder tokens.
  """
  inputs = example['inputs']
  length = tf.size(inputs)
  padded = (tf.maximum(length, 1) + multiple - 1) // multiple * multiple
  filler = tf.fill([padded - length], tf.constant(FILLER, inputs.dtype))
  return {**example, 'inputs': tf.concat([inputs, filler], 0)}


def to_features(ds: tf.data.Dataset, feature_lengths: dict[str, int], *, pack: bool) -> tf.data.Dataset:
  """Task examples ({'inputs', 'targets'}) -> the model's int32 `FEATURES`, packed by seqio if `pack`.

  Inputs are first aligned (`align_inputs`, multiple `input_alignment()`); FILLER positions come out as
  padding (token 0, segment id 0), so an aligned example's extra positions cost row capacity, not content.
  """
  multiple = input_alignment()
  ds = ds.map(lambda ex: align_inputs(ex, multiple), num_parallel_calls=tf.data.AUTOTUNE)
  ds = seqio.EncDecFeatureConverter(pack=pack)(ds, dict(feature_lengths))
  return ds.map(_with_all_features, num_parallel_calls=tf.data.AUTOTUNE)


def check_split_not_empty(task, split: str) -> None:
  """Raises DataError if `split` of `task` (or of a mixture's tasks) reads from files that hold nothing.

  Cheap (reads until the first non-blank byte) and read-only, so the trainer calls it before it writes
  anything: an empty training split would end in StopIteration, an empty validation split in a -0.0
  ("perfect") negative log-perplexity. Sources other than files (TFDS) are checked when they are read.
  """
  for sub in getattr(task, 'tasks', None) or [task]:
    source = getattr(sub, 'source', None)
    if not isinstance(source, seqio.FileDataSource) or split not in source.splits:
      continue
    files = list(source.list_shards(split))
    if not any(_has_content(f, text=isinstance(source, seqio.TextLineDataSource)) for f in files):
      shown = ', '.join(files) if files else f'no file matches {source._split_to_filepattern[split]!r}'  # pylint: disable=protected-access
      raise DataError(
          f'The {split!r} split of task {base_task_name(sub.name)} is empty ({shown}): '
          f'{"training would have no examples" if split == "train" else "evaluation would score nothing"}. '
          'Rebuild or fix the file (for the offline corpus: delete it and it is rebuilt at the next start).')


def base_task_name(name: str) -> str:
  """A registered task name without its hash suffix ('offline_span_corruption_1a2b3c4d' -> without it)."""
  head, _, tail = name.rpartition('_')
  return head if head and len(tail) == 8 and all(c in '0123456789abcdef' for c in tail) else name


def _has_content(path: str, *, text: bool) -> bool:
  """Whether `path` exists and holds a byte (for text, a non-whitespace character)."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      while True:
        chunk = f.read(1 << 16)
        if not chunk:
          return False
        if not text or chunk.strip():
          return True
  except tf.errors.NotFoundError:
    return False


def _with_all_features(example):
  """Turns FILLER inputs into padding, adds segment ids and positions when unpacked (one segment per row)
  and casts all to int32."""
  example = dict(example)
  real = tf.not_equal(example['encoder_input_tokens'], FILLER)
  example['encoder_input_tokens'] = tf.where(real, example['encoder_input_tokens'], 0)
  for name in ('encoder_segment_ids', 'encoder_positions'):
    if name in example:
      example[name] = tf.where(real, example[name], 0)
  for prefix, tokens in (('encoder', 'encoder_input_tokens'), ('decoder', 'decoder_target_tokens')):
    if f'{prefix}_segment_ids' not in example:
      segment_ids = tf.cast(tf.not_equal(example[tokens], 0), tf.int32)
      example[f'{prefix}_segment_ids'] = segment_ids
      example[f'{prefix}_positions'] = tf.range(tf.size(segment_ids), dtype=tf.int32) * segment_ids
  return {k: tf.cast(example[k], tf.int32) for k in FEATURES}


def _task_dataset(task: seqio.Task, **kwargs) -> tf.data.Dataset:
  """`task.get_dataset(**kwargs)`, turning a TFDS dataset that is not prepared into a DataError."""
  try:
    return task.get_dataset(**kwargs)
  except (AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
    if not isinstance(task.source, seqio.TfdsDataSource):
      raise
    name = task.source.tfds_dataset.name
    data_dir = (task.source.tfds_dataset.data_dir or os.environ.get('TFDS_DATA_DIR')
                or '~/tensorflow_datasets')
    raise DataError(
        f'TFDS dataset {name} is not available in data dir {data_dir} ({e}). Prepare it once with '
        f'`tfds build {name} --data_dir={data_dir}` (C4 needs Apache Beam and a lot of disk), or '
        'point the data dir (tfds_data_dir, or the TFDS_DATA_DIR environment variable) at a '
        'prepared copy, e.g. a gs:// bucket on Cloud. Nothing is downloaded automatically.') from e

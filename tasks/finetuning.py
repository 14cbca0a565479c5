"""seqio Tasks and the mixture for fine-tuning: GLUE, SuperGLUE and SQuAD v1.1 (TFDS), plus one offline task.

Each task is built the way T5 builds its own (`t5.data.tasks`), from t5's preprocessors, postprocessors
and metric functions (`t5.data.glue_utils`, `t5.data.preprocessors`, `t5.evaluation.metrics`), with
our vocabulary and TFDS data dir. Names (the registered name adds a hash of the vocabulary and data dir,
as the pretraining tasks do, so two vocabularies give two sets of tasks):

  sa_glue_{cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte,wnli}   GLUE (glue/<name>:2.0.0)
  sa_glue_mnli_matched, sa_glue_mnli_mismatched          MNLI's two validation sets (evaluation only)
  sa_super_glue_{boolq,cb,copa,multirc,record,rte,wic,wsc}  SuperGLUE (super_glue/<name>:1.0.2;
                                                          wsc is wsc.fixed as True/False classification)
  sa_squad                                               SQuAD v1.1 (squad/v1.1:3.0.0)
  sa_glue_super_glue_squad                               the mixture of all of the above
  sa_offline_completion                                  offline: finish a paragraph of the offline corpus
  sa_offline_cloze                                       offline: fill in a blanked-out word of a sentence

The mixture samples tasks in proportion to their number of training examples, each capped at
`finetuning_rate.maximum` (T5's `rate_num_examples`, default 2**19; gin:
`finetuning_rate.maximum = ...`); the evaluation-only MNLI tasks have rate 0. The GLUE diagnostic
sets (ax, axb, axg) have no validation split and are left out. Nothing is ever downloaded: the TFDS
datasets must be prepared in the data dir (`tfds build glue super_glue squad --data_dir=...`).
"""

import functools
import hashlib
import os
import re

import gin
import seqio
import t5.data
import tensorflow as tf
import tensorflow_datasets as tfds
from t5.data import glue_utils
from t5.data import postprocessors as t5_post
from t5.data import preprocessors as t5_pre
from t5.evaluation import metrics as t5_metrics

from scaling_arch.errors import DataError
from tasks import offline_corpus
from tasks import pretraining

PREFIX = 'sa_'
MIXTURE = 'sa_glue_super_glue_squad'
OFFLINE_TASK = 'sa_offline_completion'
CLOZE_TASK = 'sa_offline_cloze'
GLUE = ('cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli', 'rte', 'wnli')
SUPER_GLUE = ('boolq', 'cb', 'copa', 'multirc', 'record', 'rte', 'wic', 'wsc')
MNLI_EVAL = {'sa_glue_mnli_matched': 'validation_matched',
             'sa_glue_mnli_mismatched': 'validation_mismatched'}
# The versions the pinned tfds builds by default (`tfds build glue super_glue squad`); t5 read glue 1.0.0,
# which differs from 2.0.0 only in where QQP is downloaded from.
GLUE_VERSION, SUPER_GLUE_VERSION, SQUAD = '2.0.0', '1.0.2', 'squad/v1.1:3.0.0'
DEFAULT_RATE_MAXIMUM = 2**19


def task_names() -> tuple[str, ...]:
  """The base names of every fine-tuning task (not the mixture), in a fixed order."""
  return (tuple(f'sa_glue_{b}' for b in GLUE) + tuple(MNLI_EVAL) +
          tuple(f'sa_super_glue_{b}' for b in SUPER_GLUE) + ('sa_squad',))


NAMES = (MIXTURE,) + task_names() + (OFFLINE_TASK, CLOZE_TASK)
_HASHED = re.compile(r'^(.*)_[0-9a-f]{8}$')


def base_name(registered_name: str) -> str:
  """'sa_glue_cola_1a2b3c4d' -> 'sa_glue_cola' (the name without the vocabulary/data-dir hash)."""
  match = _HASHED.match(registered_name)
  return match.group(1) if match else registered_name


@gin.configurable
def finetuning_rate(task: seqio.Task, maximum: float | None = DEFAULT_RATE_MAXIMUM) -> float:
  """Example-proportional mixing: the task's number of training examples, capped at `maximum`."""
  return t5.data.rate_num_examples(task, maximum=maximum)


def get_task(name: str, *, vocabulary, tfds_data_dir: str | None = None):
  """The task or mixture called `name` (pretraining or fine-tuning) with `vocabulary`.

  Fine-tuning names register every fine-tuning task once per vocabulary and data dir; other names go
  to `tasks.pretraining.get_task`. Unknown names raise DataError.
  """
  if name in pretraining.TASK_NAMES:
    return pretraining.get_task(name, vocabulary=vocabulary, tfds_data_dir=tfds_data_dir)
  if name == OFFLINE_TASK:
    return offline_completion_task(vocabulary)
  if name == CLOZE_TASK:
    return cloze_task(vocabulary)
  if name in NAMES:
    registered = register(vocabulary, tfds_data_dir)
    return (seqio.MixtureRegistry if name == MIXTURE else seqio.TaskRegistry).get(registered[name])
  raise DataError(f"Unknown task {name!r}; known tasks: {', '.join(pretraining.TASK_NAMES + NAMES)}.")


def _suffix(vocabulary, *depends_on) -> str:
  model = getattr(vocabulary, 'sentencepiece_model_file', None) or repr(vocabulary)
  key = '|'.join(str(x) for x in (model, getattr(vocabulary, 'extra_ids', ''), *depends_on))
  return hashlib.sha256(key.encode()).hexdigest()[:8]


def _features(vocabulary) -> dict[str, seqio.Feature]:
  return {'inputs': seqio.Feature(vocabulary, add_eos=True, required=False),
          'targets': seqio.Feature(vocabulary, add_eos=True)}


def register(vocabulary, tfds_data_dir: str | None = None) -> dict[str, str]:
  """Registers (once) every TFDS fine-tuning task and the mixture; returns {base name: registered name}."""
  suffix = _suffix(vocabulary, tfds_data_dir)
  names = {name: f'{name}_{suffix}' for name in (MIXTURE,) + task_names()}
  if names[MIXTURE] in seqio.MixtureRegistry.names():
    return names
  features = _features(vocabulary)

  def add(name, tfds_name, text_preprocessor, postprocess_fn, metric_fns, splits=None):
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits,
                                  read_only=True)
    if names[name] not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(
          names[name], source=source, output_features=features, postprocess_fn=postprocess_fn,
          metric_fns=metric_fns,
          preprocessors=[text_preprocessor, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                         seqio.preprocessors.append_eos_after_trim])

  glue_configs = tfds.text.glue.Glue.builder_configs
  for b in GLUE:
    config = glue_configs[b]
    splits = {'train': 'train'} if b == 'mnli' else ('train', 'validation')
    metrics = [] if b == 'mnli' else glue_utils.get_glue_metric(b)
    add(f'sa_glue_{b}', f'glue/{b}:{GLUE_VERSION}', glue_utils.get_glue_text_preprocessor(config),
        glue_utils.get_glue_postprocess_fn(config), metrics, splits)
  for name, split in MNLI_EVAL.items():  # MNLI's validation sets, read from glue/mnli itself
    config = glue_configs['mnli']
    add(name, f'glue/mnli:{GLUE_VERSION}', glue_utils.get_glue_text_preprocessor(config),
        glue_utils.get_glue_postprocess_fn(config),
        glue_utils.get_glue_metric(name.replace('sa_glue_', '')), {'validation': split})
  super_glue_configs = tfds.text.super_glue.SuperGlue.builder_configs
  for b in SUPER_GLUE:
    config = super_glue_configs['wsc.fixed' if b == 'wsc' else b]
    # t5 scores WSC only in its "simple" (referent-generating) form; as classification it is accuracy.
    metrics = [t5_metrics.accuracy] if b == 'wsc' else glue_utils.get_super_glue_metric(b)
    add(f'sa_super_glue_{b}', f'super_glue/{config.name}:{SUPER_GLUE_VERSION}',
        glue_utils.get_glue_text_preprocessor(config), glue_utils.get_glue_postprocess_fn(config), metrics,
        ('train', 'validation'))
  add('sa_squad', SQUAD, t5_pre.squad, t5_post.qa, [t5_metrics.squad], ('train', 'validation'))

  rates = [(names[n], 0.0 if n in MNLI_EVAL else finetuning_rate) for n in task_names()]
  seqio.MixtureRegistry.add(names[MIXTURE], rates, mixture_cls=_Mixture)
  return names


class _Mixture(seqio.Mixture):
  """A seqio Mixture whose missing TFDS datasets raise DataError naming the dataset and data dir."""

  def get_task_dataset(self, task, *args, **kwargs):
    try:
      return super().get_task_dataset(task, *args, **kwargs)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
      raise missing_dataset_error(task, e) from e


def missing_dataset_error(task: seqio.Task, error: Exception) -> DataError:
  """The DataError for a TFDS task whose dataset is not prepared (as tasks.data words it)."""
  name = task.source.tfds_dataset.name
  data_dir = task.source.tfds_dataset.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return DataError(
      f'TFDS dataset {name} (task {base_name(task.name)}) is not available in data dir {data_dir} '
      f'({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}). Prepare '
      f'the fine-tuning datasets once with `tfds build glue super_glue squad --data_dir={data_dir}`, or '
      'point the data dir (TFDS_DATA_DIR) at a prepared copy. Nothing is downloaded automatically.')


# ---- offline ------------------------------------------------------------------------------------------
COMPLETION_CONTEXT_WORDS = 32
COMPLETION_TARGET_WORDS = 4


@seqio.map_over_dataset
def _completion_example(line):
  """A paragraph -> inputs 'complete: <its first words>', targets '<the next 4 words>'."""
  words = tf.strings.split(line)
  n = tf.size(words)
  context = tf.minimum(n - COMPLETION_TARGET_WORDS, COMPLETION_CONTEXT_WORDS)
  inputs = tf.strings.reduce_join(words[:context], separator=' ')
  targets = tf.strings.reduce_join(words[context:context + COMPLETION_TARGET_WORDS], separator=' ')
  return {'inputs': tf.strings.join(['complete:', inputs], separator=' '), 'targets': targets}


def offline_completion_task(vocabulary, cache_dir: str | None = None) -> seqio.Task:
  """An offline text-to-text task with inference metrics, for fine-tuning without TFDS: the first
  (up to) 32 words of a paragraph of the offline corpus in, the next 4 words out; scored by t5's
  sequence accuracy and SQuAD-style exact match / F1."""
  files = offline_corpus.corpus_files(cache_dir)
  name = f'{OFFLINE_TASK}_{_suffix(vocabulary, files["train"], files["validation"])}'
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)

  def squad_metric(targets, predictions):
    return t5_metrics.squad([[t] for t in targets], predictions)

  source = seqio.TextLineDataSource(split_to_filepattern={s: files[s] for s in pretraining.SPLITS})
  long_enough = functools.partial(_filter_lines, min_words=2 * COMPLETION_TARGET_WORDS)
  return seqio.TaskRegistry.add(
      name, source=source, output_features=_features(vocabulary),
      metric_fns=[t5_metrics.sequence_accuracy, squad_metric],
      preprocessors=[long_enough, _completion_example, seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim])


CLOZE_WORDS = 32
CLOZE_BLANK = '<extra_id_0>'
# The words a cloze example may blank out: frequent function words, so the task is a 12-way choice that
# context decides (syntax and meaning).
CLOZE_CHOICES = ('the', 'of', 'and', 'to', 'in', 'is', 'for', 'that', 'with', 'as', 'by', 'or')


def _blank_word(word: str):
  """A paragraph that holds `word` among its first 32 words -> those words with one occurrence of it
  (picked by a hash of the line: the same on every machine and pass) blanked out; target: the word."""
  def blank(line):
    words = tf.strings.split(line)[:CLOZE_WORDS]
    candidates = tf.where(tf.equal(words, word))[:, 0]
    h = tf.strings.to_hash_bucket_fast(line, 2**31 - 1)
    pick = tf.cast(candidates[h % tf.size(candidates, out_type=tf.int64)], tf.int32)
    blanked = tf.tensor_scatter_nd_update(words, [[pick]], [CLOZE_BLANK])
    return {'inputs': tf.strings.join(['fill in:', tf.strings.reduce_join(blanked, separator=' ')],
                                      separator=' '),
            'targets': tf.constant(word)}
  return blank


def _balanced_cloze(dataset):
  """One stream of examples per CLOZE_CHOICES word (the lines holding it, that word blanked), taken in
  turn: every answer is equally frequent, so answering one word everywhere scores 1/12 and a score above
  that needs the context. Ends when the rarest word's lines run out."""
  streams = [dataset.filter(lambda line, w=word: tf.reduce_any(tf.equal(
                 tf.strings.split(line)[:CLOZE_WORDS], w))).map(_blank_word(word),
                                                                num_parallel_calls=tf.data.AUTOTUNE)
             for word in CLOZE_CHOICES]
  turns = tf.data.Dataset.range(len(CLOZE_CHOICES)).repeat()
  return tf.data.Dataset.choose_from_datasets(streams, turns, stop_on_empty_dataset=True)


@gin.configurable
def cloze_task(vocabulary, cache_dir: str | None = None, corpus: str = 'cpython') -> seqio.Task:
  """An offline task for fine-tuning without TFDS, meant to give the CPU study a graded downstream score:
  fill in a blanked-out function word (one of the 12 CLOZE_CHOICES) of a sentence of an offline corpus
  (gin: `cloze_task.corpus`, e.g. 'packages'), scored by exact match (t5's sequence accuracy). The 12
  answers are equally frequent (`_balanced_cloze`), so chance and the majority answer both score 1/12:
  with the natural frequencies 'the' alone scored 26%, which is what vanilla d64 / d192 (pretrained 200
  steps on 'packages', fine-tuned 100-300 steps at constant 1e-3) answered everywhere. Being close to the
  pretraining objective, it tells less than GLUE about transfer.
  """
  files = offline_corpus.corpus_files(cache_dir, corpus)
  name = f'{CLOZE_TASK}_{_suffix(vocabulary, files["train"], files["validation"])}'
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  source = seqio.TextLineDataSource(split_to_filepattern={s: files[s] for s in pretraining.SPLITS})
  return seqio.TaskRegistry.add(
      name, source=source, output_features=_features(vocabulary),
      metric_fns=[t5_metrics.sequence_accuracy],
      preprocessors=[_balanced_cloze, seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim])


def _filter_lines(dataset, min_words: int):
  """Keeps the lines with at least `min_words` words."""
  return dataset.filter(lambda line: tf.size(tf.strings.split(line)) >= min_words)

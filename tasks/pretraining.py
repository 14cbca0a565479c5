"""seqio Tasks for T5 span-corruption pretraining, on C4 (TFDS) or on the offline corpus.

The pipeline is T5's `c4_v220_span_corruption`: rename `text` to `targets`, tokenize, span corruption
(noise density 0.15, mean span length 3; it concatenates and splits the token stream itself), append
EOS. Outputs `inputs` and `targets`. Metrics (negative log-perplexity) are the trainer's business.

Tasks register in `seqio.TaskRegistry` under a name that carries a short hash of what they depend on
(vocabulary model, data location), so two vocabularies give two tasks and re-registering is a no-op.
"""

import functools
import hashlib

import gin
import seqio
from t5.data import preprocessors as t5_preprocessors

from scaling_arch.errors import DataError
from tasks import offline_corpus

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
SPLITS = ('train', 'validation')
TASK_NAMES = ('c4_span_corruption', 'offline_span_corruption')


def span_corruption_targets_length(inputs_length: int) -> int:
  """The targets length span corruption needs for `inputs_length` (512 -> 114, 128 -> 29)."""
  _, targets_length = t5_preprocessors.random_spans_helper(
      inputs_length=inputs_length, noise_density=NOISE_DENSITY,
      mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH,
      extra_tokens_per_span_inputs=1, extra_tokens_per_span_targets=1)
  return targets_length


def span_corruption(dataset, sequence_length, output_features):
  """`t5.data.preprocessors.span_corruption` with T5's settings; too short targets raise DataError."""
  needed = span_corruption_targets_length(sequence_length['inputs'])
  if sequence_length['targets'] < needed:
    raise DataError(
        f"Span corruption with inputs length {sequence_length['inputs']} makes targets of "
        f"{needed} tokens, but the targets length is {sequence_length['targets']}. Set the "
        f'targets length to at least {needed}.')
  return t5_preprocessors.span_corruption(
      dataset, sequence_length, output_features, noise_density=NOISE_DENSITY,
      mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH)


def c4_span_corruption_task(vocabulary, tfds_name: str = 'c4/en:3.1.0',
                            tfds_data_dir: str | None = None) -> seqio.Task:
  """Span corruption on a prepared TFDS copy of C4 (never downloaded here: `read_only`)."""
  source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=SPLITS,
                                read_only=True)
  return _register('c4_span_corruption', source, vocabulary, tfds_name, tfds_data_dir)


@gin.configurable
def offline_span_corruption_task(vocabulary, cache_dir: str | None = None,
                                 corpus: str = 'cpython') -> seqio.Task:
  """Span corruption on an offline corpus (one paragraph per line), building it if needed.

  `corpus` is one of `offline_corpus.CORPORA`; a study selects the bigger one with the gin binding
  `offline_span_corruption_task.corpus = 'packages'`.
  """
  files = offline_corpus.corpus_files(cache_dir, corpus)
  source = seqio.TextLineDataSource(split_to_filepattern={s: files[s] for s in SPLITS})
  return _register('offline_span_corruption', source, vocabulary, files['train'], files['validation'],
                   first=[_line_to_text])


@seqio.map_over_dataset
def _line_to_text(line):
  """A text-line source yields bare strings; the pipeline expects a `text` feature, as in TFDS C4."""
  return {'text': line}


def get_task(name: str, *, vocabulary, tfds_data_dir: str | None = None) -> seqio.Task:
  """The task called `name` (one of `TASK_NAMES`) with `vocabulary`; unknown names raise DataError."""
  if name == 'c4_span_corruption':
    return c4_span_corruption_task(vocabulary, tfds_data_dir=tfds_data_dir)
  if name == 'offline_span_corruption':
    return offline_span_corruption_task(vocabulary)
  raise DataError(f"Unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}.")


def _register(base: str, source, vocabulary, *depends_on, first=()) -> seqio.Task:
  """Registers (once) and returns the span-corruption task on `source`, named after its inputs."""
  model = getattr(vocabulary, 'sentencepiece_model_file', None) or repr(vocabulary)
  key = '|'.join(str(x) for x in (model, getattr(vocabulary, 'extra_ids', ''), *depends_on))
  name = f'{base}_{hashlib.sha256(key.encode()).hexdigest()[:8]}'
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  features = {
      'inputs': seqio.Feature(vocabulary, add_eos=True, required=False),
      'targets': seqio.Feature(vocabulary, add_eos=True),
  }
  return seqio.TaskRegistry.add(
      name, source=source, output_features=features, metric_fns=[],
      preprocessors=[
          *first,
          functools.partial(t5_preprocessors.rekey, key_map={'inputs': None, 'targets': 'text'}),
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          span_corruption,
          seqio.preprocessors.append_eos_after_trim,
      ])

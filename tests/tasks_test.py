"""Tests of the data package: offline corpus and vocabulary, span-corruption tasks, trainer batches.

Everything runs offline: the corpus comes from CPython's own documentation, C4 is replaced by
`tfds.testing.mock_data`, and the cache lives in a temporary folder (the vocabulary trains once).
"""

import os
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks
from scaling_arch.errors import DataError
from tasks import vocabularies

LENGTHS = {'inputs': 128, 'targets': 32}
BATCH = 8
SENTENCE = 'The interpreter raises an exception when the argument is not a string.'


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """A fresh SCALING_ARCH_CACHE for this module, so nothing depends on the user's cache."""
  with pytest.MonkeyPatch.context() as mp:
    path = str(tmp_path_factory.mktemp('scaling_arch_cache'))
    mp.setenv('SCALING_ARCH_CACHE', path)
    yield path


@pytest.fixture(scope='module')
def vocab(cache):
  """The offline vocabulary, trained once for the module (default size 4000 + 100 sentinels)."""
  del cache
  return tasks.offline_vocabulary()


@pytest.fixture(scope='module')
def task(vocab):
  return tasks.get_task('offline_span_corruption', vocabulary=vocab)


def batches(task, n=1, **kwargs):
  """The first `n` batches of `tasks.get_dataset` as numpy dicts (training settings by default)."""
  settings = dict(split='train', feature_lengths=LENGTHS, global_batch_size=BATCH, seed=0,
                  shuffle=True, repeat=True)
  settings.update(kwargs)
  it = iter(tasks.get_dataset(task, **settings))
  return [{k: v.numpy() for k, v in next(it).items()} for _ in range(n)]


@pytest.fixture(scope='module')
def seed0_batches(task):
  return batches(task, n=2)


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corpus_is_deterministic_and_nontrivial(cache, tmp_path):
  paths = tasks.corpus_files()
  assert set(paths) == {'train', 'validation'}
  assert all(p.startswith(cache) for p in paths.values())
  train = open(paths['train'], encoding='utf-8').read()
  validation = open(paths['validation'], encoding='utf-8').read()
  assert len(train.encode()) > 1_000_000 and train.count('\n') > 5000
  assert 10_000 < len(validation.encode()) < len(train.encode()) / 10
  assert '\n\n' not in train and ' the ' in train and 'exception' in train
  mtime = os.path.getmtime(paths['train'])
  assert tasks.corpus_files() == paths and os.path.getmtime(paths['train']) == mtime  # reused
  other = tasks.corpus_files(str(tmp_path))  # built again from scratch: the same bytes
  assert open(other['train'], encoding='utf-8').read() == train
  assert open(other['validation'], encoding='utf-8').read() == validation


def test_offline_vocabulary_is_cached_and_round_trips(vocab, cache):
  model = os.path.join(cache, 'vocab', 'offline_spm_4000.model')
  assert vocab.sentencepiece_model_file == model
  mtime = os.path.getmtime(model)
  start = time.perf_counter()
  again = tasks.offline_vocabulary()
  assert time.perf_counter() - start < 1.0
  assert again.sentencepiece_model_file == model and os.path.getmtime(model) == mtime
  assert vocab.vocab_size == 4100 and vocab.extra_ids == 100
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  ids = vocab.encode(SENTENCE)
  assert vocab.decode(ids) == SENTENCE
  assert len(ids) <= 1.5 * len(SENTENCE.split())  # common English words are whole pieces
  assert vocab.unk_id not in ids and max(ids) < 4000
  assert tasks.padded_vocab_size(vocab) == 4224


def test_padded_vocab_size_rounds_up():
  class Fake:
    vocab_size = 32100
  assert tasks.padded_vocab_size(Fake()) == 32128
  Fake.vocab_size = 256
  assert tasks.padded_vocab_size(Fake()) == 256
  assert tasks.padded_vocab_size(Fake(), multiple=100) == 300


def test_concurrent_first_use_trains_once(cache, monkeypatch):
  del cache
  calls = []
  train = vocabularies._train
  monkeypatch.setattr(vocabularies, '_train', lambda *a: (calls.append(a), train(*a)))
  results = [None, None]

  def use(i):
    results[i] = tasks.offline_vocabulary(vocab_size=1000)

  threads = [threading.Thread(target=use, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1
  assert results[0].sentencepiece_model_file == results[1].sentencepiece_model_file
  assert results[0].vocab_size == results[1].vocab_size == 1100


def test_vocabulary_from_path(vocab):
  same = tasks.get_vocabulary(vocab.sentencepiece_model_file)
  assert same.encode(SENTENCE) == vocab.encode(SENTENCE)
  with pytest.raises(DataError, match='does not exist'):
    tasks.sentencepiece_vocabulary('/nonexistent/spm.model')
  with pytest.raises(DataError, match='does not exist'):
    tasks.get_vocabulary('/nonexistent/spm.model')
  with pytest.raises(DataError, match='spm.model'):  # gs:// offline fails to read, or is missing
    tasks.sentencepiece_vocabulary('gs://scaling-arch-no-such-bucket/spm.model')


def test_tasks_register_once_per_vocabulary(vocab, task):
  assert tasks.get_task('offline_span_corruption', vocabulary=vocab) is task
  other = tasks.sentencepiece_vocabulary(vocab.sentencepiece_model_file, extra_ids=50)
  assert tasks.get_task('offline_span_corruption', vocabulary=other).name != task.name
  c4 = tasks.get_task('c4_span_corruption', vocabulary=vocab, tfds_data_dir='/x')
  assert c4.name.startswith('c4_span_corruption_') and c4.splits == ('train', 'validation')
  with pytest.raises(DataError, match='c4_span_corruption, offline_span_corruption'):
    tasks.get_task('wikipedia', vocabulary=vocab)


def test_offline_batches_are_packed_span_corruption(vocab, seed0_batches):
  batch = seed0_batches[0]
  assert sorted(batch) == sorted(tasks.data.FEATURES)
  for k, v in batch.items():
    assert v.dtype == np.int32, k
    assert v.shape == (BATCH, LENGTHS['inputs' if k.startswith('encoder') else 'targets']), k
  targets = batch['decoder_target_tokens']
  first_sentinel = vocab.vocab_size - vocab.extra_ids
  assert (targets >= first_sentinel).any() and (batch['encoder_input_tokens'] >= first_sentinel).any()
  assert (targets == vocab.eos_id).any()
  weights = batch['decoder_loss_weights']
  assert weights.sum() > BATCH * 10 and ((weights > 0) == (targets > 0)).all()
  # Packing bookkeeping: segments start at position 0, and decoder inputs are shifted targets.
  seg, pos = batch['decoder_segment_ids'], batch['decoder_positions']
  assert (pos[:, 0] == 0).all() and ((seg > 0) == (targets > 0)).all()
  same_segment = seg[:, 1:] == seg[:, :-1]
  np.testing.assert_array_equal(
      np.where(same_segment, batch['decoder_input_tokens'][:, 1:], 0),
      np.where(same_segment, targets[:, :-1], 0))


def test_same_seed_same_batches_other_seed_differs(task, seed0_batches):
  again = batches(task, n=2)
  for a, b in zip(seed0_batches, again):
    assert_same(a, b)
  other = batches(task, n=1, seed=1)[0]
  assert not np.array_equal(other['encoder_input_tokens'], seed0_batches[0]['encoder_input_tokens'])


def test_process_slices_concatenate_to_global_batch(task, seed0_batches):
  halves = [batches(task, n=2, process_index=i, process_count=2) for i in range(2)]
  for step, full in enumerate(seed0_batches):
    for k in full:
      assert halves[0][step][k].shape[0] == BATCH // 2
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][k], halves[1][step][k]]), full[k], err_msg=k)
  with pytest.raises(DataError, match='multiple of the process count'):
    tasks.get_dataset(task, split='train', feature_lengths=LENGTHS, global_batch_size=6, seed=0,
                      shuffle=True, repeat=True, process_index=0, process_count=4)


def test_iterator_checkpoint_restores_input_position(task, tmp_path):
  settings = dict(split='train', feature_lengths=LENGTHS, global_batch_size=BATCH, seed=0,
                  shuffle=True, repeat=True)
  it = iter(tasks.get_dataset(task, **settings))
  next(it)
  path = tf.train.Checkpoint(iterator=it).save(str(tmp_path / 'input'))
  expected = {k: v.numpy() for k, v in next(it).items()}
  restored = iter(tasks.get_dataset(task, **settings))
  tf.train.Checkpoint(iterator=restored).restore(path).assert_consumed()
  assert_same({k: v.numpy() for k, v in next(restored).items()}, expected)


def test_unpacked_validation_is_finite_with_segments(task):
  ds = tasks.get_dataset(task, split='validation', feature_lengths=LENGTHS,
                         global_batch_size=BATCH, seed=0, shuffle=False, repeat=False, pack=False)
  all_batches = [{k: v.numpy() for k, v in b.items()} for b in ds]
  assert len(all_batches) >= 5
  batch = all_batches[0]
  for prefix, tokens in (('encoder', 'encoder_input_tokens'), ('decoder', 'decoder_target_tokens')):
    seg = batch[f'{prefix}_segment_ids']
    np.testing.assert_array_equal(seg, (batch[tokens] != 0).astype(np.int32))
    np.testing.assert_array_equal(batch[f'{prefix}_positions'], np.arange(seg.shape[1]) * seg)


def test_too_short_targets_raise(task):
  with pytest.raises(DataError, match='at least 29'):
    tasks.get_dataset(task, split='train', feature_lengths={'inputs': 128, 'targets': 16},
                      global_batch_size=BATCH, seed=0, shuffle=False, repeat=True)
  assert tasks.span_corruption_targets_length(512) == 114


def test_c4_task_through_mock_tfds(vocab, tmp_path):
  task = tasks.get_task('c4_span_corruption', vocabulary=vocab, tfds_data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=16):
    ds = tasks.get_dataset(task, split='validation', feature_lengths={'inputs': 64, 'targets': 16},
                           global_batch_size=4, seed=0, shuffle=False, repeat=True)
    batch = {k: v.numpy() for k, v in next(iter(ds)).items()}
  assert batch['encoder_input_tokens'].shape == (4, 64)
  assert batch['decoder_target_tokens'].shape == (4, 16)
  assert batch['decoder_loss_weights'].sum() > 0
  assert (batch['decoder_target_tokens'] >= vocab.vocab_size - vocab.extra_ids).any()


def test_missing_tfds_dataset_raises(vocab, tmp_path):
  task = tasks.get_task('c4_span_corruption', vocabulary=vocab, tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    tasks.get_dataset(task, split='train', feature_lengths=LENGTHS, global_batch_size=BATCH,
                      seed=0, shuffle=True, repeat=True)
  message = str(e.value)
  assert 'c4/en:3.1.0' in message and str(tmp_path) in message and 'tfds build' in message
  assert os.listdir(tmp_path) == []  # nothing was downloaded or prepared
  unknown = tasks.c4_span_corruption_task(vocab, tfds_name='no_such_dataset/en:1.0.0',
                                          tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError, match='no_such_dataset'):
    tasks.get_dataset(unknown, split='validation', feature_lengths=LENGTHS,
                      global_batch_size=BATCH, seed=0, shuffle=False, repeat=False)


def test_cloze_examples_are_balanced_over_the_answers_and_deterministic():
  from tasks import finetuning
  choices = finetuning.CLOZE_CHOICES
  lines = [f"x{k} alpha {w} beta{k} gamma" for w in choices for k in range(2)]
  lines += ["the of and to in is a common opening",           # the first six words' streams get a third
            "a b c off too The Of",                              # no choice (exactly): in no stream
            " ".join(f"w{i}" for i in range(40)) + " the"]       # 'the' past the first 32 words
  ds = finetuning._balanced_cloze(tf.data.Dataset.from_tensor_slices(lines))
  first, second = list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator())
  assert first == second
  targets = [ex["targets"].decode() for ex in first]
  # In turn, one per answer, until an answer's lines run out ('for' after two rounds).
  assert targets == list(choices) * 2 + list(choices[:6])
  for ex in first:
    inputs, target = ex["inputs"].decode(), ex["targets"].decode()
    assert inputs.startswith("fill in: ") and inputs.count(finetuning.CLOZE_BLANK) == 1
    restored = inputs[len("fill in: "):].replace(finetuning.CLOZE_BLANK, target)
    assert restored in lines[:-2], restored


def test_offline_scores_are_the_downstream_score_only_without_benchmarks():
  from scaling_arch import downstream
  offline = downstream.downstream_score({"sa_offline_cloze": {"sequence_accuracy": 12.5}})
  assert offline["downstream_score"] == offline["offline_score"] == pytest.approx(12.5)
  assert offline["task_scores"] == {"sa_offline_cloze": 12.5}
  mixed = downstream.downstream_score({"sa_offline_cloze": {"sequence_accuracy": 12.5},
                                       "sa_squad": {"em": 50.0, "f1": 70.0}})
  assert "offline_score" not in mixed and "downstream_score" not in mixed  # GLUE / SuperGLUE missing
  assert mixed["squad_score"] == pytest.approx(60.0)

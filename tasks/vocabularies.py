"""SentencePiece vocabularies: the T5 one for real runs, and one trained offline for runs without network.

Both follow T5's conventions (pad 0, EOS 1, UNK 2, no BOS) and add `extra_ids` sentinel ids at the top
of the vocabulary for span corruption.
"""

import fcntl
import io
import os

import gin
import seqio
import sentencepiece as spm
import tensorflow as tf

from scaling_arch.errors import DataError
from tasks import cache
from tasks import offline_corpus

T5_VOCABULARY = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
NUM_THREADS = 4  # fixed, so the trained model does not depend on the machine


def sentencepiece_vocabulary(path: str, extra_ids: int = 100) -> seqio.SentencePieceVocabulary:
  """Returns the SentencePiece model at `path` (local or gs://) with `extra_ids` sentinels."""
  try:
    exists, problem = tf.io.gfile.exists(path), 'does not exist'
  except tf.errors.OpError as e:  # e.g. gs:// without network or credentials
    exists, problem = False, f'cannot be read ({e.message.strip()})'
  if not exists:
    raise DataError(
        f'SentencePiece model {path!r} {problem}. Pass the path of a .model file (the T5 '
        f'vocabulary is {T5_VOCABULARY}, which needs Cloud access), or pass no path to use the '
        'offline vocabulary trained on the local corpus.')
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


@gin.configurable
def offline_vocabulary(vocab_size: int = 4000, extra_ids: int = 100, cache_dir: str | None = None,
                       corpus: str = 'cpython') -> seqio.SentencePieceVocabulary:
  """Returns a unigram SentencePiece vocabulary trained on the offline corpus (train split).

  Trained at first use into `<cache>/vocab/offline_spm_<vocab_size>.model` and reused afterwards; a
  vocabulary of another offline corpus (gin: `offline_vocabulary.corpus = 'packages'`) goes to
  `offline_spm_<vocab_size>_<corpus folder>.model`.
  Processes that start at once serialize on a lock file (the later ones find the model done); the
  model is written to a temporary file and moved into place, so no reader sees a partial model.
  """
  folder = os.path.join(cache_dir or cache.cache_dir(), 'vocab')
  files = offline_corpus.corpus_files(cache_dir, corpus) if corpus != 'cpython' else None
  suffix = f'_{os.path.basename(os.path.dirname(files["train"]))}' if files else ''
  model = os.path.join(folder, f'offline_spm_{vocab_size}{suffix}.model')
  if not os.path.exists(model):
    os.makedirs(folder, exist_ok=True)
    with open(model + '.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.exists(model):  # another process may have trained it while we waited
        _train((files or offline_corpus.corpus_files(cache_dir))['train'], model, vocab_size)
  return seqio.SentencePieceVocabulary(model, extra_ids=extra_ids)


def _train(text_file: str, model: str, vocab_size: int) -> None:
  """Trains a deterministic unigram model on `text_file` and writes it atomically to `model`.

  The text goes in as an iterator and the model comes back as bytes, so no file path (which differs
  between machines) ends up inside the model: the same corpus gives the same bytes.
  """
  proto = io.BytesIO()
  with open(text_file, encoding='utf-8') as lines:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines, model_writer=proto, model_type='unigram',
          vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
          character_coverage=1.0, shuffle_input_sentence=False, input_sentence_size=0,
          max_sentence_length=16384, num_threads=NUM_THREADS, minloglevel=2)
    except RuntimeError as e:
      raise DataError(f'Could not train a {vocab_size}-piece vocabulary on {text_file}: {e}. '
                      'Choose a smaller offline vocabulary size.') from e
  cache.atomic_write(model, proto.getvalue())


def padded_vocab_size(vocabulary, multiple: int = 128) -> int:
  """`vocabulary.vocab_size` rounded up to a multiple of `multiple` (32100 -> 32128 embedding rows)."""
  return -(-vocabulary.vocab_size // multiple) * multiple


def get_vocabulary(spm_path: str | None = None, offline_vocab_size: int = 4000):
  """The vocabulary at `spm_path` when given, else the offline vocabulary of `offline_vocab_size`."""
  if spm_path:
    return sentencepiece_vocabulary(spm_path)
  return offline_vocabulary(offline_vocab_size)

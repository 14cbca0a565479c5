"""Tests of the `packages` offline corpus (tasks/package_corpus.py) and of choosing an offline corpus.

The corpus is built from two small installed packages (absl, joblib) without the CPython part, into
temporary cache folders; the full corpus (minutes) is never built here.
"""

import functools
import importlib.metadata
import json
import os
import re
import sys

import gin
import pytest

import tasks
from scaling_arch.errors import DataError
from tasks import offline_corpus
from tasks import package_corpus

SMALL = ('absl', 'joblib')
DOCSTRING = '''Resize the image.

Resizing keeps the number of channels and the data type of the input image.

Args:
    image (`np.ndarray`):
        Image to resize. It must be a **numpy** array of the right size.
    size (`dict[str, int]`, *optional*, defaults to 3): The size of the output image after resizing it.
    resample: The filter used for resampling the image when it is resized.

Returns:
    `np.ndarray`: The resized image, with the same number of channels as the input.

Note:
    The result of this function depends on the :func:`~PIL.Image.resize` filter that is chosen.

Parameters
----------
x : array_like
    The input array, which must be at least two-dimensional for this to work.

This paragraph shows a literal block of code that follows it and is dropped::

    for row in image:
        print(row.sum(), "is the sum of the row")

.. math::

    y = \\sum_{i=0}^{n} x_i \\quad \\text{for all the values in the array}

Examples
--------
This text is in the examples section, so it is dropped from the corpus.
>>> resize(image, size=3)
array([1, 2, 3])
'''


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """The corpus of `SMALL` (no CPython part), built once for the module."""
  folder = str(tmp_path_factory.mktemp('corpus_cache'))
  paths = package_corpus.corpus_files(folder, packages=SMALL, with_cpython=False)
  lines = {s: open(paths[s], encoding='utf-8').read().splitlines() for s in ('train', 'validation')}
  with open(paths['manifest'], encoding='utf-8') as f:
    manifest = json.load(f)
  return folder, paths, lines, manifest


def test_docstring_cleaning_keeps_prose_and_drops_code_lists_and_examples():
  assert package_corpus.prose_paragraphs(DOCSTRING) == [
      'Resizing keeps the number of channels and the data type of the input image.',
      'Image to resize. It must be a numpy array of the right size.',
      'The size of the output image after resizing it.',
      'The filter used for resampling the image when it is resized.',
      'The resized image, with the same number of channels as the input.',
      'The result of this function depends on the PIL.Image.resize filter that is chosen.',
      'The input array, which must be at least two-dimensional for this to work.',
      'This paragraph shows a literal block of code that follows it and is dropped:',
  ]  # 'Resize the image.' is shorter than MIN_PARAGRAPH_WORDS


def test_comment_blocks_of_python_files_and_headers_become_paragraphs(tmp_path):
  py = tmp_path / 'module.py'
  py.write_text('#!/usr/bin/env python\n'
                '# We sort the keys first, so that the output does not depend on the\n'
                '# order in which the entries were inserted.\n'
                '#\n'
                '# x = sorted(entries, key=lambda e: e.name)\n'
                'x = 1  # a trailing comment is not a paragraph of the corpus at all\n'
                '# from collections import OrderedDict\n')
  assert package_corpus.comments(str(py)) == [
      'We sort the keys first, so that the output does not depend on the order in which the entries '
      'were inserted.']
  header = tmp_path / 'api.h'
  header.write_text('/* Copyright 2024 The Authors.\n'
                    ' *\n'
                    ' * Licensed under the terms that are written in the file that comes with it.\n'
                    ' */\n'
                    '#include <vector>\n'
                    '// Returns the number of elements in the buffer, which is zero when the\n'
                    '// buffer has not been allocated yet.\n'
                    'int size() const;  // the size of it, in elements of the buffer type\n'
                    '/** A short block comment that is on a single line of the header. */\n'
                    '// for (int i = 0; i < n; ++i) {\n')
  assert package_corpus.header_comments(str(header)) == [
      'Licensed under the terms that are written in the file that comes with it.',
      'Returns the number of elements in the buffer, which is zero when the buffer has not been '
      'allocated yet.',
      'A short block comment that is on a single line of the header.']


@pytest.mark.parametrize('text', [
    'x = np.zeros((3, 4), dtype=np.float32); y = x[:, 1:] * 2',
    'self.assertEqual(foo_bar(a, b), {"key": [1, 2, 3]})',
    'Die Funktion berechnet die Summe der Elemente des Arrays entlang einer Achse.',
    'BertModel GPT2Model RobertaModel XLNetModel AlbertModel ElectraModel T5Model',
    'Returns the value.',
])
def test_code_tables_identifiers_foreign_and_short_text_are_not_prose(text):
  assert not package_corpus.is_prose(package_corpus.clean_markup(text))


def test_near_duplicates_share_a_key_and_different_text_does_not():
  keys = package_corpus.dedup_keys
  bert = keys('The bare Bert Model transformer outputting raw hidden-states without any specific head.')
  gpt2 = keys('The bare GPT2 Model transformer outputting raw hidden-states without any specific head.')
  assert set(bert) & set(gpt2)
  assert keys('the  Bare bert model, transformer.') == keys('The bare BERT model transformer')[:1]
  other = keys('The bare model returns the hidden states of every layer, without a head on top.')
  assert not set(bert) & set(other)


def test_small_corpus_is_deduplicated_prose_with_disjoint_splits(small):
  _, _, lines, manifest = small
  everything = lines['train'] + lines['validation']
  assert len(everything) > 300 and len(lines['validation']) > 10
  keys = [k for line in everything for k in package_corpus.dedup_keys(line)]
  assert len(keys) == len(set(keys))  # no paragraph twice, in a split or across the two
  assert all(package_corpus.is_prose(line) for line in everything)
  code = re.compile(r'>>>|^def \w+\(|^class \w+[(:]|^import [\w.]+$|^from [\w.]+ import |\w\(\w*\):$')
  assert not [line for line in everything if code.search(line)]
  splits = manifest['splits']
  total = splits['train']['documents'] + splits['validation']['documents']
  assert splits['validation']['documents'] == total // 20  # every 20th document
  sources = manifest['sources']
  assert set(sources) == {'absl', 'absl:comments', 'joblib', 'joblib:comments'}
  assert sum(c['documents'] for c in sources.values()) == sum(
      s['documents'] for s in manifest['splits'].values())
  assert all(c['duplicates'] >= 0 for c in sources.values()) and sources['joblib']['documents'] > 20
  for split, ranges in manifest['line_ranges'].items():  # each source is a run of lines
    assert sum(n for _, n in ranges) == len(lines[split])


def test_manifest_has_versions_and_the_build_is_deterministic_and_reused(small, tmp_path):
  folder, paths, lines, manifest = small
  assert manifest['packages'] == {
      name: f'{name}=={importlib.metadata.version(name)}' for name in ('joblib',)} | {
          'absl': f'absl-py=={importlib.metadata.version("absl-py")}'}
  assert manifest['python'] == sys.version.split()[0]
  assert f'packages-{package_corpus.VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}-' in paths['train']
  mtime = os.path.getmtime(paths['train'])
  assert package_corpus.corpus_files(folder, packages=SMALL, with_cpython=False) == paths
  assert os.path.getmtime(paths['train']) == mtime  # reused, not rebuilt
  again = package_corpus.corpus_files(str(tmp_path), packages=SMALL, with_cpython=False)
  for name in ('train', 'validation', 'manifest'):
    assert open(again[name], 'rb').read() == open(paths[name], 'rb').read(), name
  other = package_corpus.corpus_files(str(tmp_path), packages=('absl',), with_cpython=False)
  assert os.path.dirname(other['train']) != os.path.dirname(again['train'])  # other packages, other corpus


@pytest.fixture
def packages_is_small(monkeypatch, small):
  """Makes `corpus='packages'` select the small corpus, in a cache folder of its own."""
  folder = small[0]
  monkeypatch.setenv('SCALING_ARCH_CACHE', folder)
  monkeypatch.setattr(package_corpus, 'corpus_files', functools.partial(
      package_corpus.corpus_files, packages=SMALL, with_cpython=False))
  return small


def test_token_counts_add_up_per_source(packages_is_small):
  folder, paths, lines, _ = packages_is_small
  vocab = tasks.offline_vocabulary(vocab_size=600, cache_dir=folder, corpus='packages')
  counts = package_corpus.token_counts(paths, vocab.sentencepiece_model_file)
  for split in ('train', 'validation'):
    direct = sum(len(vocab.tokenizer.encode(line)) for line in lines[split])
    assert counts[split]['total'] == direct > 0
    assert sum(n for source, n in counts[split].items() if source != 'total') == direct


def test_a_gin_binding_selects_the_corpus_of_the_task_and_the_vocabulary(packages_is_small):
  folder, paths, _, _ = packages_is_small
  assert offline_corpus.corpus_files(corpus='packages') == {s: paths[s] for s in ('train', 'validation')}
  with pytest.raises(DataError, match="Unknown offline corpus 'wiki'; known corpora: cpython, packages"):
    offline_corpus.corpus_files(corpus='wiki')
  gin.parse_config("offline_vocabulary.corpus = 'packages'\n"
                   "offline_span_corruption_task.corpus = 'packages'")
  vocab = tasks.get_vocabulary(None, offline_vocab_size=600)
  model = os.path.basename(vocab.sentencepiece_model_file)
  assert model == f'offline_spm_600_{os.path.basename(os.path.dirname(paths["train"]))}.model'
  task = tasks.get_task('offline_span_corruption', vocabulary=vocab)
  assert task.source.list_shards('train') == [paths['train']]
  assert task.source.list_shards('validation') == [paths['validation']]

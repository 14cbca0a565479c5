"""An English text corpus that exists on any machine with CPython, for runs and tests without network.

The text is the reference documentation CPython ships: the help topics in `pydoc_data.topics` plus the
docstrings of a fixed list of pure-Python standard-library modules, read from source with `ast` (nothing
is imported or executed). Each docstring, and each ~4000-character piece of a help topic, is one
document; documents are cut into paragraphs (wrapped lines joined), written one paragraph per line.
Every 20th document goes to the validation split (about 4% of the text), so no document is split
across train and validation. The files are built once into the cache folder and reused; the content
depends only on the Python version, whose tag is in the path.

This is the `cpython` corpus, the default. `corpus='packages'` selects the bigger corpus of
tasks/package_corpus.py (this one plus the prose of the installed packages).
"""

import ast
import os
import re
import sys
import sysconfig

from scaling_arch.errors import DataError
from tasks import cache

VERSION = 'v1'
CORPORA = ('cpython', 'packages')  # the offline corpora by name; the first is the default
VALIDATION_EVERY = 20  # document i goes to validation when i % 20 == 19
MIN_WORDS = 20  # shorter docstrings are mostly one-liners like "Return x."
MAX_CHARS = 4000  # longer help topics are cut into documents of about this size, for an even split

# Standard-library modules and packages (tests excluded) whose docstrings join the corpus, in this order:
# those whose source is at least ~14% docstring prose, as parsing source is the slow part (~3 s).
# Names missing from the running Python are skipped.
MODULES = (
    '_pydecimal', 'base64', 'bdb', 'cmd', 'codecs', 'concurrent', 'configparser', 'copy', 'difflib',
    'doctest', 'email', 'filecmp', 'fractions', 'ftplib', 'getopt', 'hmac', 'http', 'importlib',
    'inspect', 'ipaddress', 'json', 'logging', 'lzma', 'numbers', 'optparse', 'os', 'pdb', 'pkgutil',
    'platform', 'poplib', 'queue', 'random', 'sched', 'secrets', 'shelve', 'shutil', 'smtplib',
    'socket', 'socketserver', 'ssl', 'statistics', 'tempfile', 'textwrap', 'threading', 'timeit',
    'traceback', 'turtle', 'typing', 'unittest', 'uuid', 'wave', 'xml',
)
_SKIP_DIRS = {'test', 'tests', 'idle_test', '__pycache__'}


def corpus_files(cache_dir: str | None = None, corpus: str = 'cpython') -> dict[str, str]:
  """Returns `{'train': path, 'validation': path}`, building the corpus on first use.

  Args:
    cache_dir: folder for the files; `tasks.cache.cache_dir()` when None.
    corpus: one of `CORPORA`: 'cpython' (this module) or 'packages' (tasks/package_corpus.py).
  """
  if corpus == 'packages':
    from tasks import package_corpus  # pylint: disable=g-import-not-at-top
    files = package_corpus.corpus_files(cache_dir)
    return {split: files[split] for split in ('train', 'validation')}
  if corpus != 'cpython':
    raise DataError(f"Unknown offline corpus {corpus!r}; known corpora: {', '.join(CORPORA)}.")
  folder = os.path.join(cache_dir or cache.cache_dir(), 'offline_corpus',
                        f'{VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}')
  paths = {split: os.path.join(folder, f'{split}.txt') for split in ('train', 'validation')}
  if not all(os.path.exists(p) for p in paths.values()):
    splits = split_documents(documents())
    for split, path in paths.items():
      cache.atomic_write(path, ''.join(p + '\n' for doc in splits[split] for p in doc))
  return paths


def documents() -> list[list[str]]:
  """Returns every document of the corpus as a list of paragraphs, in a fixed order."""
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('The offline corpus needs `pydoc_data`, which this Python lacks; use a full '
                    'CPython install, or train on C4 with a SentencePiece vocabulary instead.') from e
  texts = [topics.topics[key] for key in sorted(topics.topics)]
  texts += _stdlib_docstrings()
  docs = [chunk for t in texts for chunk in _chunks(paragraphs(t))]
  return [d for d in docs if sum(len(p.split()) for p in d) >= MIN_WORDS]


def _chunks(paras: list[str]) -> list[list[str]]:
  """Groups consecutive paragraphs into documents of at least MAX_CHARS (except the last)."""
  chunks, current = [], []
  for p in paras:
    current.append(p)
    if sum(len(c) for c in current) >= MAX_CHARS:
      chunks.append(current)
      current = []
  return chunks + [current] if current else chunks


def split_documents(docs: list[list[str]]) -> dict[str, list[list[str]]]:
  """Deterministic split: document i goes to validation when i % 20 == 19, else to train."""
  return {
      'train': [d for i, d in enumerate(docs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1],
      'validation': [d for i, d in enumerate(docs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1],
  }


def paragraphs(text: str) -> list[str]:
  """Splits text at blank lines and joins each paragraph's lines; drops interactive (>>>) examples."""
  out = []
  for block in re.split(r'\n\s*\n', text):
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    if not lines or any(line.startswith('>>>') for line in lines):
      continue
    out.append(' '.join(' '.join(lines).split()))
  return out


def _stdlib_docstrings() -> list[str]:
  """Docstrings (module, class, function) of `MODULES`, parsed from source without importing."""
  stdlib = sysconfig.get_paths()['stdlib']
  texts = []
  for name in MODULES:
    for path in _module_files(stdlib, name):
      with open(path, encoding='utf-8') as f:
        try:
          tree = ast.parse(f.read(), filename=path)
        except SyntaxError:
          continue
      nodes = [tree] + [n for n in ast.walk(tree)
                        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
      texts += [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]
  return texts


def _module_files(stdlib: str, name: str) -> list[str]:
  """The .py files of one stdlib module or package (sorted, tests excluded); [] if absent."""
  single = os.path.join(stdlib, name + '.py')
  if os.path.isfile(single):
    return [single]
  files = []
  for root, dirs, names in os.walk(os.path.join(stdlib, name)):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    files += [os.path.join(root, n) for n in sorted(names) if n.endswith('.py')]
  return files

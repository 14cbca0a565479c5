"""An English text corpus that exists on any machine with CPython, for runs and tests without network.

The text is the reference documentation CPython ships: the help topics in `pydoc_data.topics` plus the
docstrings of a fixed list of pure-Python standard-library modules, read from source with `ast` (nothing
is imported or executed). Each help topic or docstring is one document; documents are cut into
paragraphs (wrapped lines joined), and written one paragraph per line. Every 20th document goes to the
validation split, so no document is split across train and validation. The files are built once into
the cache folder and reused; the content depends only on the Python version, whose tag is in the path.
"""

import ast
import os
import re
import sys
import sysconfig

from scaling_arch.errors import DataError
from tasks import cache

VERSION = 'v1'
VALIDATION_EVERY = 20  # document i goes to validation when i % 20 == 19
MIN_WORDS = 20  # shorter docstrings are mostly one-liners like "Return x."

# Standard-library modules and packages (tests excluded) whose docstrings join the corpus, in this order.
# Names missing from the running Python are skipped.
MODULES = (
    '_pydecimal', 'argparse', 'ast', 'asyncio', 'base64', 'bdb', 'calendar', 'cmd', 'codecs',
    'collections', 'concurrent', 'configparser', 'contextlib', 'copy', 'csv', 'dataclasses', 'datetime',
    'difflib', 'dis', 'doctest', 'email', 'enum', 'filecmp', 'fnmatch', 'fractions', 'ftplib',
    'functools', 'getopt', 'gettext', 'glob', 'gzip', 'heapq', 'hmac', 'html', 'http', 'imaplib',
    'importlib', 'inspect', 'ipaddress', 'json', 'locale', 'logging', 'lzma', 'mailbox',
    'multiprocessing', 'netrc', 'numbers', 'optparse', 'os', 'pathlib', 'pdb', 'pickle', 'pickletools',
    'pkgutil', 'platform', 'plistlib', 'poplib', 'pprint', 'profile', 'pstats', 'pydoc', 'queue',
    'random', 're', 'reprlib', 'sched', 'secrets', 'selectors', 'shelve', 'shlex', 'shutil', 'smtplib',
    'socket', 'socketserver', 'sqlite3', 'ssl', 'statistics', 'string', 'subprocess', 'sysconfig',
    'tarfile', 'tempfile', 'textwrap', 'threading', 'timeit', 'tokenize', 'trace', 'traceback',
    'turtle', 'typing', 'unittest', 'urllib', 'uuid', 'warnings', 'wave', 'weakref', 'xml', 'zipfile',
    'zipimport',
)
_SKIP_DIRS = {'test', 'tests', 'idle_test', '__pycache__'}


def corpus_files(cache_dir: str | None = None) -> dict[str, str]:
  """Returns `{'train': path, 'validation': path}`, building the corpus on first use.

  Args:
    cache_dir: folder for the files; `tasks.cache.cache_dir()` when None.
  """
  folder = os.path.join(cache_dir or cache.cache_dir(), 'offline_corpus',
                        f'{VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}')
  paths = {split: os.path.join(folder, f'{split}.txt') for split in ('train', 'validation')}
  if not all(os.path.exists(p) for p in paths.values()):
    splits = split_documents(documents())
    for split, path in paths.items():
      cache.atomic_write_text(path, ''.join(p + '\n' for doc in splits[split] for p in doc))
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
  docs = [paragraphs(t) for t in texts]
  return [d for d in docs if sum(len(p.split()) for p in d) >= MIN_WORDS]


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

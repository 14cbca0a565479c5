"""A bigger offline English corpus: the CPython documentation plus the prose of the installed packages.

The `packages` corpus holds the documents of the `cpython` corpus (tasks/offline_corpus.py) first, then the
docstrings of the rest of the standard library, then, for each installed package of `PACKAGES` (numpy,
scipy, pandas, scikit-learn, matplotlib, nltk, transformers, tensorflow, ...), its docstrings, the .rst/.md
pages it ships and its whole-line comment blocks, and last the comments of the C/C++ headers in `HEADERS`
(tensorflow's and pyarrow's). Python files are parsed with `ast` and the rest is read as text (packages are
found with `importlib.util.find_spec`, which imports nothing); nothing is imported or executed. A file's
docstrings make one text, its comments another; long texts are cut into documents of about 4000 characters.

Each docstring is cleaned into prose paragraphs: doctest examples, literal and code blocks, reST directives,
Examples / See Also / References sections and the name/type lines of parameter lists are dropped (the
parameters' descriptions stay), markup roles and backticks are removed, and a paragraph is kept only if it
reads as English (enough words, few code symbols, enough common English words, mostly ASCII). Paragraphs are
deduplicated over the whole corpus, first one kept: exactly (case, punctuation and spacing folded) and near
exactly (the same sequence of plain lower-case words, which catches the model- and class-name templating of
transformers, tensorflow and keras docstrings). Documents are cut and split train / validation as the
`cpython` corpus is (`offline_corpus.split_documents`).

The corpus is built once into `<cache>/offline_corpus/packages-<VERSION>-py<X.Y>-<hash>/`, where the hash
covers the versions of the installed packages, so another set of versions builds another corpus; the
folder's `manifest.json` records those versions and the per-source counts. `python -m tasks.package_corpus`
builds it and prints its sources and its size in tokens of the offline vocabularies (the folder's path
does not cover this module's filters: change `VERSION` when changing them).
"""

import ast
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import sysconfig

from tasks import cache
from tasks import offline_corpus

NAME = 'packages'
VERSION = 'v1'
# Top-level packages whose docstrings join the corpus, in this order (missing ones are skipped).
PACKAGES = (
    'numpy', 'scipy', 'pandas', 'sklearn', 'matplotlib', 'nltk', 'transformers', 'tensorflow', 'keras',
    'jax', 'flax', 'optax', 'orbax', 'seqio', 't5', 'tensorflow_datasets', 'tensorflow_text',
    'mesh_tensorflow', 'tensorboard', 'huggingface_hub', 'pyglove', 'fontTools', 'PIL', 'pip',
    'setuptools', 'pydantic', 'pygments', 'rich', 'babel', 'absl', 'etils', 'h5py', 'joblib', 'pyarrow',
    'lxml', 'markdown', 'click', 'typer', 'yaml', 'gin', 'clu', 'ml_collections', 'chex', 'sympy',
    'networkx', 'torch',
)
# C/C++ header folders (source name, package, folders inside it) whose comments join the corpus after
# all the Python sources: TensorFlow's and XLA's own API headers, Arrow's, then those of the C++ libraries
# TensorFlow ships headers of (Abseil, protobuf, Eigen, LLVM/MLIR, StableHLO, gRPC, oneDNN, CUTLASS, ...).
HEADERS = (
    ('tensorflow:headers', 'tensorflow', ('include/tensorflow', 'include/xla', 'include/tsl')),
    ('pyarrow:headers', 'pyarrow', ('include',)),
    ('tensorflow:library_headers', 'tensorflow', ('include/absl', 'include/google', 'include/Eigen',
                                                  'include/unsupported', 'include/third_party',
                                                  'include/external')),
)
_SKIP_DIRS = {'test', 'tests', 'testing', 'idle_test', '__pycache__', 'site-packages', 'dist-packages',
              'examples', 'benchmarks', '_vendor'}
MIN_PARAGRAPH_WORDS = 6
# Sections whose content is code, cross references or citations, not prose.
_DROP_SECTIONS = {'examples', 'example', 'see also', 'references', 'reference', 'usage', 'example usage',
                  'doctest', 'code', 'sample usage', 'returns example'}
# Sections that are lists of `name : type` (numpydoc) or `name (type): text` (Google) items.
_LIST_SECTIONS = {'parameters', 'params', 'other parameters', 'args', 'arguments', 'keyword arguments',
                  'kwargs', 'returns', 'return', 'yields', 'yield', 'raises', 'raise', 'warns',
                  'attributes', 'methods', 'properties', 'fields', 'inputs', 'outputs', 'receives'}
_SECTION_NAMES = _DROP_SECTIONS | _LIST_SECTIONS | {'notes', 'note', 'warning', 'warnings', 'description',
                                                   'summary', 'details', 'background', 'tip'}
_STOPWORDS = frozenset(
    'a about above after all also an and any are as at be because been before being between both but by '
    'can could did do does each either for from has have how if in into is it its may might more most '
    'must no not of on one only or other otherwise same should so some such than that the their them '
    'then there these they this those through to under until used uses using very was we were what when '
    'where whether which while will with would you your'.split())
_CODE_START = re.compile(
    r'^(>>>|\.\.\.|\$ |def \w+\(|class \w+[(:]|import [\w.]+$|from [\w.]+ import |@\w|\{|\})')
_ADMONITION = re.compile(r'^\.\. (note|warning|tip|important|hint|attention|caution|deprecated|versionadded|'
                         r'versionchanged)::\s*(.*)$')
_ROLE = re.compile(r':(?:[\w-]+:)*[\w-]+:(?=`)')  # :func:`x`, :py:meth:`x`
_REFLINK = re.compile(r'\[`?~?([\w.]+)`?\]')  # [`~foo.Bar`] (the transformers doc builder)
_WORD = re.compile(r"^[(\"']?[A-Za-z][a-z]*(?:[-'][a-z]+)*[.,;:!?)\"']*$")
_ITEM = re.compile(r'^\*{0,2}\w+\*{0,2}\s*\((?:[^()]|\([^()]*\))*\)\s*:\s*(.*)$')  # `x (int, optional): text`
_UNDERLINE = re.compile(r'^\s*([-=~^*+#"`])\1{2,}\s*$')


def corpus_files(cache_dir: str | None = None, packages: tuple[str, ...] = PACKAGES,
                 with_cpython: bool = True) -> dict[str, str]:
  """Returns `{'train': path, 'validation': path, 'manifest': path}`, building the corpus on first use.

  Args:
    cache_dir: folder for the files; `tasks.cache.cache_dir()` when None.
    packages: the top-level packages to read (tests pass a small subset).
    with_cpython: whether the `cpython` corpus and the other standard-library docstrings come first.
  """
  key = manifest_key(packages, with_cpython)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
  folder = os.path.join(cache_dir or cache.cache_dir(), 'offline_corpus',
                        f'{NAME}-{VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}-{digest}')
  paths = {name: os.path.join(folder, f'{name}.{ext}')
           for name, ext in (('train', 'txt'), ('validation', 'txt'), ('manifest', 'json'))}
  if not all(os.path.exists(p) for p in paths.values()):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, '.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first users build it once
      if not all(os.path.exists(p) for p in paths.values()):
        _build(paths, key, packages, with_cpython)
  return paths


def manifest_key(packages: tuple[str, ...], with_cpython: bool) -> dict:
  """What the corpus depends on: its version, the Python version and each package's installed version."""
  dists = importlib.metadata.packages_distributions()
  versions = {}
  for name in packages:
    if _package_root(name) is None:
      versions[name] = None
      continue
    found = sorted(set(dists.get(name, [])))
    versions[name] = ','.join(f'{d}=={importlib.metadata.version(d)}' for d in found) or 'unknown'
  return {'corpus': f'{NAME}-{VERSION}', 'python': sys.version.split()[0], 'with_cpython': with_cpython,
          'packages': versions}


def _build(paths: dict[str, str], key: dict, packages: tuple[str, ...], with_cpython: bool) -> None:
  """Collects, cleans, deduplicates and splits the documents; writes the splits and the manifest."""
  seen: set[bytes] = set()
  docs, sources, stats = [], [], {}

  def add(source: str, texts, cleaned: bool = False) -> None:
    counts = stats.setdefault(source, {'documents': 0, 'paragraphs': 0, 'words': 0, 'duplicates': 0})
    for text in texts:
      paras = text if cleaned else prose_paragraphs(text)
      kept = []
      for p in paras:
        keys = dedup_keys(p)
        if any(k in seen for k in keys):
          counts['duplicates'] += 1
          continue
        seen.update(keys)
        kept.append(p)
      for chunk in offline_corpus._chunks(kept):  # pylint: disable=protected-access
        words = sum(len(p.split()) for p in chunk)
        if words >= offline_corpus.MIN_WORDS:
          docs.append(chunk)
          sources.append(source)
          counts['documents'] += 1
          counts['paragraphs'] += len(chunk)
          counts['words'] += words

  if with_cpython:
    add('cpython', offline_corpus.documents(), cleaned=True)
    stdlib = sysconfig.get_paths()['stdlib']
    taken = set(offline_corpus.MODULES)
    add('stdlib', (_docstring_prose(path) for path in _py_files(stdlib, top_level_only=True)
                   if _top_name(stdlib, path) not in taken), cleaned=True)
  for name in packages:
    root = _package_root(name)
    if root is not None:
      files = _py_files(root)
      add(name, (_docstring_prose(path) for path in files), cleaned=True)
      add(name, _doc_pages(root))
      add(f'{name}:comments', (comments(path) for path in files), cleaned=True)
  for source, name, folders in HEADERS:
    root = _package_root(name) if name in packages else None
    for folder in folders:
      if root is not None and os.path.isdir(os.path.join(root, folder)):
        add(source, (header_comments(path) for path in _header_files(os.path.join(root, folder))),
            cleaned=True)
  splits = offline_corpus.split_documents(docs)
  split_sources = offline_corpus.split_documents([[s] for s in sources])
  for source, counts in stats.items():
    counts['validation_documents'] = sum(s == [source] for s in split_sources['validation'])
  for split in ('train', 'validation'):
    cache.atomic_write(paths[split], ''.join(p + '\n' for doc in splits[split] for p in doc))
  line_ranges = {}
  for split, split_docs in splits.items():  # each source's paragraphs are consecutive lines of a split
    split_src = split_sources[split]
    line_ranges[split] = []
    for doc, (source,) in zip(split_docs, split_src):
      if line_ranges[split] and line_ranges[split][-1][0] == source:
        line_ranges[split][-1][1] += len(doc)
      else:
        line_ranges[split].append([source, len(doc)])
  manifest = dict(key, sources=stats, line_ranges=line_ranges,
                  splits={s: {'documents': len(d), 'paragraphs': sum(len(x) for x in d),
                              'words': sum(len(p.split()) for x in d for p in x)}
                          for s, d in splits.items()})
  cache.atomic_write(paths['manifest'], json.dumps(manifest, indent=1, sort_keys=True) + '\n')


# ---- reading sources ------------------------------------------------------------------------------
def _package_root(name: str) -> str | None:
  """The folder (or single file) of top-level package `name`, found without importing it; None if absent."""
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return None
  if spec is None:
    return None
  if spec.submodule_search_locations:
    return sorted(spec.submodule_search_locations)[0]
  return spec.origin if spec.origin and spec.origin.endswith('.py') else None


def _py_files(root: str, top_level_only: bool = False) -> list[str]:
  """The .py files under `root` (or `root` itself), sorted, without test and vendored folders."""
  if os.path.isfile(root):
    return [root]
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith('.'))
    files += [os.path.join(folder, n) for n in sorted(names)
              if n.endswith('.py') and not n.startswith('test_') and not n.endswith('_test.py')]
    if top_level_only:  # the stdlib: its packages are folders with an __init__.py
      dirs[:] = [d for d in dirs if folder != root or os.path.exists(os.path.join(folder, d, '__init__.py'))]
  return files


def _top_name(stdlib: str, path: str) -> str:
  rel = os.path.relpath(path, stdlib).split(os.sep)
  return rel[0][:-3] if len(rel) == 1 else rel[0]


def docstrings(path: str) -> list[str]:
  """The module, class and function docstrings of the Python file at `path`, parsed, not imported."""
  try:
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return []
  nodes = [tree] + sorted((n for n in ast.walk(tree)
                           if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
                          key=lambda n: (n.lineno, n.col_offset))
  return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def _docstring_prose(path: str) -> list[str]:
  """The prose paragraphs of all docstrings of a file, in source order: one text per file, so that
  short docstrings join their neighbours instead of falling under the document minimum."""
  return [p for doc in docstrings(path) for p in prose_paragraphs(doc)]


def _header_files(root: str) -> list[str]:
  """The hand-written C/C++ headers under `root`, sorted (generated protobuf headers left out)."""
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith('.'))
    files += [os.path.join(folder, n) for n in sorted(names)
              if n.endswith(('.h', '.hpp')) and not n.endswith(('.pb.h', '.grpc.pb.h', '.inc'))]
  return files


def header_comments(path: str) -> list[str]:
  """The prose paragraphs of the comments of a C/C++ header: runs of whole-line `//` comments and
  `/* ... */` blocks (leading `*` removed); an empty comment line ends a paragraph."""
  blocks, current = [], []

  def flush():
    if current:
      blocks.append(' '.join(current))
      current.clear()

  in_block = False
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      stripped = line.strip()
      if not in_block and stripped.startswith('/*'):
        flush()
        in_block, stripped = True, stripped[2:].lstrip('*!')
      if in_block:
        end = stripped.find('*/')
        text = (stripped[:end] if end >= 0 else stripped).strip().lstrip('*').strip()
        if text:
          current.append(text)
        else:
          flush()
        if end >= 0:
          in_block = False
          flush()
      elif stripped.startswith('//'):
        text = stripped.lstrip('/').lstrip('!<').strip()
        if text and not _CODE_START.match(text):
          current.append(text)
        else:
          flush()
      else:
        flush()
  flush()
  return [p for p in (clean_markup(b) for b in blocks) if is_prose(p)]


def comments(path: str) -> list[str]:
  """The prose paragraphs of the comment blocks (runs of whole-line `#` comments) of a Python file."""
  blocks, current = [], []
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      stripped = line.strip()
      text = stripped.lstrip('#').strip() if stripped.startswith('#') else ''
      if text and not stripped.startswith('#!') and not _CODE_START.match(text):
        current.append(text)
      elif current:
        blocks.append(' '.join(current))
        current = []
  if current:
    blocks.append(' '.join(current))
  return [p for p in (clean_markup(b) for b in blocks) if is_prose(p)]


def _doc_pages(root: str) -> list[str]:
  """The .rst and .md pages a package ships (outside test folders), sorted by path."""
  if os.path.isfile(root):
    return []
  texts = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith('.'))
    for n in sorted(names):
      if n.endswith(('.rst', '.md')):
        with open(os.path.join(folder, n), encoding='utf-8', errors='replace') as f:
          texts.append(f.read())
  return texts


# ---- cleaning -------------------------------------------------------------------------------------
def prose_paragraphs(text: str) -> list[str]:
  """The English prose paragraphs of a docstring or reST/Markdown page, cleaned (see the module doc)."""
  return [p for p in (clean_markup(p) for p in _raw_paragraphs(text)) if is_prose(p)]


def _raw_paragraphs(text: str) -> list[str]:
  """Splits `text` into paragraphs of joined lines, skipping code, directives and non-prose sections."""
  lines = text.expandtabs(4).splitlines()
  out, current = [], []
  section, skip_indent, list_indent = None, None, None

  def flush():
    if current:
      out.append(' '.join(current))
      current.clear()

  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    indent = len(line) - len(line.lstrip())
    nxt = lines[i + 1] if i + 1 < len(lines) else ''
    if skip_indent is not None:  # inside a literal block / directive: skip while indented deeper
      if not stripped or indent > skip_indent:
        i += 1
        continue
      skip_indent = None
    if not stripped:
      flush()
      i += 1
      continue
    header = _section_header(stripped, nxt)
    if header is not None:
      flush()
      section, list_indent = header, None
      i += 2 if _UNDERLINE.match(nxt) else 1
      continue
    if _UNDERLINE.match(stripped) or stripped.startswith(('#', '|', '+-', '==')):  # titles, tables
      flush()
      i += 1
      continue
    if stripped.startswith(('```', '~~~')):  # a fenced code block
      flush()
      i += 1
      while i < len(lines) and not lines[i].strip().startswith(('```', '~~~')):
        i += 1
      i += 1
      continue
    admonition = _ADMONITION.match(stripped)
    if admonition:  # its text is prose: keep it
      flush()
      if admonition.group(2) and admonition.group(1) in ('note', 'warning', 'tip', 'important', 'hint',
                                                        'attention', 'caution'):
        current.append(admonition.group(2))
      i += 1
      continue
    if stripped.startswith('.. ') or _CODE_START.match(stripped):  # directive, doctest or code line
      flush()
      skip_indent = indent
      i += 1
      continue
    if section in _DROP_SECTIONS:
      i += 1
      continue
    if section in _LIST_SECTIONS:
      if list_indent is None:
        list_indent = indent
      if indent < list_indent:  # text after a Google-style section
        section = None
        flush()
      elif indent == list_indent:  # an item's `name : type` or `name (type): text` line
        flush()
        item = re.match(r'^\*{0,2}[\w.,\s`\[\]]+?(\s*\(.*?\))?\s*:\s+(.+)$', stripped)
        if item and ' : ' not in stripped:
          current.append(item.group(2))  # Google style: the text after the colon
        if (item or ' : ' in stripped or len(stripped.split()) <= 3
            or (stripped.endswith(':') and not stripped.endswith('::'))):
          i += 1
          continue
        section = None  # a sentence at the items' indent: prose after a numpydoc section
    item = _ITEM.match(stripped)
    if item:  # `name (type): text` outside a parameter section: a new paragraph of its text
      flush()
      if item.group(1):
        current.append(item.group(1))
      i += 1
      continue
    current.append(stripped)
    if stripped.endswith('::'):  # a literal block follows
      current[-1] = stripped[:-1] if not stripped.endswith(' ::') else stripped[:-3]
      flush()
      skip_indent = indent
    i += 1
  flush()
  return out


def _section_header(stripped: str, nxt: str) -> str | None:
  """The lower-case name if `stripped` is a docstring section header (numpydoc underline or `Name:`)."""
  name = stripped.rstrip(':').strip().lower()
  if name not in _SECTION_NAMES:
    return None
  if _UNDERLINE.match(nxt) or stripped.endswith(':'):
    return name
  return None


def clean_markup(paragraph: str) -> str:
  """Removes reST/Markdown markup: roles, backticks, reference brackets, emphasis stars; folds spaces."""
  p = _REFLINK.sub(r'\1', paragraph)
  p = _ROLE.sub('', p)
  p = re.sub(r'`+~?([^`]*)`+_?', r'\1', p)
  p = re.sub(r'\*\*?([^*\s][^*]*)\*\*?', r'\1', p)
  p = re.sub(r'^[-*] ', '', p)
  return ' '.join(p.split())


def is_prose(paragraph: str) -> bool:
  """Whether a cleaned paragraph reads as English prose rather than code, tables or identifiers."""
  words = paragraph.split()
  if len(words) < MIN_PARAGRAPH_WORDS or _CODE_START.match(paragraph):
    return False
  if sum(not c.isascii() for c in paragraph) > 0.05 * len(paragraph):
    return False
  if sum(c in '{}[]()=<>_*#/\\|$@^~%;&' for c in paragraph) > 0.05 * len(paragraph):
    return False
  plain = sum(bool(_WORD.match(w)) for w in words)
  common = sum(w.strip('.,;:!?()"\'').lower() in _STOPWORDS for w in words)
  return plain >= 0.7 * len(words) and common >= 0.15 * len(words)


def dedup_keys(paragraph: str) -> list[bytes]:
  """Hashes under which a paragraph counts as seen: its folded text, and its plain lower-case words.

  The second key (only for paragraphs with at least `MIN_PARAGRAPH_WORDS` such words) makes paragraphs
  that differ only in names, numbers or identifiers (`BertModel` vs `GPT2Model`) duplicates.
  """
  folded = ' '.join(re.sub(r'[^a-z0-9]+', ' ', paragraph.lower()).split())
  keys = [hashlib.blake2b(folded.encode(), digest_size=12).digest()]
  plain = [w for w in (w.strip('.,;:!?()"\'') for w in paragraph.split()) if w.isalpha() and w.islower()]
  if len(plain) >= MIN_PARAGRAPH_WORDS:
    keys.append(hashlib.blake2b(('\x00' + ' '.join(plain)).encode(), digest_size=12).digest())
  return keys


# ---- building and reporting from the command line --------------------------------------------------
def token_counts(paths: dict[str, str], model_file: str) -> dict[str, dict[str, int]]:
  """Tokens (SentencePiece pieces, no EOS) of each split, in total and per source, under `model_file`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  processor = spm.SentencePieceProcessor(model_file=model_file)
  with open(paths['manifest'], encoding='utf-8') as f:
    ranges = json.load(f)['line_ranges']
  counts = {}
  for split in ('train', 'validation'):
    with open(paths[split], encoding='utf-8') as f:
      lines = f.read().splitlines()
    lengths = [len(ids) for ids in processor.encode(lines, num_threads=2)]
    per_source, start = {}, 0
    for source, n in ranges[split]:
      per_source[source] = per_source.get(source, 0) + sum(lengths[start:start + n])
      start += n
    counts[split] = dict(per_source, total=sum(lengths))
  return counts


def main(argv: list[str] | None = None) -> None:
  """Builds the selected offline corpus (if needed) and prints its sources and size in tokens."""
  import argparse  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m tasks.package_corpus', description=main.__doc__)
  parser.add_argument('--corpus', default=NAME, choices=offline_corpus.CORPORA)
  parser.add_argument('--cache_dir', default=None, help='default: $SCALING_ARCH_CACHE or ~/.cache/scaling_arch')
  parser.add_argument('--vocab_sizes', default='4000',
                      help='comma-separated offline vocabulary sizes to count tokens with')
  parser.add_argument('--vocab_corpora', default='cpython',
                      help='comma-separated corpora the vocabularies are trained on (cpython, packages)')
  parser.add_argument('--baseline', action='store_true',
                      help='also the unigram cross-entropy of span-corruption targets (inputs 128)')
  parser.add_argument('--baseline_train_every', type=int, default=1,
                      help='estimate the baseline\'s train unigram from every n-th train line')
  args = parser.parse_args(argv)
  from tasks import vocabularies  # pylint: disable=g-import-not-at-top
  start = time.time()
  if args.corpus == NAME:
    paths = corpus_files(args.cache_dir)
  else:  # the cpython corpus has no manifest: one source
    paths = dict(offline_corpus.corpus_files(args.cache_dir, args.corpus))
  print(f'corpus {args.corpus}: {paths["train"]} (ready in {time.time() - start:.0f} s)', flush=True)
  if 'manifest' in paths:
    with open(paths['manifest'], encoding='utf-8') as f:
      manifest = json.load(f)
    print(f"{'source':24s} {'version':38s} {'docs':>7s} {'val':>5s} {'paras':>8s} {'words':>10s} {'dups':>7s}")
    for source, c in manifest['sources'].items():
      version = manifest['packages'].get(source.split(':')[0], '') or ''
      print(f"{source:24s} {version[:38]:38s} {c['documents']:7d} {c['validation_documents']:5d} "
            f"{c['paragraphs']:8d} {c['words']:10d} {c['duplicates']:7d}")
    for split, c in manifest['splits'].items():
      print(f"{split}: {c['documents']} documents, {c['paragraphs']} paragraphs, {c['words']} words, "
            f"{os.path.getsize(paths[split]) / 1e6:.1f} MB")
  else:
    paths['manifest'] = _single_source_manifest(paths, args.corpus)
  for vocab_corpus in args.vocab_corpora.split(','):
    for size in (int(s) for s in args.vocab_sizes.split(',')):
      t = time.time()
      vocab = vocabularies.offline_vocabulary(size, cache_dir=args.cache_dir, corpus=vocab_corpus)
      counts = token_counts(paths, vocab.sentencepiece_model_file)
      print(f'tokens under the {size}-piece vocabulary of the {vocab_corpus} corpus '
            f'({time.time() - t:.0f} s): train {counts["train"]["total"]:,}, '
            f'validation {counts["validation"]["total"]:,}', flush=True)
      train_total = counts['train']['total']
      for source, n in counts['train'].items():
        if source != 'total':
          print(f'  {source:24s} {n:12,d} train tokens ({100 * n / train_total:4.1f}%), '
                f'{counts["validation"].get(source, 0):10,d} validation')
      if args.baseline:
        t = time.time()
        entropy = unigram_baseline(vocab, paths, train_every=args.baseline_train_every)
        chars = os.path.getsize(paths['validation'])
        print(f'  unigram baseline of span-corruption targets (inputs 128, train unigram on validation): '
              f'{entropy:.3f} nats per target token; validation {chars / counts["validation"]["total"]:.2f} '
              f'bytes per token ({time.time() - t:.0f} s)', flush=True)


def _single_source_manifest(paths: dict[str, str], corpus: str) -> str:
  """A temporary manifest saying that every line of `paths` comes from one source (for the report)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  ranges = {}
  for split in ('train', 'validation'):
    with open(paths[split], encoding='utf-8') as f:
      ranges[split] = [[corpus, sum(1 for _ in f)]]
  fd, path = tempfile.mkstemp(suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump({'line_ranges': ranges}, f)
  return path


def unigram_baseline(vocabulary, paths: dict[str, str], inputs_length: int = 128,
                     train_every: int = 1) -> float:
  """Cross-entropy (nats per target token, EOS included) of the validation span-corruption targets under
  the unigram distribution of the train targets (add-one smoothed): what a model gets from token
  frequencies alone. Runs the real seqio task, unshuffled, seed 0; with `train_every` n > 1 the train
  unigram comes from every n-th train line only (faster; the validation split is always whole)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from tasks import pretraining  # pylint: disable=g-import-not-at-top
  if train_every > 1:
    with open(paths['train'], encoding='utf-8') as f:
      sample = f.read().splitlines()[::train_every]
    fd, name = tempfile.mkstemp(suffix='.txt')
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(''.join(line + '\n' for line in sample))
    paths = dict(paths, train=name)
  source = seqio.TextLineDataSource(split_to_filepattern={s: paths[s] for s in ('train', 'validation')})
  task = pretraining._register('offline_span_corruption', source, vocabulary,  # pylint: disable=protected-access
                               paths['train'], paths['validation'],
                               first=[pretraining._line_to_text])  # pylint: disable=protected-access
  lengths = {'inputs': inputs_length,
             'targets': pretraining.span_corruption_targets_length(inputs_length)}
  counts = {}
  for split in ('train', 'validation'):
    ds = task.get_dataset(lengths, split=split, shuffle=False, seed=0, use_cached=False)
    ids = np.concatenate([ex['targets'] for ex in ds.as_numpy_iterator()])
    counts[split] = np.bincount(ids, minlength=vocabulary.vocab_size)
  probs = (counts['train'] + 1) / (counts['train'].sum() + len(counts['train']))
  valid = counts['validation']
  return float(-(valid * np.log(probs[:len(valid)])).sum() / valid.sum())


if __name__ == '__main__':
  main()

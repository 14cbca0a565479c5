"""Where the data package keeps what it builds locally (offline corpus, offline vocabulary)."""

import os
import tempfile

ENV_VAR = 'SCALING_ARCH_CACHE'


def cache_dir() -> str:
  """Returns `$SCALING_ARCH_CACHE` if set, else `~/.cache/scaling_arch` (not created here)."""
  return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser('~'), '.cache', 'scaling_arch')


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to `path` via a temp file in the same folder and `os.replace`.

  Readers never see a half-written file, and concurrent writers of the same content are harmless.
  """
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='-' + os.path.basename(path))
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

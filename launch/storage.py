"""Reading and writing the files the launcher shares with training runs, on local disk or gs://.

Local paths use the standard library; other URLs (gs://) go through tf.io.gfile, imported only then, so
the launcher of a local grid never pays for TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def is_remote(path: str) -> bool:
  return "://" in path


def _gfile():
  import tensorflow as tf  # only for gs:// and other remote paths
  return tf.io.gfile


def read_text(path: str) -> Optional[str]:
  """The file's text, or None if it does not exist."""
  try:
    if is_remote(path):
      gfile = _gfile()
      if not gfile.exists(path):
        return None
      with gfile.GFile(path) as f:
        return f.read()
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None


def read_json(path: str) -> Optional[dict]:
  text = read_text(path)
  if not text:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return None  # being rewritten; the next read sees it whole


def write_json(path: str, value: dict) -> None:
  text = json.dumps(value, indent=1, sort_keys=True) + "\n"
  if is_remote(path):
    gfile = _gfile()
    gfile.makedirs(os.path.dirname(path))
    with gfile.GFile(path, "w") as f:
      f.write(text)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def listdir(path: str) -> list[str]:
  """Names in a directory (none if it does not exist)."""
  if is_remote(path):
    gfile = _gfile()
    return [n.rstrip("/") for n in gfile.listdir(path)] if gfile.isdir(path) else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def latest_checkpoint(model_dir: str) -> Optional[str]:
  """`<model_dir>/checkpoints/<step>` of the newest finished checkpoint (orbax writes
  _CHECKPOINT_METADATA last), or None."""
  directory = model_dir.rstrip("/") + "/checkpoints"
  steps = [int(n) for n in listdir(directory)
           if n.isdigit() and exists(f"{directory}/{n}/_CHECKPOINT_METADATA")]
  return f"{directory}/{max(steps)}" if steps else None


def parallel_map(fn: Callable[[T], R], items: Iterable[T], remote: bool) -> list[R]:
  """`[fn(x) for x in items]`, with threads when the files are remote (gs:// reads are slow, not busy)."""
  items = list(items)
  if not remote or len(items) < 2:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
    return list(pool.map(fn, items))

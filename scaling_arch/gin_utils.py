"""Gin plumbing shared by the entry points: `--gin_file` / `--gin.NAME=VALUE` flags, search paths, and
turning gin's exceptions into one readable message."""

from __future__ import annotations

import difflib
import os
import re
from typing import Sequence

import gin

from scaling_arch import errors

_GIN_FLAG = re.compile(r"^--gin\.([^=]+)=(.*)$", re.S)


def gin_root() -> str:
  """The directory holding the `gin/` folder: the repository root (a source or editable install), or
  the installed package, where setup.py places the gin files as package data (scaling_arch/gin)."""
  package = os.path.dirname(os.path.abspath(__file__))
  for root in (os.path.dirname(package), package):
    if os.path.isdir(os.path.join(root, "gin", "models")):
      return root
  raise errors.ConfigError(f"The gin/ folder was not found next to {package}; reinstall the package.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE`, so absl can parse it (as T5X does)."""
  out = []
  for arg in argv:
    m = _GIN_FLAG.match(arg)
    out.append(f"--gin_bindings={m.group(1)} = {m.group(2)}" if m else arg)
  return out


def resolve_gin_file(path: str) -> str:
  for candidate in (path, os.path.join(gin_root(), path), os.path.join(gin_root(), "gin", path)):
    if os.path.exists(candidate):
      return candidate
  raise errors.ConfigError(
      f"Gin file {path!r} not found (looked relative to the current directory and to {gin_root()}). "
      "Gin files live under gin/models, gin/sizes, gin/runs and gin/meshes.")


def _explain(e: Exception) -> str:
  lines = []
  for line in str(e).strip().splitlines():
    if line.startswith("# Parameters for") or "config at the time" in line.lower() or line.startswith("# ==="):
      break
    lines.append(line)
  msg = "\n".join(l for l in lines if l.strip()).strip()
  if "No configurable matching" in msg or "Unknown configurable" in msg:
    return (f"{msg}\nCheck the spelling of the binding; configurables are listed in the gin files under "
            "gin/ and registered in scaling_arch/layers and scaling_arch/architectures.")
  if "macro" in msg.lower():
    return (f"{msg}\nA required gin macro is not set: each gin file's header lists the macros it needs; "
            "set it in a gin file or with --gin.NAME=VALUE.")
  return msg


def parse(gin_files: Sequence[str], bindings: Sequence[str], *, finalize: bool = True) -> None:
  """Parses files then bindings (later wins), with readable errors."""
  from scaling_arch import train  # noqa: F401  registers `train` and, through it, every configurable
  gin.clear_config()
  gin.add_config_file_search_path(gin_root())
  try:
    gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in gin_files], list(bindings),
                                        finalize_config=finalize)
  except errors.UserError:
    raise
  except (ValueError, KeyError, SyntaxError, ImportError, TypeError, IOError) as e:
    raise errors.ConfigError(f"Gin configuration error: {_explain(e)}") from None


_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _macro_names_in(value, out: set) -> set:
  """Adds the names of the macros `value` (a bound value, possibly nested in containers) refers to."""
  if isinstance(value, gin.config.ConfigurableReference):
    if value.selector == "gin.macro":
      out.add(value.scoped_selector.rsplit("/", 1)[0])
  elif isinstance(value, dict):
    for k, v in value.items():
      _macro_names_in(k, out)
      _macro_names_in(v, out)
  elif isinstance(value, (list, tuple, set, frozenset)):
    for v in value:
      _macro_names_in(v, out)
  return out


def unreferenced_macros(bindings: Sequence[str]) -> list[str]:
  """The macros that `bindings` (`NAME = VALUE` lines) bind but that no binding of the parsed
  configuration refers to (`%NAME`): on the command line, almost always a misspelt name."""
  bound = {m.group(1) for m in map(_MACRO_BINDING.match, bindings) if m}
  referenced: set = set()
  for values in gin.config._CONFIG.values():  # pylint: disable=protected-access  (gin has no public walk)
    _macro_names_in(values, referenced)
  return sorted(bound - referenced)


def check_macros_referenced(bindings: Sequence[str]) -> None:
  """Raises ConfigError naming every macro bound by `bindings` that nothing references, with the
  closest known macro as a suggestion (`--gin.TRAIN_STEPZ=5` would otherwise be silently ignored)."""
  unused = unreferenced_macros(bindings)
  if not unused:
    return
  known = sorted({scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"} - set(unused))  # pylint: disable=protected-access
  parts = []
  for name in unused:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    parts.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
  raise errors.ConfigError(
      f"Gin configuration error: the macro{'s' if len(parts) > 1 else ''} {', '.join(parts)} "
      f"{'are' if len(parts) > 1 else 'is'} bound but nothing in the configuration uses "
      f"{'them' if len(parts) > 1 else 'it'}; check the spelling (each gin file's header lists its macros).")


def call_configured(fn, *args, **kwargs):
  """Calls a gin-configured function, turning gin's missing-value / macro errors into ConfigError."""
  try:
    return fn(*args, **kwargs)
  except errors.UserError:
    raise
  except (ValueError, TypeError) as e:
    msg = str(e)
    if "gin" in msg.lower() or "macro" in msg.lower() or "No values supplied" in msg:
      raise errors.ConfigError(f"Gin configuration error: {_explain(e)}") from None
    raise


def configured_module(vocab_size: int):
  """The encoder-decoder module that the parsed gin files bind to `train.module_factory`."""
  try:
    reference = gin.query_parameter("train.module_factory")
  except ValueError as e:
    raise errors.ConfigError(f"No architecture is configured ({e}); pass a gin/models/*.gin file.") from None
  return call_configured(reference.scoped_configurable_fn, vocab_size=vocab_size)

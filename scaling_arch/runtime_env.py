"""Process start-up settings shared by the entry points (train, evaluate, benchmark, launch, analysis).

`start()` runs first thing in each entry point's `__main__`, before JAX or TensorFlow is imported:

* Quiet libraries. TensorFlow is here only for data (seqio, tfds, tf.io.gfile). When anything imports it,
  what native code writes to stderr during the import is held back; its start-up chatter (INFO lines
  such as oneDNN's and the CUDA stub's, absl's "All log messages before absl::InitializeLog()" notice, a
  failed cuInit on a machine without a GPU driver) is dropped and the rest passed on. TensorFlow is then
  limited to the CPU (`tf.config.set_visible_devices`), so it never takes an accelerator from JAX.
  `initialize_backends()` (train.initialize_distributed calls it) starts JAX's backends the same way
  and drops what libtpu prints when JAX probes for a TPU that is not there. Python's own warnings pass
  at once, and `TF_CPP_MIN_LOG_LEVEL` defaults to 1: C++ warnings and errors of TensorFlow and XLA
  after start-up still show, as with JAX's own default.
* Verbose libraries: `SCALING_ARCH_VERBOSE=1` in the environment, or `--verbosity` / `-v` with a value
  >= 0 on an absl command line (train, evaluate, benchmark), turns all of it back on: nothing is
  dropped, `TF_CPP_MIN_LOG_LEVEL` defaults to 0, and absl's Python logging stays at INFO.
* Huge pages for malloc (Linux): the process re-executes itself once with
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` added. XLA:CPU allocates its buffers afresh every step, and
  transparent huge pages save most of the page faults (about 15% of a CPU train step of T5 small). Opt
  out with `--nomalloc_hugepages` or by setting `glibc.malloc.hugetlb` yourself in `GLIBC_TUNABLES`
  (e.g. `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`); an existing setting is never changed.

This module imports only the standard library and absl's flags, so `python -m launch --help` stays fast.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator, Optional, Sequence

from absl import flags

VERBOSE_ENV = "SCALING_ARCH_VERBOSE"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"

flags.DEFINE_bool("malloc_hugepages", True,
                  "On Linux, run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (the process re-executes itself "
                  "once at start-up) unless GLIBC_TUNABLES already sets glibc.malloc.hugetlb: transparent "
                  "huge pages for XLA:CPU's per-step buffers. --nomalloc_hugepages opts out.")

# absl / glog C++ log lines: "I0000 00:00:1796324389.066234    4798 port.cc:153] message".
_NATIVE_LOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]*\] ?(.*)$")
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# Warnings and errors that only say "no GPU driver here" or repeat a CUDA plugin registration.
_HARMLESS = re.compile(r"failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning")


def _value_in_argv(argv: Sequence[str], name: str, *, boolean: bool = False) -> Optional[str]:
  """The last value absl would give flag `name` from `argv` ('-v' for 'v'), or None if it is absent.

  Boolean flags read `--name`, `--noname` and `--name=value`; others also `--name value`.
  """
  value = None
  forms = (f"-{name}", f"--{name}")
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    if arg in forms:
      if boolean:
        value = "true"
      elif i + 1 < len(argv):
        value = argv[i + 1]
    elif arg.startswith(tuple(f + "=" for f in forms)):
      value = arg.split("=", 1)[1]
    elif boolean and arg in (f"-no{name}", f"--no{name}"):
      value = "false"
  return value


def verbose(argv: Optional[Sequence[str]] = None) -> bool:
  """Whether the libraries' logs are wanted: SCALING_ARCH_VERBOSE=1, or --verbosity / -v >= 0 in argv."""
  env = os.environ.get(VERBOSE_ENV, "").strip().lower()
  if env:
    return env not in ("0", "false", "no", "off")
  argv = sys.argv[1:] if argv is None else argv
  value = _value_in_argv(argv, "verbosity")
  value = _value_in_argv(argv, "v") if value is None else value
  if value is None:
    return False
  try:
    return int(value) >= 0
  except ValueError:
    return True  # a level name or a typo: absl will complain about the latter; show the logs


def hugepages_wanted(argv: Optional[Sequence[str]] = None) -> bool:
  """--malloc_hugepages (default true) as absl will parse it from argv; Linux only."""
  if not sys.platform.startswith("linux"):
    return False
  value = _value_in_argv(sys.argv[1:] if argv is None else argv, "malloc_hugepages", boolean=True)
  return value is None or value.strip().lower() not in ("false", "0", "no", "f", "n")


def reexec_with_hugepage_malloc() -> None:
  """Replaces this process by the same command line with glibc's malloc on transparent huge pages.

  Does nothing if GLIBC_TUNABLES already mentions glibc.malloc.hugetlb (so it happens once, and an
  explicit setting, e.g. glibc.malloc.hugetlb=0, is an opt-out).
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGETLB_TUNABLE) if t)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def is_library_noise(line: str) -> bool:
  """Whether a line of captured stderr is library start-up chatter that a quiet start drops."""
  line = line.rstrip("\r\n")
  if line == _ABSL_NOTICE:
    return True
  match = _NATIVE_LOG.match(line)
  return bool(match) and (match.group(1) == "I" or bool(_HARMLESS.search(match.group(2))))


class Capture:
  """What `quiet_native_stderr` drops besides `is_library_noise`: lines matching `drop`, if set."""

  def __init__(self):
    self.drop: Optional[re.Pattern] = None


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[Capture]:
  """Holds back what native code writes to file descriptor 2 and passes on all but library noise at the end.

  Python's sys.stderr writes to the real stderr meanwhile, so warnings and tracebacks show at once. If the
  block raises, everything held back is passed on.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  capture, python_stderr, completed = Capture(), sys.stderr, False
  saved = os.dup(2)
  real = open(saved, "w", buffering=1, closefd=False, encoding=getattr(python_stderr, "encoding", None) or "utf-8",
              errors="backslashreplace")
  with tempfile.TemporaryFile() as held:
    sys.stderr = real
    os.dup2(held.fileno(), 2)
    try:
      yield capture
      completed = True
    finally:
      real.flush()
      sys.stderr = python_stderr
      os.dup2(saved, 2)
      real.close()
      os.close(saved)
      held.seek(0)
      lines = held.read().decode("utf-8", errors="replace").splitlines(keepends=True)
      if completed:
        lines = [line for line in lines
                 if not is_library_noise(line) and not (capture.drop and capture.drop.search(line))]
      if lines:
        sys.stderr.write("".join(lines))
        sys.stderr.flush()


# What libtpu prints while JAX probes for a TPU on a machine that has none.
_TPU_PROBE = re.compile(r"TPU|libtpu|InitGoogle|Source Location Trace|^learning/|host bounds")


def initialize_backends() -> None:
  """Starts JAX's backends now (after jax.distributed.initialize), quietly if `start()` made this quiet.

  Probing for platforms that are not there (libtpu installed on a machine without a TPU) makes their
  runtimes print errors; when JAX ends up on another platform, those lines are dropped.
  """
  if not _started or _loud:
    return
  import jax
  with quiet_native_stderr() as capture:
    if jax.devices()[0].platform != "tpu":
      capture.drop = _TPU_PROBE


def tensorflow_cpu_only(tf) -> None:
  """Keeps TensorFlow off every accelerator: it is only the data pipeline's, and JAX owns the devices."""
  try:
    tf.config.set_visible_devices(tf.config.list_physical_devices("CPU"))
  except RuntimeError as e:  # its devices were initialized already: too late to hide them
    print(f"warning: could not keep TensorFlow off the accelerators: {e}", file=sys.stderr, flush=True)


class _TensorFlowLoader(importlib.abc.Loader):
  """TensorFlow's own loader, run quietly (unless verbose) and followed by tensorflow_cpu_only."""

  def __init__(self, loader, quiet: bool):
    self._loader = loader
    self._quiet = quiet

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    module.__loader__ = module.__spec__.loader = self._loader  # the wrapper is only for this one import
    with quiet_native_stderr() if self._quiet else contextlib.nullcontext():
      self._loader.exec_module(module)
      tensorflow_cpu_only(module)


class _TensorFlowImportHook(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` once, with its loader wrapped in _TensorFlowLoader."""

  def __init__(self, quiet: bool):
    self.quiet = quiet

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      spec.loader = _TensorFlowLoader(spec.loader, self.quiet)
    return spec


def cpu_only_without_accelerators() -> None:
  """Sets JAX_PLATFORMS=cpu when it is unset and this machine has no TPU chip and no GPU runtime for JAX.

  With the `tpu` extra installed (libtpu, for `python -m launch plan`), JAX would otherwise probe for a
  TPU at every start on a CPU-only machine: seconds of start-up, libtpu's error lines, and a machine-wide
  lock file that makes two such processes collide. A TPU VM (chips on its PCI bus) and a machine with
  JAX's CUDA or ROCm plugin installed keep JAX's own platform choice.
  """
  if os.environ.get("JAX_PLATFORMS"):
    return
  from importlib import metadata
  names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
  if any(n.startswith(("jax-cuda", "jax-rocm", "jaxlib-cuda", "jaxlib-rocm")) for n in names):
    return
  if not _google_pci_devices():
    os.environ["JAX_PLATFORMS"] = "cpu"


def _google_pci_devices() -> bool:
  """Whether a device of Google's PCI vendor id (0x1ae0: TPU chips) is on this machine's bus; the check JAX
  runs before it loads libtpu, done here without importing JAX (JAX reads JAX_PLATFORMS when imported)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return False


_started = False
_loud = False


def start(*, reexec: bool = True) -> None:
  """The entry points' start-up: huge-page malloc (if `reexec`), log levels, and the TensorFlow hook.

  Call it from the `__main__` module before anything imports JAX or TensorFlow; calling it again does
  nothing.
  """
  global _started, _loud
  if _started:
    return
  _started = True
  if reexec and hugepages_wanted():
    reexec_with_hugepage_malloc()
  _loud = loud = verbose()
  cpu_only_without_accelerators()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if loud else "1")
  if loud:  # libtpu's own switches, for a TPU VM's start-up messages
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "0")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "0")
  if "tensorflow" in sys.modules:
    tensorflow_cpu_only(sys.modules["tensorflow"])
  elif not any(isinstance(f, _TensorFlowImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TensorFlowImportHook(quiet=not loud))

"""The first screen of the entry points is the project's, not TensorFlow's, XLA's or CUDA's
(scaling_arch/runtime_env.py), the documented switch brings the libraries' logs back, and training
re-executes itself with huge-page malloc like the benchmark.

Cost: `python -m scaling_arch.train` on the quickstart configuration shrunk to one layer each side and
one step (imports ~10 s, data, compile, one step); `python -m scaling_arch.evaluate --help` (imports);
`--help` of launch and analysis; a `python -c` for the re-exec.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time

import pytest

from scaling_arch import runtime_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What TensorFlow, XLA, absl's C++ logging, CUDA and libtpu write: "I0000 00:00:1796324389.066234    4798
# port.cc:153] ..." (glog format, any severity), absl's and libtpu's pre-initialization notices, and
# anything naming them.
LIBRARY_LINE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]|absl::InitializeLog|InitGoogle|oneDNN|cuda|cudart|cuInit"
    r"|tensorflow|\bXLA\b|libtpu|(?-i:\bTPU\b)|Source Location Trace", re.IGNORECASE)
# The lines of the issue (TensorFlow's import and a failed cuInit) and of JAX probing for a TPU that is
# not there (with libtpu installed): not anywhere in a quiet run.
NOISE = re.compile(r"oneDNN custom operations|Could not find cuda drivers|absl::InitializeLog|cuInit"
                   r"|InitGoogle|could not determine TPU|Source Location Trace")

QUICKSTART = ["--gin_file=gin/runs/quickstart.gin", "--gin.NUM_ENCODER_LAYERS=1", "--gin.NUM_DECODER_LAYERS=1",
              "--gin.BATCH_SIZE=2", "--gin.INPUT_LENGTH=32", "--gin.TARGET_LENGTH=8",
              "--gin.train.eval_every_steps=0", "--gin.train.stop_after_steps=1"]


def fresh_env(**overrides) -> dict:
  """A new user's environment: none of the test session's log, platform or allocator settings."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "GLIBC_TUNABLES", "XLA_FLAGS",
                      runtime_env.VERBOSE_ENV)}
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env["PYTHONUNBUFFERED"] = "1"  # so stdout and stderr lines arrive in the order they are written
  env.update(overrides)
  return env


def run_lines(args, env, *, timeout: float = 300):
  """Runs `python ARGS`; returns (exit status, [(stream, line)] in the order the lines arrived)."""
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  sel = selectors.DefaultSelector()
  buffers = {}
  for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
    os.set_blocking(pipe.fileno(), False)
    sel.register(pipe, selectors.EVENT_READ, name)
    buffers[name] = b""
  lines, open_pipes, deadline = [], 2, time.monotonic() + timeout
  try:
    while open_pipes:
      if time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout} s; so far: {lines}")
      for key, _ in sel.select(timeout=1.0):
        chunk = key.fileobj.read()
        if chunk is None:  # nothing after all
          continue
        if not chunk:
          sel.unregister(key.fileobj)
          open_pipes -= 1
          chunk = b"\n" if buffers[key.data] else b""
        buffers[key.data] += chunk
        *complete, buffers[key.data] = buffers[key.data].split(b"\n")
        lines += [(key.data, line.decode("utf-8", "replace")) for line in complete]
    return proc.wait(timeout=60), lines
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def before_first_project_line(lines):
  """The lines before the first line the project printed (its progress lines go to stdout)."""
  for i, (stream, _) in enumerate(lines):
    if stream == "stdout":
      return [line for _, line in lines[:i]]
  raise AssertionError(f"the project printed nothing: {lines}")


def test_quickstart_first_screen_is_ours(tmp_path):
  # JAX_PLATFORMS unset, as on a new user's machine: JAX probes its platforms (and any installed plugins).
  code, lines = run_lines(["-m", "scaling_arch.train", *QUICKSTART, f"--gin.MODEL_DIR='{tmp_path / 'qs'}'"],
                          fresh_env())
  text = "\n".join(line for _, line in lines)
  assert code == 0, text
  assert "Stopped after 1 step" in text or "Stopped after 1 steps" in text, text
  early = before_first_project_line(lines)
  assert not [line for line in early if LIBRARY_LINE.search(line)], text
  assert not [line for _, line in lines if NOISE.search(line)], text


def test_verbose_switch_brings_library_logs_back():
  # --verbosity is read at start-up, before TensorFlow is imported (SCALING_ARCH_VERBOSE=1 goes the same
  # way: test_argv_rules_and_noise_filter). `--help` imports everything, then prints the flags.
  _, lines = run_lines(["-m", "scaling_arch.evaluate", "--verbosity=0", "--help"],
                       fresh_env(JAX_PLATFORMS="cpu"))
  text = "\n".join(line for _, line in lines)
  assert "--gin_file" in text, text
  assert [line for _, line in lines if re.match(r"^[IWEF]\d{4} ", line)], text
  assert [line for _, line in lines if NOISE.search(line)], text


@pytest.mark.parametrize("module", ["launch", "scaling_arch.analysis"])
def test_other_entry_points_start_quietly(module):
  code, lines = run_lines(["-m", module, "--help"], fresh_env())
  assert code == 0, lines
  assert lines and lines[0][0] == "stdout" and lines[0][1].startswith("usage: python -m"), lines
  assert not [line for stream, line in lines if stream == "stderr" and LIBRARY_LINE.search(line)], lines


def test_reexec_with_hugepage_malloc_and_opt_outs():
  program = ("from scaling_arch import runtime_env; runtime_env.start(); import os, sys; "
             "print(os.environ.get('GLIBC_TUNABLES'), os.getpid(), sys.argv[1:])")
  def child(*args, tunables=None):
    env = fresh_env(**({"GLIBC_TUNABLES": tunables} if tunables is not None else {}))
    proc = subprocess.run([sys.executable, "-c", program, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout.split(" ", 2)
  tunables, _, argv = child("--gin.X=1")
  assert tunables == "glibc.malloc.hugetlb=1" and argv.strip() == "['--gin.X=1']"
  assert child("--gin.X=1", tunables="glibc.malloc.mxfast=0")[0] == "glibc.malloc.mxfast=0:glibc.malloc.hugetlb=1"
  assert child("--nomalloc_hugepages")[0] == "None"
  assert child("--malloc_hugepages=false")[0] == "None"
  assert child(tunables="glibc.malloc.hugetlb=0")[0] == "glibc.malloc.hugetlb=0"


def test_argv_rules_and_noise_filter(monkeypatch):
  monkeypatch.delenv(runtime_env.VERBOSE_ENV, raising=False)
  assert not runtime_env.verbose(["--gin_file=x.gin"])
  assert runtime_env.verbose(["--verbosity=0"]) and runtime_env.verbose(["-v", "1"])
  assert not runtime_env.verbose(["--verbosity=-1"])
  monkeypatch.setenv(runtime_env.VERBOSE_ENV, "1")
  assert runtime_env.verbose([])
  monkeypatch.setenv(runtime_env.VERBOSE_ENV, "0")
  assert not runtime_env.verbose(["--verbosity=1"])
  assert runtime_env.hugepages_wanted(["--malloc_hugepages"]) == sys.platform.startswith("linux")
  assert not runtime_env.hugepages_wanted(["--malloc_hugepages", "--nomalloc_hugepages"])
  noise = runtime_env.is_library_noise
  assert noise("I0000 00:00:1796324389.066234    4798 port.cc:153] oneDNN custom operations are on.\n")
  assert noise("E0000 00:00:1796324395.746162    4798 cuda_platform.cc:52] failed call to cuInit: INTERNAL")
  assert noise("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
  assert not noise("E0000 00:00:1796324395.746162    4798 some_op.cc:12] a real error")
  assert not noise("W0000 00:00:1796324395.746162    4798 allocator.cc:9] out of memory")
  assert not noise("error: the gin file does not exist")

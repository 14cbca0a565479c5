r"""`python -m launch plan GRID`: will every stage of a grid fit its TPU slice, and what will it cost?

For every run and stage of the grid this compiles the train step ahead of time for the target TPU
topology on the local CPU (libtpu's compiler, `jax.experimental.topologies`; no TPU needed), and for
stages with an inference evaluation (fine-tuning) also the decoding step, then prints a table: per-device
HBM (arguments, temporaries, total) against the chip's HBM, whether it fits with HEADROOM free, FLOPs per
step, a roofline step time and the stage's chip-hours, with the grid's totals. Results are cached per
(configuration, topology, library versions), so a second plan is instant and an interrupted one resumes.

  python -m launch plan gin/grids/paper.gin                          # the study on v3-32
  python -m launch plan gin/grids/paper.gin --topology=v5p-32 --only 'vanilla-*'

The step time is a roofline, not a measurement: max(FLOPs / peak bf16 FLOP/s, HBM bytes / HBM bandwidth)
per device, from XLA's cost analysis (communication, host input and decoding time are not counted).
XLA counts a loop body once, so the FLOPs come from the step lowered with its layer and microbatch scans
unrolled (`Trainer.flops_per_step`, the global count, divided by the devices), and the compiled step's
bytes are scaled by the same unrolled / compiled FLOP ratio.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

from launch.grid import LaunchError, Run, Stage

# Planning compiles for a TPU on a machine without one: JAX itself runs on the CPU, and libtpu must not
# look for TPU chips or ask a GCE metadata server (jax sets TPU_SKIP_MDS_QUERY itself when it finds no
# chips; set here too, before jax is imported, so nothing is probed). Compiling touches no TPU, so the
# plan need not wait for libtpu's one-process lock (/tmp/libtpu_lockfile), which any other process that
# initialised libtpu holds.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # one host: no warning about finding the others
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PLAN_VERSION = 1  # bump when the rows change meaning (invalidates the cache)
HEADROOM = 0.10   # a cell fits when at least this fraction of the device's HBM stays free
GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation (Google Cloud TPU documentation)."""
  generation: str
  hbm_gib: float        # HBM per chip
  bf16_tflops: float    # peak bfloat16 TFLOP/s per chip
  hbm_gbps: float       # HBM bandwidth per chip, GB/s
  source: str


CHIPS = {
    "v3": Chip("v3", 32.0, 123.0, 900.0, "https://cloud.google.com/tpu/docs/v3"),
    "v4": Chip("v4", 32.0, 275.0, 1200.0, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16.0, 197.0, 819.0, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95.0, 459.0, 2765.0, "https://cloud.google.com/tpu/docs/v5p"),
}
# Slice names (gcloud accelerator types) -> topology names of jax.experimental.topologies.
SLICES = {
    "v3-8": "v3:2x2", "v3-32": "v3:4x4",
    "v4-32": "v4:2x2x4",
    "v5litepod-16": "v5e:4x4", "v5e-16": "v5e:4x4",
    "v5p-32": "v5p:2x2x4",
}
DEFAULT_SLICE = "v3-32"

COLUMNS = ("run", "stage", "params", "mesh", "args_gib", "temp_gib", "total_gib", "decode_gib", "hbm_gib",
           "free_pct", "fits", "flops_per_step", "step_s", "steps", "chip_hours")


def topology_name(name: str) -> str:
  """'v3-32' -> 'v3:4x4'; a topology name ('v3:2x2') passes through; anything else is a LaunchError."""
  if name in SLICES:
    return SLICES[name]
  generation = name.split(":")[0]
  if ":" in name and generation in CHIPS:
    return name
  if name.lower().startswith(("gpu", "cuda", "h100", "a100", "h200")):
    raise LaunchError(f"--topology={name}: a GPU cannot be compiled for without one here (XLA's GPU "
                      "compiler needs the GPU's description from its driver); plan on a GPU machine.")
  raise LaunchError(f"--topology={name} is not known; use a slice ({', '.join(SLICES)}) or a topology "
                    f"'<generation>:<shape>' with generation in {', '.join(CHIPS)} (e.g. v3:2x2).")


def libtpu_version() -> Optional[str]:
  if importlib.util.find_spec("libtpu") is None:
    return None
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


@dataclasses.dataclass
class Slice:
  """A TPU topology's compile-only devices and its per-device figures (as JAX sees devices: a v3 chip
  is two devices, each with half the chip's HBM, FLOP/s and bandwidth)."""
  name: str
  chip: Chip
  devices: list
  num_chips: int

  @classmethod
  def get(cls, name: str) -> "Slice":
    topo = topology_name(name)
    if libtpu_version() is None:
      raise LaunchError("planning for a TPU needs its compiler, libtpu, which is not installed: "
                        "pip install -e \".[tpu]\"")
    from jax.experimental import topologies
    try:
      devices = list(topologies.get_topology_desc(topology_name=topo, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001  an unknown shape: libtpu's own message
      raise LaunchError(f"topology {topo}: {str(e).strip().splitlines()[0]}") from None
    chips = len({tuple(d.coords) for d in devices})
    return cls(topo, CHIPS[topo.split(":")[0]], devices, chips)

  @property
  def per_chip(self) -> int:
    return len(self.devices) // self.num_chips

  @property
  def hbm_bytes(self) -> float:
    return self.chip.hbm_gib * GIB / self.per_chip

  @property
  def flops_per_s(self) -> float:
    return self.chip.bf16_tflops * 1e12 / self.per_chip

  @property
  def bytes_per_s(self) -> float:
    return self.chip.hbm_gbps * 1e9 / self.per_chip

  def describe(self) -> str:
    c = self.chip
    return (f"{self.name}: {self.num_chips} TPU {c.generation} chips = {len(self.devices)} JAX devices; per "
            f"device {self.hbm_bytes / GIB:.1f} GiB HBM, {self.flops_per_s / 1e12:.1f} TFLOP/s bf16, "
            f"{self.bytes_per_s / 1e9:.0f} GB/s (per chip {c.hbm_gib:g} GiB, {c.bf16_tflops:g} TFLOP/s, "
            f"{c.hbm_gbps:g} GB/s: {c.source})")


# ---- building a stage's trainer from gin, without data ---------------------------------------------------
def vocab_size(spm_path: Optional[str], offline_vocab_size: int) -> int:
  """The padded vocabulary size the run will use, without reading data or the network: the T5
  vocabulary (32000 pieces + 100 sentinels -> 32128 rows), a local .model file's size, or the offline
  vocabulary's (offline_vocab_size pieces + 100 sentinels, padded)."""
  from tasks import vocabularies
  if spm_path == vocabularies.T5_VOCABULARY:
    pieces = 32000
  elif spm_path and os.path.exists(spm_path):
    import sentencepiece as spm
    pieces = spm.SentencePieceProcessor(model_file=spm_path).get_piece_size()
  elif spm_path:
    raise LaunchError(f"SPM_PATH {spm_path!r}: only the T5 vocabulary or a local file can be sized offline.")
  else:
    pieces = offline_vocab_size
  return -(-(pieces + 100) // 128) * 128


def train_settings() -> dict:
  """`train`'s arguments as the parsed gin configuration binds them (defaults filled in)."""
  import gin
  from scaling_arch import train as train_lib
  fn = train_lib.train
  target = getattr(fn, "__wrapped__", fn)
  out = {k: p.default for k, p in inspect.signature(target).parameters.items()}
  out.update(gin.get_bindings(fn))
  return out


def build_trainer(settings: dict, devices: Sequence[Any]):
  """The stage's Trainer on the given (e.g. compile-only TPU) devices, built as train() builds it."""
  from scaling_arch import models as models_lib
  from scaling_arch import train as train_lib
  from scaling_arch import trainer as trainer_lib
  partitioner = settings["partitioner_factory"](devices=list(devices))
  vocab = vocab_size(settings["spm_path"], settings["offline_vocab_size"])
  model = models_lib.EncoderDecoderModel(settings["module_factory"](vocab_size=vocab))
  lr_fn = settings["learning_rate_fn"]()
  return trainer_lib.Trainer(model, partitioner, optimizer=settings["optimizer_factory"](lr_fn),
                             learning_rate_fn=lr_fn,
                             batch_shapes=train_lib.batch_shapes(settings["feature_lengths"],
                                                                 settings["batch_size"]),
                             num_microbatches=settings["num_microbatches"], seed=settings["seed"])


def lower_decode(trainer, settings: dict):
  """The lowered decoding step of the stage's inference evaluation (None when it has none)."""
  if settings.get("inference_evaluator") is None:
    return None
  import functools
  import gin
  import jax
  import jax.numpy as jnp
  from scaling_arch import decoding, evaluate
  evaluator = {k: p.default for k, p in inspect.signature(evaluate.InferenceEvaluator).parameters.items()}
  evaluator.update(gin.get_bindings(evaluate.InferenceEvaluator))
  lengths = settings["feature_lengths"]
  decode = functools.partial(evaluator.get("decoder_factory") or decoding.decoder)()
  fn = functools.partial(decode, trainer.model, max_length=lengths["targets"], eos_id=1, vocab_size=None)
  part = trainer.partitioner
  jitted = jax.jit(lambda params, tokens: fn(params, tokens)[0],
                   in_shardings=(trainer.param_shardings, part.batch_sharding), out_shardings=part.replicated)
  tokens = jax.ShapeDtypeStruct((evaluator["batch_size"], lengths["inputs"]), jnp.int32,
                                sharding=part.batch_sharding)
  with trainer.mesh_context():
    return jitted.lower(trainer.abstract_state.params, tokens)


# ---- memory -------------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _size(number: str, unit: str) -> float:
  return float(number) * _UNITS[unit[:1].upper() if unit else ""]


def oom_bytes(message: str) -> Optional[float]:
  """Per-device bytes XLA's out-of-memory message names (None if not one): the program's total ("Used X
  of Y hbm") or its temporaries ("HLO temporaries (X) exceeds available HBM"; see oom_memory)."""
  for pattern in (r"Used ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm",
                  r"temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds"):
    m = re.search(pattern, message)
    if m:
      return _size(m.group(1), m.group(2))
  return None


def oom_memory(message: str, args: float) -> dict:
  """args / temp / total bytes of a step XLA refused to compile for lack of HBM."""
  need = oom_bytes(message)
  if need is None:
    return {"args": args, "temp": float("nan"), "total": float("nan")}
  if "temporaries" in message:  # the temporaries alone: the arguments come on top
    return {"args": args, "temp": need, "total": args + need}
  return {"args": args, "temp": need - args, "total": need}


def _bytes_on_device(abstract_tree) -> float:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  import jax
  import numpy as np
  total = 0.0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  args = m.argument_size_in_bytes
  total = args + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes + \
      m.generated_code_size_in_bytes
  return {"args": float(args), "temp": float(m.temp_size_in_bytes), "total": float(total)}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return cost or {}


def _is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or oom_bytes(str(e)) is not None


def global_flops(trainer) -> float:
  """Trainer.flops_per_step for a step lowered for TPU devices this machine does not have: the PJRT
  plugin of a compile-only topology gives no cost analysis before compiling, so XLA's HLO cost analysis
  runs on the CPU backend instead (the same module: the count is the global one, scans unrolled)."""
  import jax
  from jax._src.lib import _jax  # no public entry point for a module's analysis on another backend
  lowered = trainer.lowered_unrolled_train_step()
  module = lowered._lowering.hlo().as_hlo_module()
  analysis = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  return float(analysis.get("flops", 0.0))


def plan_stage(settings: dict, sl: Slice, decode: bool = True) -> dict:
  """Compiles the configured stage for the slice: its memory, FLOPs, roofline step time and chip-hours."""
  import jax
  start = time.time()
  trainer = build_trainer(settings, sl.devices)
  n = len(sl.devices)
  batch = {k: jax.ShapeDtypeStruct(v, "int32", sharding=trainer.batch_shardings[k])
           for k, v in trainer.batch_shapes.items()}
  row = {"params": trainer.num_params, "rules": trainer.partitioner.rule_set,
         "mesh": "x".join(str(v) for v in trainer.partitioner.mesh.shape.values()),
         "mesh_axes": list(trainer.partitioner.mesh.shape), "error": ""}
  args = _bytes_on_device((trainer.abstract_state, batch))
  try:
    compiled = trainer.compiled_train_step()
    mem, cost = _memory(compiled), _cost(compiled)
  except Exception as e:  # noqa: BLE001
    if not _is_oom(e):
      raise
    mem, cost = oom_memory(str(e), args), {}
    row["error"] = "out of memory: " + " ".join(str(e).split())[:300]
  flops = global_flops(trainer)  # scans unrolled
  flops_device = flops / n
  compiled_flops = float(cost.get("flops", 0.0))
  scale = max(flops_device / compiled_flops, 1.0) if compiled_flops > 0 else 1.0
  bytes_device = float(cost.get("bytes accessed", 0.0)) * scale
  step_s = max(flops_device / sl.flops_per_s, bytes_device / sl.bytes_per_s)
  row.update(args_gib=mem["args"] / GIB, temp_gib=mem["temp"] / GIB, total_gib=mem["total"] / GIB,
             flops_per_step=flops, bytes_per_device=bytes_device, step_s=step_s,
             steps=int(settings["train_steps"]), decode_gib=None)
  if decode and not row["error"]:
    lowered = lower_decode(trainer, settings)
    if lowered is not None:
      try:
        row["decode_gib"] = _memory(lowered.compile())["total"] / GIB
      except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
          raise
        need = oom_bytes(str(e))
        row["decode_gib"] = need / GIB if need else float("nan")
        row["error"] = "decoding out of memory: " + " ".join(str(e).split())[:300]
  row["compile_s"] = time.time() - start
  jax.clear_caches()
  return row


def finish_row(row: dict, sl: Slice) -> dict:
  """Adds the slice-dependent columns: HBM, free fraction, fits, chip-hours."""
  hbm = sl.hbm_bytes / GIB
  peak = max([row["total_gib"]] + [row["decode_gib"]] * (row.get("decode_gib") is not None))
  row["hbm_gib"] = hbm
  row["free_pct"] = 100.0 * (1.0 - peak / hbm) if peak == peak else float("nan")
  row["fits"] = None if row["error"] == NOT_PLANNED else \
      bool(peak == peak and peak <= (1.0 - HEADROOM) * hbm and not row["error"])
  row["chip_hours"] = row["steps"] * row["step_s"] * sl.num_chips / 3600.0
  return row


# ---- the cache ----------------------------------------------------------------------------------------
def versions() -> dict:
  import jax
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "libtpu": libtpu_version(),
          "plan": PLAN_VERSION}


# Lines that change no compiled program: paths, and the seeds of a replicate (launch.Grid.seeds).
_PLACEHOLDERS = re.compile(r"^(MODEL_DIR|INITIAL_CHECKPOINT|TFDS_DATA_DIR|train\.seed|train\.data_seed)\s*=.*$",
                           re.M)


def config_key(topology: str, decode: bool) -> str:
  """Hash of the parsed gin configuration (paths and seeds left out), the topology and the library
  versions."""
  import gin
  config = _PLACEHOLDERS.sub("", gin.config_str())
  blob = json.dumps({"config": config, "topology": topology, "versions": versions(), "decode": decode},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Cache:
  """JSON lines of {key, row}: appended after each compiled stage, so an interrupted plan resumes."""

  def __init__(self, path: str):
    self.path = path
    self.rows: dict[str, dict] = {}
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            entry = json.loads(line)
            self.rows[entry["key"]] = entry["row"]
          except (ValueError, KeyError):
            continue  # a line cut short by an interruption

  def get(self, key: str) -> Optional[dict]:
    row = self.rows.get(key)
    return dict(row) if row is not None else None

  def put(self, key: str, row: dict) -> None:
    self.rows[key] = dict(row)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps({"key": key, "row": row}, sort_keys=True) + "\n")


def default_cache() -> str:
  return os.path.join(os.path.expanduser("~/.cache/scaling_arch/plan"), "cache.jsonl")


# ---- planning a grid ----------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
  """A progress bar with an ETA on stderr, one line per stage (readable in logs too)."""

  def __init__(self, total: int, out=None):
    self.total, self.out = total, out
    self.done = self.cached = 0
    self.compile_s: list[float] = []
    self.start = time.time()

  def update(self, key: str, seconds: Optional[float], note: str = "") -> None:
    self.done += 1
    if seconds is None:
      self.cached += 1
    elif seconds > 0:
      self.compile_s.append(seconds)
    left = self.total - self.done
    mean = sum(self.compile_s) / len(self.compile_s) if self.compile_s else 60.0
    width = 24
    filled = int(width * self.done / max(self.total, 1))
    eta = "-" if not left else _duration(mean * left)
    took = "cached" if seconds is None else "skipped" if not seconds else f"{seconds:.0f}s"
    print(f"plan [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {key} ({took}{note}) "
          f"elapsed {_duration(time.time() - self.start)} ETA {eta}", file=self.out or sys.stderr, flush=True)


def stage_bindings(stage: Stage) -> list[str]:
  """The stage's bindings with placeholder paths: planning reads no checkpoint and no data."""
  out = ["TFDS_DATA_DIR = '/tmp/scaling_arch_plan/tfds'"] + list(stage.bindings) + \
      ["MODEL_DIR = '/tmp/scaling_arch_plan/model_dir'"]
  if stage.previous is not None:
    out.append("INITIAL_CHECKPOINT = '/tmp/scaling_arch_plan/checkpoint'")
  return out


NOT_PLANNED = "not planned yet"


def _empty_row(error: str) -> dict:
  nan = float("nan")
  return {"params": 0, "mesh": "-", "rules": "-", "args_gib": nan, "temp_gib": nan, "total_gib": nan,
          "decode_gib": None, "flops_per_step": nan, "bytes_per_device": nan, "step_s": nan, "steps": 0,
          "error": error}


def plan(stages: Sequence[Stage], sl: Slice, cache: Cache, *, decode: bool = True,
         progress: Optional[Progress] = None, on_row: Optional[Callable[[dict], None]] = None,
         cached_only: bool = False) -> list[dict]:
  """Plans every stage (from the cache where it can; with `cached_only`, a stage not in the cache gets a
  NOT_PLANNED row instead of a compile); returns one row per stage, in order."""
  from scaling_arch import errors, gin_utils
  rows = []
  for stage in stages:
    start = time.time()
    row, seconds = None, None
    try:
      gin_utils.parse(stage.gin_files, stage_bindings(stage))
      key = config_key(sl.name, decode)
      row = cache.get(key)
      if row is None and cached_only:
        row = _empty_row(NOT_PLANNED)
      elif row is None:
        row = plan_stage(train_settings(), sl, decode)
        cache.put(key, row)
        seconds = time.time() - start
    except (errors.UserError, LaunchError, ValueError, TypeError) as e:
      row = _empty_row("configuration error: " + " ".join(str(e).split())[:300])
      seconds = time.time() - start
    row = finish_row({**row, "run": stage.run, "stage": stage.name}, sl)
    rows.append(row)
    if on_row:
      on_row(row)
    if progress:
      note = {True: "", False: ", DOES NOT FIT", None: ", not planned"}[row["fits"]]
      progress.update(stage.key, seconds if row["fits"] is not None else 0.0, note)
  return rows


# ---- the table ----------------------------------------------------------------------------------------
def _fmt(column: str, value) -> str:
  if value is None or (isinstance(value, float) and value != value):
    return "-"
  if column == "params":
    return f"{value / 1e6:,.1f}M"
  if column in ("args_gib", "temp_gib", "total_gib", "decode_gib", "hbm_gib"):
    return f"{value:.2f}"
  if column == "free_pct":
    return f"{value:.0f}%"
  if column == "fits":
    return "yes" if value else "NO"  # None (not planned) is "-" above
  if column == "flops_per_step":
    return f"{value:.3e}"
  if column == "step_s":
    return f"{value:.3f}"
  if column == "chip_hours":
    return f"{value:,.0f}"
  return str(value)


def totals(rows: Sequence[dict]) -> dict:
  """Chip-hours of the planned rows: all, per stage, per size column (the variant's size)."""
  def hours(rs):
    return sum(r["chip_hours"] for r in rs if r["chip_hours"] == r["chip_hours"])
  out = {"chip_hours": hours(rows), "stages": len(rows),
         "stages_planned": sum(r["fits"] is not None for r in rows),
         "stages_fitting": sum(bool(r["fits"]) for r in rows), "per_stage": {}, "per_size": {}}
  for r in rows:
    out["per_stage"].setdefault(r["stage"], 0.0)
    size = r["run"].split("-")[1] if "-" in r["run"] else r["run"]
    out["per_size"].setdefault(size, 0.0)
  for name in out["per_stage"]:
    out["per_stage"][name] = hours([r for r in rows if r["stage"] == name])
  for size in out["per_size"]:
    out["per_size"][size] = hours([r for r in rows if r["run"].split("-")[1:2] == [size]])
  out["per_architecture"] = {}
  for r in rows:
    arch = r["run"].split("-")[0]
    out["per_architecture"][arch] = out["per_architecture"].get(arch, 0.0) + hours([r])
  return out


def table(rows: Sequence[dict], sl: Slice) -> str:
  """The plan as an aligned text table, with the grid's totals and the figures used."""
  header = ("run", "stage", "params", "mesh", "args GiB", "temp GiB", "total GiB", "decode GiB",
            "HBM GiB", "free", "fits", "FLOPs/step", "step s", "steps", "chip-h")
  body = [tuple(_fmt(c, r.get(c)) + ("+fsdp" if c == "mesh" and r.get("rules") == "fully_sharded" else "")
                for c in COLUMNS) for r in rows]
  widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [header] + body]
  lines.insert(1, "  ".join("-" * w for w in widths))
  t = totals(rows)
  unplanned = t["stages"] - t["stages_planned"]
  lines += ["", f"total: {t['stages_fitting']}/{t['stages_planned']} stages fit with {HEADROOM:.0%} of HBM "
            + (f"free ({unplanned} of {t['stages']} not planned yet: their hours are missing); "
               if unplanned else "free; ")
            + f"estimated {t['chip_hours']:,.0f} chip-hours on {sl.name} ("
            + ", ".join(f"{k} {v:,.0f}" for k, v in t["per_stage"].items()) + ")",
            "per size: " + ", ".join(f"{k} {v:,.0f}" for k, v in t["per_size"].items()),
            "per architecture: " + ", ".join(f"{k} {v:,.0f}" for k, v in t["per_architecture"].items()),
            f"figures: {sl.describe()}",
            "step time: roofline max(FLOPs / peak, HBM bytes / bandwidth) per device from XLA's cost "
            "analysis (layer scans unrolled); not a measurement: communication and input are not counted."]
  return "\n".join(lines)


def remedies(row: dict) -> str:
  """What the project offers for a stage that does not fit (the plan's exit-1 listing)."""
  if row["error"].startswith("configuration error"):
    return row["error"]
  out = []
  if row.get("rules") != "fully_sharded":
    out.append("fully sharded parameters and optimizer state (add gin/meshes/fully_sharded.gin to the "
               "run: launch.Grid.extra_gin_files)")
  axes = row.get("mesh_axes") or []
  if "expert" not in axes and row["run"].startswith("switch-"):
    out.append("the expert mesh (gin/meshes/tpu_v3_16_expert.gin)")
  if "expert" in axes:
    out.append("more expert parallelism (e.g. --gin.MESH_SHAPE='(1, 2, 16)' on 32 devices)")
  elif "model" in axes:
    out.append("more model parallelism (e.g. --gin.MESH_SHAPE='(8, 4)' on 32 devices)")
  out.append("gradient accumulation (--gin.NUM_MICROBATCHES=2 or 4: the same batch in pieces)")
  return "; or ".join(out)


def markdown(rows: Sequence[dict], sl: Slice) -> str:
  """The planned rows as a Markdown table with the totals (rows not planned yet are counted, not listed)."""
  header = ("run", "stage", "params", "mesh", "args GiB", "temp GiB", "total GiB", "decode GiB", "free",
            "fits", "FLOPs/step", "step s", "chip-h")
  columns = ("run", "stage", "params", "mesh", "args_gib", "temp_gib", "total_gib", "decode_gib", "free_pct",
             "fits", "flops_per_step", "step_s", "chip_hours")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    if r["fits"] is None:
      continue
    cells = [_fmt(c, r.get(c)) + ("+fsdp" if c == "mesh" and r.get("rules") == "fully_sharded" else "")
             for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  t = totals(rows)
  lines += ["", f"{t['stages_planned']} of {t['stages']} stages planned, {t['stages_fitting']} fit with "
            f"{HEADROOM:.0%} of HBM free; {t['chip_hours']:,.0f} chip-hours for the planned stages on {sl.name} "
            "(" + ", ".join(f"{k} {v:,.0f}" for k, v in t["per_stage"].items()) + ").", "",
            "| size | chip-hours (planned stages) |", "|---|---|"]
  lines += [f"| {k} | {v:,.0f} |" for k, v in t["per_size"].items()]
  lines += ["", "| architecture | chip-hours (planned stages) |", "|---|---|"]
  lines += [f"| {k} | {v:,.0f} |" for k, v in t["per_architecture"].items()]
  return "\n".join(lines) + "\n"


def write(rows: Sequence[dict], sl: Slice, out_dir: str, name: str) -> tuple[str, str]:
  """Writes <out_dir>/<name>.csv, .json (rows, totals, figures) and .md; returns the CSV and JSON paths."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown(rows, sl))
  csv_path, json_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("csv", "json"))
  fields = list(COLUMNS) + ["rules", "bytes_per_device", "compile_s", "error"]
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k) for k in fields})
  with open(json_path, "w") as f:
    json.dump({"topology": sl.name, "figures": {**dataclasses.asdict(sl.chip), "devices": len(sl.devices),
                                                "chips": sl.num_chips, "hbm_gib_per_device": sl.hbm_bytes / GIB,
                                                "tflops_per_device": sl.flops_per_s / 1e12,
                                                "gbps_per_device": sl.bytes_per_s / 1e9},
               "headroom": HEADROOM, "versions": versions(), "totals": totals(rows),
               "rows": [{k: r.get(k) for k in fields} for r in rows]}, f, indent=1, default=str)
  return csv_path, json_path


def failing(rows: Sequence[dict]) -> list[dict]:
  return [r for r in rows if r["fits"] is False]


def failure_report(rows: Sequence[dict]) -> str:
  bad = failing(rows)
  lines = [f"{len(bad)} of {len(rows)} stages do not fit with {HEADROOM:.0%} of HBM free:"]
  for r in bad:
    need = "-" if r["total_gib"] != r["total_gib"] else f"{max(r['total_gib'], r.get('decode_gib') or 0):.2f}"
    lines.append(f"  {r['run']}/{r['stage']} (mesh {r['mesh']}, {r.get('rules', '-')} rules): needs {need} "
                 f"of {r['hbm_gib']:.2f} GiB per device. Remedy: {remedies(r)}")
  return "\n".join(lines)


def slice_for_grid(requested: Optional[str]) -> str:
  """The --topology given, else the grid's launch.TpuVm.accelerator_type, else v3-32."""
  if requested:
    return requested
  import gin
  try:
    return gin.query_parameter("launch.TpuVm.accelerator_type") or DEFAULT_SLICE
  except ValueError:
    return DEFAULT_SLICE


def run_plan(runs: Sequence[Run], *, topology: str, cache_path: Optional[str], out_dir: Optional[str],
             name: str, decode: bool = True, cached_only: bool = False, out=print) -> int:
  """`python -m launch plan`: plans, prints the table, writes CSV / JSON; 0 if every stage fits, else 1."""
  sl = Slice.get(topology)
  stages = [s for r in runs for s in r.stages]
  cache = Cache(cache_path or default_cache())
  print(f"planning {len(stages)} stages of {len(runs)} runs for {sl.describe()}; cache {cache.path}",
        file=sys.stderr, flush=True)
  rows = plan(stages, sl, cache, decode=decode, progress=Progress(len(stages)), cached_only=cached_only)
  out(table(rows, sl))
  csv_path, json_path = write(rows, sl, out_dir or os.path.dirname(os.path.abspath(cache.path)),
                              f"{name}-{sl.name.replace(':', '_')}")
  out(f"wrote {csv_path} and {json_path}")
  if failing(rows):
    out(failure_report(rows))
    return 1
  return 0


def check_before_launch(runs: Sequence[Run], accelerator_type: str, out=print) -> None:
  """Refuses (LaunchError) to start a grid whose stages do not all fit the slice; uses the plan's cache."""
  sl = Slice.get(accelerator_type)
  stages = [s for r in runs for s in r.stages]
  cache = Cache(default_cache())
  out(f"planning {len(stages)} stages for {accelerator_type} before creating any VM (cache {cache.path}; "
      "--skip-plan skips this)")
  rows = plan(stages, sl, cache, progress=Progress(len(stages)))
  bad = failing(rows)
  if bad:
    out(table(bad, sl))
    out(failure_report(rows))
    raise LaunchError(f"{len(bad)} stages do not fit {accelerator_type} (listed above); no VM was created. "
                      "Apply the remedies, or pass --skip-plan to launch anyway.")

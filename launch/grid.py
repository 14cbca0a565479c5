r"""The study grid: what runs exist, what each one is, and where it writes.

A grid gin file (gin/grids/*.gin) binds `launch.Grid`; `load()` parses it and `Grid.expand()` turns it
into `Run`s, each with a stable name, and each run into `Stage`s (pretrain, then fine-tune, ...), each
with its gin files, its gin bindings and its MODEL_DIR under the experiment root.

Run names are `<architecture>-<variant>`, e.g. `vanilla-base`, `glu-small-el16`.

Variant names: the "Scale Efficiently" protocol (Tay et al. 2021, arXiv 2109.10686)
-------------------------------------------------------------------------------------
A variant is a size of the ladder followed by zero or more depth / width knobs, and optionally a seed
knob last:

    <size>[-<knob><N>]...[-s<N>]   size in tiny, mini, small, base, large, xl, xxl; N a positive integer

Each depth / width knob replaces one or two of the size file's macros (gin/sizes/<size>.gin) with N; the
seed knob is the exception: it sets no macro but train's two seeds:

    knob  meaning                          macro override(s)
    nl    layers, both stacks              NUM_ENCODER_LAYERS = N, NUM_DECODER_LAYERS = N
    el    encoder layers                   NUM_ENCODER_LAYERS = N
    dl    decoder layers                   NUM_DECODER_LAYERS = N
    dm    model width d_model              EMBED_DIM = N
    ff    feed-forward width d_ff          MLP_DIM = N
    nh    attention heads                  NUM_HEADS = N
    kv    width of a head d_kv             HEAD_DIM = N
    s     seed replicate N                 train.seed = N, train.data_seed = 42 + N (not macros)

So `base-dl2` is base with 2 decoder layers, `small-el16` small with 16 encoder layers, `base-nh32` base
with 32 heads, `tiny-nl2-dm128` tiny with 2+2 layers of width 128. Each knob appears at most once, `nl`
does not combine with `el` or `dl`, and names are canonical: knobs in the order of the table above
(`base-dl2-nh8`, not `base-nh8-dl2`); a variant written in another order is renamed to the canonical one.

Seed replicates: `tiny-dm128-s1` is replicate 1 of the point `tiny-dm128` (the variant without the seed
knob, `Variant.point`): the same model, its own initialization and dropout (`train.seed = 1`) and its own
data order (`train.data_seed = 43`; 42 is train's default). Replicate 0 is the variant without the knob
(`s0` is not a name), which binds neither seed, so a grid that adds replicates keeps the names, MODEL_DIRs
and configurations of its existing runs. Every replicate is evaluated on the same
validation batches (train fixes their seed, whatever data_seed is). A grid
asks for replicates with `launch.Grid.seeds` = {variant pattern: number of seeds}, e.g. {'*': 2,
'tiny-dm64-*': 3}: shell-style patterns on the variant name (without the seed knob), the last matching
pattern wins (list the general ones first), default 1; a variant matched with K seeds becomes the variants
`<v>`, `<v>-s1`, ..., `<v>-s<K-1>`, in that order. A variant the grid names with a seed knob is taken as it is.

Stages: the grid lists (stage name, run gin file) pairs; every stage after the first initializes from the
final checkpoint of the stage before it (`--gin.INITIAL_CHECKPOINT="'<MODEL_DIR>/checkpoints/<step>'"`).
A stage's MODEL_DIR is `<EXPERIMENT_ROOT>/<run>/<stage>`.

Order of the gin layers of a stage (later wins): gin/models/<arch>.gin, gin/sizes/<size>.gin, the stage's
run file, extra gin files for the run; then bindings: the grid's `overrides`, its raw `bindings`, the
stage's `stage_overrides`, the variant's knobs (the seed knob's train.seed / train.data_seed last), the
run's `run_overrides`, and MODEL_DIR / INITIAL_CHECKPOINT. The grid owns the model and its size, so a
stage's run file must not include a model or size file or set a size macro (the run files in gin/runs/
used by grids are pure run files); a grid that names such a run file is refused.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import posixpath
import re
from typing import Any, Mapping, Optional, Sequence

import gin

SIZES = ("tiny", "mini", "small", "base", "large", "xl", "xxl")
KNOBS = {  # canonical order
    "nl": ("NUM_ENCODER_LAYERS", "NUM_DECODER_LAYERS"),
    "el": ("NUM_ENCODER_LAYERS",),
    "dl": ("NUM_DECODER_LAYERS",),
    "dm": ("EMBED_DIM",),
    "ff": ("MLP_DIM",),
    "nh": ("NUM_HEADS",),
    "kv": ("HEAD_DIM",),
}
SEED_KNOB = "s"  # last in the canonical order; binds train's seeds, not macros (see the module docstring)
DATA_SEED = 42  # train.data_seed of replicate 0 (train's default); replicate N gets DATA_SEED + N
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
SPEC_FILE = "launch_spec.json"


class LaunchError(Exception):
  """A mistake in a grid, its bindings or the command line, with what to do about it (one line)."""


# ---- variants ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
  """A size of the ladder plus depth / width knobs and a seed replicate; `name` is canonical."""
  name: str
  size: str
  knobs: tuple[tuple[str, int], ...]  # the depth / width knobs (the seed knob is `seed`)
  seed: int = 0  # the replicate (knob s); 0 for a variant without the seed knob

  @property
  def point(self) -> str:
    """The name without the seed knob: the point of the ladder or series that this replicate measures."""
    return "-".join([self.size] + [f"{k}{v}" for k, v in self.knobs])

  @property
  def overrides(self) -> dict[str, int]:
    """The macro overrides the knobs stand for, on top of gin/sizes/<size>.gin."""
    out = {}
    for knob, value in self.knobs:
      for macro in KNOBS[knob]:
        out[macro] = value
    return out

  @property
  def seed_bindings(self) -> dict[str, int]:
    """train.seed and train.data_seed of a replicate; none for replicate 0 (train's defaults)."""
    return {"train.seed": self.seed, "train.data_seed": DATA_SEED + self.seed} if self.seed else {}

  def replicate(self, seed: int) -> "Variant":
    """This variant's point at another seed (0: without the seed knob)."""
    return Variant(self.point + (f"-{SEED_KNOB}{seed}" if seed else ""), self.size, self.knobs, seed)


def parse_variant(name: str) -> Variant:
  """`base-dl2` -> Variant('base-dl2', 'base', (('dl', 2),)), `base-dl2-s1` -> the same with seed 1;
  raises LaunchError on a bad name."""
  size, *parts = name.split("-")
  if size not in SIZES:
    raise LaunchError(f"Variant {name!r}: {size!r} is not a size; use one of {', '.join(SIZES)}, "
                      "optionally followed by knobs such as -dl2 (see launch/grid.py).")
  knobs = {}
  for part in parts:
    m = re.fullmatch(r"([a-z]{1,2})([0-9]+)", part)
    if m and m.group(1) == SEED_KNOB and int(m.group(2)) == 0:
      raise LaunchError(f"Variant {name!r}: seed 0 is the variant without the seed knob; drop {part!r}.")
    if not m or m.group(1) not in (*KNOBS, SEED_KNOB) or int(m.group(2)) < 1:
      raise LaunchError(f"Variant {name!r}: {part!r} is not a knob; knobs are {', '.join(KNOBS)} followed "
                        "by a positive integer, e.g. base-dl2, small-el16, base-nh32, and s<N> for seed "
                        "replicate N (base-s1).")
    if m.group(1) in knobs:
      raise LaunchError(f"Variant {name!r} sets {m.group(1)} twice; give each knob once.")
    knobs[m.group(1)] = int(m.group(2))
  if "nl" in knobs and ({"el", "dl"} & set(knobs)):
    raise LaunchError(f"Variant {name!r} combines nl with el/dl; use either nl<N> (both stacks) or "
                      "el<N> and dl<N>.")
  ordered = tuple((k, knobs[k]) for k in KNOBS if k in knobs)
  return Variant(size, size, ordered).replicate(knobs.get(SEED_KNOB, 0))


_MODEL_LINES = re.compile(r"^\s*(include\s+['\"]gin/(models|sizes)/|(%s|ARCHITECTURE|SIZE)\s*=)" %
                          "|".join(sorted({m for macros in KNOBS.values() for m in macros})), re.M)


def sets_model(run_file: str) -> bool:
  """Whether a run gin file includes a model or size file or sets a size macro (a self-contained run, such
  as gin/runs/quickstart.gin, which a grid cannot use: the grid sets the model)."""
  from scaling_arch import gin_utils
  for path in (run_file, os.path.join(gin_utils.gin_root(), run_file)):
    if os.path.isfile(path):
      with open(path) as f:
        return bool(_MODEL_LINES.search(f.read()))
  return False


def render_binding(name: str, value: Any) -> str:
  """A gin binding line for a Python value: strings quoted, numbers, tuples, lists and dicts as literals."""
  return f"{name} = {value!r}"


# ---- runs and stages -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stage:
  """One training invocation of a run (pretrain, fine-tune, ...): its gin layers and its MODEL_DIR."""
  run: str
  name: str
  index: int
  architecture: str
  variant: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  model_dir: str
  previous: Optional["Stage"] = None  # the stage this one initializes from

  @property
  def key(self) -> str:
    return f"{self.run}/{self.name}"

  def spec(self) -> dict:
    """What identifies this stage's configuration (MODEL_DIR and the resolved checkpoint excluded)."""
    spec = {"run": self.run, "stage": self.name, "architecture": self.architecture, "variant": self.variant,
            "gin_files": list(self.gin_files), "bindings": list(self.bindings),
            "initialized_from": self.previous.name if self.previous else None}
    spec["hash"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec

  def train_args(self, initial_checkpoint: Optional[str] = None) -> list[str]:
    """Arguments of `python -m scaling_arch.train` for this stage."""
    args = [f"--gin_file={f}" for f in self.gin_files]
    args += [f"--gin.{b.replace(' = ', '=', 1)}" for b in self.bindings]
    args.append(f"--gin.MODEL_DIR={self.model_dir!r}")
    if initial_checkpoint:
      args.append(f"--gin.INITIAL_CHECKPOINT={initial_checkpoint!r}")
    return args


@dataclasses.dataclass(frozen=True)
class Run:
  """One architecture at one variant, trained through the grid's stages in order."""
  name: str
  architecture: str
  variant: Variant
  stages: tuple[Stage, ...]


def select(runs: Sequence[Run], patterns: Sequence[str]) -> list[Run]:
  """The runs whose name matches any of the shell-style patterns (all runs when there are none)."""
  if not patterns:
    return list(runs)
  chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
  if not chosen:
    raise LaunchError(f"--only {' '.join(patterns)} matches none of the grid's {len(runs)} runs (e.g. "
                      f"{runs[0].name if runs else '-'}); patterns are shell-style, e.g. 'vanilla-*'.")
  return chosen


# ---- the grid ------------------------------------------------------------------------------------------
@gin.configurable(module="launch")
class Grid:
  """A study grid: architectures x variants, trained in stages, under one experiment root.

  Args:
    name: the grid's name (for logs and TPU VM names).
    architectures: gin/models/<name>.gin for each.
    sizes: variants every architecture is trained at, e.g. ['tiny', 'small', 'base'].
    variants: further variants ("Scale Efficiently" knobs, e.g. 'base-dl2'), for the architectures in
      `variant_architectures` (default: all of them).
    seeds: {variant name pattern: number of seeds} for seed replicates, e.g. {'*': 2, 'tiny-dm64-*': 3}:
      the last pattern that matches a variant of `sizes` or `variants` wins, default 1 (no replicates); K
      seeds add the variants <v>-s1 ... <v>-s<K-1> after <v> (see the module docstring).
    stages: [(stage name, run gin file), ...] in order, e.g. [('pretrain', 'gin/runs/pretrain_c4.gin'),
      ('finetune', 'gin/runs/finetune.gin')].
    experiment_root: a local directory or gs:// path; MODEL_DIRs are <root>/<run>/<stage>.
    overrides: {macro or binding: value} for every stage of every run, e.g. {'TFDS_DATA_DIR': 'gs://b/t'}.
    bindings: raw gin binding lines for every stage (for values a dict cannot hold, e.g. @references).
    stage_overrides: {stage name: {macro or binding: value}}.
    run_overrides: {run name pattern: {macro or binding: value}}, e.g. {'switch-*': {'NUM_EXPERTS': 64}}.
    extra_gin_files: {run name pattern: [gin files]} appended after the run file, e.g. a mesh.
    required: grid macros that must be given a value (not None), e.g. ['EXPERIMENT_ROOT'].
    backend: the default backend, 'local' or 'tpu_vm' (the command line's --backend wins).
    state_dir: where the launcher keeps logs and pid files; default <root>/_launch for a local root,
      ~/.cache/scaling_arch/launch/<name> for a gs:// one.
  """

  def __init__(self, *, name: str, architectures: Sequence[str], sizes: Sequence[str],
               stages: Sequence[tuple[str, str]], experiment_root: Optional[str],
               variants: Sequence[str] = (), variant_architectures: Optional[Sequence[str]] = None,
               seeds: Optional[Mapping[str, int]] = None,
               overrides: Optional[Mapping[str, Any]] = None, bindings: Sequence[str] = (),
               stage_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
               run_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
               extra_gin_files: Optional[Mapping[str, Sequence[str]]] = None,
               required: Sequence[str] = (), backend: str = "local", state_dir: Optional[str] = None):
    self.name = name
    self.architectures = list(architectures)
    self.sizes = list(sizes)
    self.variants = list(variants)
    self.variant_architectures = list(variant_architectures if variant_architectures is not None
                                      else architectures)
    self.seeds = dict(seeds or {})
    self.stages = [tuple(s) for s in stages]
    self.experiment_root = experiment_root
    self.overrides = dict(overrides or {})
    self.bindings = list(bindings)
    self.stage_overrides = {k: dict(v) for k, v in (stage_overrides or {}).items()}
    self.run_overrides = {k: dict(v) for k, v in (run_overrides or {}).items()}
    self.extra_gin_files = {k: list(v) for k, v in (extra_gin_files or {}).items()}
    self.required = list(required)
    self.backend = backend
    self.state_dir_setting = state_dir
    self.path: Optional[str] = None  # the grid file, set by load()
    self._check()

  def _check(self) -> None:
    for arch in self.architectures + self.variant_architectures:
      if not _NAME.match(arch):
        raise LaunchError(f"Architecture {arch!r}: names are lowercase letters, digits and '_' "
                          "(the gin/models/<name>.gin file).")
    stray = set(self.variant_architectures) - set(self.architectures)
    if stray:
      raise LaunchError(f"variant_architectures {sorted(stray)} are not in the grid's architectures.")
    if not self.stages:
      raise LaunchError("The grid has no stages; bind launch.Grid.stages = [('pretrain', 'gin/runs/...')].")
    names = [s[0] for s in self.stages]
    for stage in self.stages:
      if len(stage) != 2 or not _NAME.match(str(stage[0])):
        raise LaunchError(f"Stage {stage!r}: give (name, run gin file) with a lowercase name.")
    if len(set(names)) != len(names):
      raise LaunchError(f"Stage names {names} repeat; give each stage its own name.")
    for name, run_file in self.stages:
      if sets_model(run_file):
        raise LaunchError(f"Stage {name!r}: {run_file} includes a model or size file or sets a size macro; "
                          "the grid sets the model and size, so give a pure run file (like "
                          "gin/runs/pretrain_local.gin).")
    unknown = set(self.stage_overrides) - set(names)
    if unknown:
      raise LaunchError(f"stage_overrides names stages {sorted(unknown)} that the grid does not have "
                        f"({', '.join(names)}).")
    for pattern, count in self.seeds.items():
      if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LaunchError(f"launch.Grid.seeds[{pattern!r}] = {count!r}; give a number of seeds, 1 or more "
                          "(1: no replicates), e.g. {'*': 2}.")
    if self.backend not in ("local", "tpu_vm"):
      raise LaunchError(f"launch.Grid.backend = {self.backend!r}; use 'local' or 'tpu_vm'.")

  # -- locations -------------------------------------------------------------------------------------
  @property
  def root(self) -> str:
    if not self.experiment_root:
      raise LaunchError("EXPERIMENT_ROOT is not set: pass --gin.EXPERIMENT_ROOT=\"'/path/to/dir'\" (or a "
                        "gs:// path for Cloud TPU).")
    root = str(self.experiment_root).rstrip("/")
    return root if "://" in root else os.path.abspath(os.path.expanduser(root))

  @property
  def state_dir(self) -> str:
    if self.state_dir_setting:
      return os.path.abspath(os.path.expanduser(self.state_dir_setting))
    if "://" in self.root:
      return os.path.join(os.path.expanduser("~/.cache/scaling_arch/launch"), self.name)
    return os.path.join(self.root, "_launch")

  # -- expansion -------------------------------------------------------------------------------------
  def seed_count(self, variant: Variant) -> int:
    """How many seeds `seeds` asks for at a variant: the last matching pattern's number, else 1."""
    counts = [n for pattern, n in self.seeds.items() if fnmatch.fnmatchcase(variant.point, pattern)]
    return counts[-1] if counts else 1

  def replicates(self, variant: Variant) -> list[Variant]:
    """A variant of the grid and its seed replicates; one the grid names with a seed knob as it is."""
    if variant.seed:
      return [variant]
    return [variant.replicate(seed) for seed in range(self.seed_count(variant))]

  def run_names(self) -> list[tuple[str, Variant]]:
    """(architecture, variant) of every run, grouped by architecture, in the grid's order (a variant's
    seed replicates right after it)."""
    out, seen = [], set()
    for arch in self.architectures:
      names = self.sizes + (self.variants if arch in self.variant_architectures else [])
      for variant in (r for v in map(parse_variant, names) for r in self.replicates(v)):
        if (arch, variant.name) not in seen:
          seen.add((arch, variant.name))
          out.append((arch, variant))
    return out

  def expand(self) -> list[Run]:
    """Every run of the grid with its stages, MODEL_DIRs, gin files and bindings."""
    root = self.root
    runs = []
    for arch, variant in self.run_names():
      name = f"{arch}-{variant.name}"
      extra_files = [f for pattern, files in self.extra_gin_files.items()
                     if fnmatch.fnmatchcase(name, pattern) for f in files]
      run_bindings = [render_binding(k, v) for pattern, o in self.run_overrides.items()
                      if fnmatch.fnmatchcase(name, pattern) for k, v in o.items()]
      stages, previous = [], None
      for index, (stage_name, run_file) in enumerate(self.stages):
        bindings = ([render_binding(k, v) for k, v in self.overrides.items()] + list(self.bindings) +
                    [render_binding(k, v) for k, v in self.stage_overrides.get(stage_name, {}).items()] +
                    [render_binding(k, v) for k, v in {**variant.overrides, **variant.seed_bindings}.items()] +
                    run_bindings)
        model_files = (f"gin/models/{arch}.gin", f"gin/sizes/{variant.size}.gin")
        stage = Stage(run=name, name=stage_name, index=index, architecture=arch, variant=variant.name,
                      gin_files=(*model_files, run_file, *extra_files),
                      bindings=tuple(bindings), model_dir=posixpath.join(root, name, stage_name),
                      previous=previous)
        stages.append(stage)
        previous = stage
      runs.append(Run(name, arch, variant, tuple(stages)))
    return runs


def load(path: str, bindings: Sequence[str] = ()) -> Grid:
  """Parses a grid gin file (plus `NAME = VALUE` bindings, later wins) and returns its Grid."""
  from scaling_arch import gin_utils  # light: gin and the error types only
  import launch  # noqa: F401  registers launch.Grid, launch.Local, launch.TpuVm

  candidates = [path, os.path.join(gin_utils.gin_root(), path)]
  found = next((c for c in candidates if os.path.isfile(c)), None)
  if found is None:
    raise LaunchError(f"Grid file {path!r} not found; grids live in gin/grids/ (e.g. gin/grids/cpu_mini.gin).")
  gin.clear_config()
  gin.add_config_file_search_path(gin_utils.gin_root())
  try:
    gin.parse_config_files_and_bindings([found], list(bindings), finalize_config=False)
    grid = Grid()
  except LaunchError:
    raise
  except (ValueError, KeyError, SyntaxError, ImportError, TypeError, IOError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise LaunchError(f"Grid {path}: {first}") from None
  for macro in grid.required:
    try:
      value = gin.query_parameter(f"%{macro}")
    except ValueError:
      value = None
    if value is None:
      raise LaunchError(f"Grid {path} requires {macro}: pass --gin.{macro}=\"'...'\" (see the file's header).")
  grid.path = found
  return grid


def check_gin_files(runs: Sequence[Run]) -> None:
  """Every gin file the runs name exists (relative to the current directory or the repository)."""
  from scaling_arch import gin_utils
  seen = set()
  for run in runs:
    for stage in run.stages:
      for f in stage.gin_files:
        if f in seen:
          continue
        seen.add(f)
        if not (os.path.isfile(f) or os.path.isfile(os.path.join(gin_utils.gin_root(), f))):
          raise LaunchError(f"Run {run.name} stage {stage.name} needs gin file {f}, which does not exist; "
                            "fix the grid (architectures, sizes, stages) or add the file.")

"""Tests of the launch layer (`python -m launch`): grid expansion and naming, the local backend end to end
(real training in subprocesses, pretrain then fine-tune), retries and failures, a killed launcher resuming
from checkpoints, status, cancel, and the Cloud TPU VM backend against a fake `gcloud`.

Cost: each `python -m scaling_arch.train` subprocess pays ~25-40 s of imports, autograph and compilation
on a small CPU host, so one module fixture runs the end-to-end grid once (plus one killed launch) and the
tests read what it left. Everything else (expansion, TPU VMs with a fake gcloud, cancel with a fake
trainer) starts no training. No network.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types

import gin
import pytest

from launch import cli, records
from launch.grid import LaunchError, load, parse_variant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURES = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "gin", "models")))
PRETRAIN_STEPS = 40
FINETUNE_STEPS = 2
KILL_RUN = "vanilla-tiny-nl1"
BROKEN_RUN = "vanilla-tiny-nh4"
GOOD_RUNS = ["vanilla-tiny-nl1", "vanilla-tiny-nl2", "glu-tiny-nl1", "glu-tiny-nl2"]
# Adds one run, vanilla-tiny-nh4, whose gin binding does not exist: it fails every attempt.
BROKEN = ["--gin.EXTRA_VARIANTS=['tiny-nh4']",
          f"--gin.RUN_OVERRIDES={{'{BROKEN_RUN}': {{'train.no_such_argument': 1}}}}"]

RUN_FILE = """\
# Test {what} stage: the offline span-corruption task on CPU, {steps} steps of a batch of 8 (64/16 tokens).
# Requires: MODEL_DIR{requires}.
include 'gin/meshes/cpu.gin'
BATCH_SIZE = 8
TRAIN_STEPS = {steps}
INPUT_LENGTH = 64
TARGET_LENGTH = 16
DROPOUT_RATE = 0.0
ACTIVATION_DTYPE = 'float32'
SCAN_LAYERS = True
REMAT_POLICY = 'none'
train.model_dir = %MODEL_DIR
train.task_name = 'offline_span_corruption'
train.offline_vocab_size = 4000
train.feature_lengths = {{'inputs': %INPUT_LENGTH, 'targets': %TARGET_LENGTH}}
train.batch_size = %BATCH_SIZE
train.train_steps = %TRAIN_STEPS
train.eval_every_steps = 0
train.eval_steps = 1
train.log_every_steps = 5
train.checkpoint_config = @checkpoints.CheckpointConfig()
checkpoints.CheckpointConfig.save_every_steps = 10
checkpoints.CheckpointConfig.keep = 2
{extra}"""

GRID_FILE = """\
# Test grid: vanilla and GLU x two tiny depths (width 64), pretrain then fine-tune, offline on CPU.
# Requires: EXPERIMENT_ROOT.
import launch

EXPERIMENT_ROOT = None
EXTRA_VARIANTS = []
RUN_OVERRIDES = {{}}

launch.Grid.name = 'test'
launch.Grid.architectures = ['vanilla', 'glu']
launch.Grid.sizes = ['tiny-nl1', 'tiny-nl2']
launch.Grid.variants = %EXTRA_VARIANTS
launch.Grid.variant_architectures = ['vanilla']
launch.Grid.stages = [('pretrain', '{pretrain}'), ('finetune', '{finetune}')]
launch.Grid.experiment_root = %EXPERIMENT_ROOT
launch.Grid.overrides = {{'EMBED_DIM': 64, 'MLP_DIM': 128, 'NUM_HEADS': 2, 'HEAD_DIM': 32}}
launch.Grid.run_overrides = %RUN_OVERRIDES
launch.Grid.required = ['EXPERIMENT_ROOT']

launch.Local.concurrency = 2
launch.Local.max_retries = 1
launch.TpuVm.zone = 'test-zone1-a'
launch.TpuVm.poll_s = 0.01
launch.TpuVm.retry_delay_s = 0.0
launch.TpuVm.max_retries = 0
"""


# ---- helpers ---------------------------------------------------------------------------------------------
def write_grid(directory) -> str:
  """The test grid and its two run files in `directory`; returns the grid's path."""
  os.makedirs(directory, exist_ok=True)
  pretrain = os.path.join(directory, "pretrain.gin")
  finetune = os.path.join(directory, "finetune.gin")
  with open(pretrain, "w") as f:
    f.write(RUN_FILE.format(what="pretraining", steps=PRETRAIN_STEPS, requires="", extra=""))
  with open(finetune, "w") as f:
    f.write(RUN_FILE.format(what="fine-tuning", steps=FINETUNE_STEPS, requires=", INITIAL_CHECKPOINT",
                            extra="train.initial_checkpoint = %INITIAL_CHECKPOINT\n"))
  path = os.path.join(directory, "grid.gin")
  with open(path, "w") as f:
    f.write(GRID_FILE.format(pretrain=pretrain, finetune=finetune))
  return path


def child_env(cache_dir: str) -> str:
  """A --gin binding of launch.Local.env: one CPU device per stage, a shared compilation cache."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  return f"--gin.launch.Local.env={env!r}"


def launch(*args) -> tuple[int, str, str]:
  """`python -m launch ARGS` in this process: (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in args])
  gin.clear_config()
  return code, out.getvalue(), err.getvalue()


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read(path) -> str:
  with open(path) as f:
    return f.read()


def started_events(state_dir) -> int:
  """How many stage attempts the launcher has started in this state directory."""
  total = 0
  for root, _, names in os.walk(os.path.join(state_dir, "logs")):
    total += sum(e == "started" for n in names for e, _ in records.log_events(os.path.join(root, n)))
  return total


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(poll)
  raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- the naming protocol and grid expansion (no training) -----------------------------------------------
def test_variant_names_map_to_macro_overrides():
  assert parse_variant("base").overrides == {}
  assert parse_variant("base-dl2").overrides == {"NUM_DECODER_LAYERS": 2}
  assert parse_variant("small-el16").overrides == {"NUM_ENCODER_LAYERS": 16}
  assert parse_variant("base-nh32").overrides == {"NUM_HEADS": 32}
  v = parse_variant("tiny-kv32-nl2-dm128-ff512")
  assert v.name == "tiny-nl2-dm128-ff512-kv32"  # canonical knob order
  assert v.overrides == {"NUM_ENCODER_LAYERS": 2, "NUM_DECODER_LAYERS": 2, "EMBED_DIM": 128, "MLP_DIM": 512,
                         "HEAD_DIM": 32}
  for bad, message in [("huge", "is not a size"), ("base-xx2", "is not a knob"), ("base-dl0", "is not a knob"),
                       ("base-dl2-dl4", "twice"), ("base-nl2-el4", "combines nl")]:
    with pytest.raises(LaunchError, match=message):
      parse_variant(bad)


def test_seed_knob_is_last_and_binds_train_seeds():
  v = parse_variant("tiny-s2-kv32-dm128")
  assert (v.name, v.point, v.seed) == ("tiny-dm128-kv32-s2", "tiny-dm128-kv32", 2)  # s last in canonical order
  assert v.knobs == (("dm", 128), ("kv", 32))  # the depth / width knobs only
  assert v.overrides == {"EMBED_DIM": 128, "HEAD_DIM": 32}  # no macro for the seed
  assert v.seed_bindings == {"train.seed": 2, "train.data_seed": 44}
  assert parse_variant("base-s1").name == "base-s1" and parse_variant("base-s1").point == "base"
  bare = parse_variant("tiny-dm128")
  assert (bare.seed, bare.point, bare.seed_bindings) == (0, "tiny-dm128", {})  # replicate 0: train's defaults
  assert bare.replicate(3) == parse_variant("tiny-dm128-s3") and v.replicate(0) == parse_variant(v.point)
  for bad, message in [("tiny-s0", "seed 0 is the variant without the seed knob"), ("tiny-s1-s2", "twice"),
                       ("tiny-x1", "is not a knob"), ("tiny-sd1", "is not a knob")]:
    with pytest.raises(LaunchError, match=message):
      parse_variant(bad)


def test_grid_seeds_expand_to_replicates_with_their_own_seeds():
  from launch.grid import Grid
  kwargs = dict(name="g", architectures=["vanilla", "glu"], sizes=["tiny-dm64", "tiny-dm96", "tiny-dm128"],
                variants=["tiny-nl2", "tiny-dm96-s5"], variant_architectures=["glu"],
                experiment_root="/tmp/unused_g", stages=[("pretrain", "gin/runs/pretrain_local.gin")])
  plain = {r.name: r for r in Grid(**kwargs).expand()}
  runs = Grid(**kwargs, seeds={"*": 2, "tiny-dm64": 3, "tiny-nl*": 1}).expand()
  assert [r.name for r in runs] == [
      "vanilla-tiny-dm64", "vanilla-tiny-dm64-s1", "vanilla-tiny-dm64-s2", "vanilla-tiny-dm96",
      "vanilla-tiny-dm96-s1", "vanilla-tiny-dm128", "vanilla-tiny-dm128-s1",
      "glu-tiny-dm64", "glu-tiny-dm64-s1", "glu-tiny-dm64-s2", "glu-tiny-dm96", "glu-tiny-dm96-s1",
      "glu-tiny-dm128", "glu-tiny-dm128-s1", "glu-tiny-nl2", "glu-tiny-dm96-s5"]  # last pattern wins
  by_name = {r.name: r for r in runs}
  for name, run in plain.items():  # replicate 0 is the run without seeds: same MODEL_DIR, same configuration
    assert by_name[name].stages[0].model_dir == run.stages[0].model_dir
    assert by_name[name].stages[0].spec() == run.stages[0].spec()
  stage = by_name["glu-tiny-dm64-s2"].stages[0]
  assert stage.model_dir == "/tmp/unused_g/glu-tiny-dm64-s2/pretrain" and stage.variant == "tiny-dm64-s2"
  assert stage.bindings[-3:] == ("EMBED_DIM = 64", "train.seed = 2", "train.data_seed = 44")
  assert "--gin.train.seed=2" in stage.train_args() and "--gin.train.data_seed=44" in stage.train_args()
  assert by_name["glu-tiny-dm96-s5"].stages[0].bindings[-2:] == ("train.seed = 5", "train.data_seed = 47")
  for bad in (0, 1.5, True):
    with pytest.raises(LaunchError, match="give a number of seeds"):
      Grid(**kwargs, seeds={"*": bad})


def test_cpu_mini_grid_with_seeds_parses_each_replicate_with_its_seeds():
  seeds = "launch.Grid.seeds = {'*': 2, 'tiny-dm64-*': 3, 'tiny-dm160-*': 3}"
  grid = load("gin/grids/cpu_mini.gin", ["EXPERIMENT_ROOT = '/tmp/unused_cpu_mini'", seeds,
                                         "launch.Grid.architectures = ['vanilla']"])
  runs = grid.expand()
  assert [r.variant.name for r in runs] == [
      "tiny-dm64-ff256-nh1", "tiny-dm64-ff256-nh1-s1", "tiny-dm64-ff256-nh1-s2", "tiny-dm96-ff384-nh1",
      "tiny-dm96-ff384-nh1-s1", "tiny-dm128-ff512-nh2", "tiny-dm128-ff512-nh2-s1", "tiny-dm160-ff640-nh2",
      "tiny-dm160-ff640-nh2-s1", "tiny-dm160-ff640-nh2-s2"]
  for run, stage in parse_every_stage(runs, last_step=200):
    seed = run.variant.seed
    if seed:
      assert (gin.query_parameter("train.seed"), gin.query_parameter("train.data_seed")) == (seed, 42 + seed)
    else:
      assert not any(b.startswith(("train.seed", "train.data_seed")) for b in stage.bindings)
    assert gin.query_parameter("%EMBED_DIM") == int(run.variant.point.split("-")[1][2:])


def test_a_self_contained_run_file_is_refused_as_a_stage():
  from launch.grid import Grid
  # quickstart.gin brings its own model and size; the grid sets those, so the stage is refused.
  with pytest.raises(LaunchError, match="quickstart.gin includes a model or size file"):
    Grid(name="g", architectures=["glu"], sizes=["tiny"], experiment_root="/tmp/unused_g",
         stages=[("pretrain", "gin/runs/quickstart.gin")])
  Grid(name="g", architectures=["glu"], sizes=["tiny"], experiment_root="/tmp/unused_g",
       stages=[("pretrain", "gin/runs/pretrain_local.gin"), ("finetune", "gin/runs/finetune_local.gin")])


def parse_every_stage(runs, last_step: int):
  """Parses each stage's gin files and bindings as the launcher would pass them (a later stage starting
  from its predecessor's checkpoint at `last_step`), yielding (run, stage) with the config in place."""
  from scaling_arch import gin_utils
  gin.clear_config()
  for run in runs:
    for stage in run.stages:
      bindings = list(stage.bindings) + [f"MODEL_DIR = {stage.model_dir!r}"]
      if stage.previous is not None:
        bindings.append(f"INITIAL_CHECKPOINT = '{stage.previous.model_dir}/checkpoints/{last_step}'")
      gin_utils.parse(stage.gin_files, bindings)
      yield run, stage
      gin.clear_config()


PAPER = ["--gin.EXPERIMENT_ROOT='gs://bucket/paper'", "--gin.TFDS_DATA_DIR='gs://bucket/tfds'"]


def test_paper_grid_expands_to_the_study_and_every_stage_parses():
  grid = load("gin/grids/paper.gin", [a[len("--gin."):].replace("=", " = ", 1) for a in PAPER])
  runs = grid.expand()
  archs = ["vanilla", "glu", "evolved", "universal", "switch", "performer", "funnel", "albert", "mos",
           "lightweight_conv", "dynamic_conv", "mixer"]
  variants = ["tiny", "mini", "small", "base", "large", "xl", "small-el16", "small-dl16", "base-dl2",
              "base-nh32", "base-ff6144", "base-dm1024-nh16"]
  assert [r.name for r in runs] == [f"{a}-{v}" for a in archs for v in variants]
  assert len(runs) == 144
  by_name = {r.name: r for r in runs}
  pre, fine = by_name["vanilla-base-dl2"].stages
  assert (pre.name, fine.name) == ("pretrain", "finetune") and fine.previous == pre
  assert pre.model_dir == "gs://bucket/paper/vanilla-base-dl2/pretrain"
  assert pre.gin_files == ("gin/models/vanilla.gin", "gin/sizes/base.gin", "gin/runs/pretrain_c4.gin")
  assert fine.gin_files[2] == "gin/runs/finetune.gin"
  assert "NUM_DECODER_LAYERS = 2" in pre.bindings and "TFDS_DATA_DIR = 'gs://bucket/tfds'" in pre.bindings
  assert by_name["switch-base"].stages[0].gin_files[-1] == "gin/meshes/tpu_v3_16_expert.gin"
  assert len({s.spec()["hash"] for r in runs for s in r.stages}) == 2 * len(runs)
  # Every stage's gin files and bindings parse and finalize.
  expected = {"base-dl2": ("%NUM_DECODER_LAYERS", 2), "small-el16": ("%NUM_ENCODER_LAYERS", 16),
              "base-nh32": ("%NUM_HEADS", 32), "base-ff6144": ("%MLP_DIM", 6144),
              "base-dm1024-nh16": ("%EMBED_DIM", 1024), "xl": ("%MLP_DIM", 16384)}
  parsed = 0
  lengths = {}
  for run, stage in parse_every_stage(runs, last_step=524288):
    parsed += 1
    assert gin.query_parameter("%ARCHITECTURE") == run.architecture
    lengths[run.name, stage.name] = (gin.query_parameter("%INPUT_LENGTH"), gin.query_parameter("%TARGET_LENGTH"))
    if run.variant.name in expected:
      macro, value = expected[run.variant.name]
      assert gin.query_parameter(macro) == value, (run.name, macro)
    # The convolution models split d_model into heads; MLP-Mixer's token mixing halves it.
    assert gin.query_parameter("%EMBED_DIM") % (2 * gin.query_parameter("%NUM_HEADS")) == 0, run.name
    if run.architecture == "switch":
      assert gin.query_parameter("partitioning.Partitioner.axis_names") == ("data", "model", "expert")
  assert parsed == 2 * len(runs)
  # A Mixer's position-indexed weights start fine-tuning from its pretraining checkpoint, which must be at
  # least as long; the other architectures fine-tune with finetune.gin's longer 128 targets.
  for run in runs:
    pre, fine = lengths[run.name, "pretrain"], lengths[run.name, "finetune"]
    if run.architecture == "mixer":
      assert fine[0] <= pre[0] and fine[1] <= pre[1], (run.name, pre, fine)
    else:
      assert fine == (512, 128), run.name


def test_cpu_mini_grid_expands_and_parses():
  grid = load("gin/grids/cpu_mini.gin", ["EXPERIMENT_ROOT = '/tmp/unused_cpu_mini'"])
  runs = grid.expand()
  widths = {"tiny-dm64-ff256-nh1": 64, "tiny-dm96-ff384-nh1": 96, "tiny-dm128-ff512-nh2": 128,
            "tiny-dm160-ff640-nh2": 160}
  assert len(runs) == 12 * len(widths) and {r.architecture for r in runs} == set(ARCHITECTURES)
  assert runs[0].name == "vanilla-tiny-dm64-ff256-nh1"
  assert grid.state_dir == "/tmp/unused_cpu_mini/_launch"
  assert runs[0].stages[0].gin_files == ("gin/models/vanilla.gin", "gin/sizes/tiny.gin", "gin/runs/pretrain_local.gin")
  parsed = 0
  for run, stage in parse_every_stage(runs, last_step=200):
    parsed += 1
    assert gin.query_parameter("%ARCHITECTURE") == run.architecture
    # 4+4 layers: Switch's MoE layer is the 4th of each stack (EXPERT_EVERY = 4).
    assert gin.query_parameter("%NUM_ENCODER_LAYERS") == gin.query_parameter("%NUM_DECODER_LAYERS") == 4
    if run.architecture == "switch":
      assert gin.query_parameter("%EXPERT_EVERY") <= 4
    assert gin.query_parameter("%EMBED_DIM") == widths[run.variant.name]
    assert gin.query_parameter("%MLP_DIM") == 4 * widths[run.variant.name]
    assert gin.query_parameter("%TRAIN_STEPS") == 200
  assert parsed == len(runs)


def test_grid_mistakes_are_one_line_errors(tmp_path):
  grid = write_grid(tmp_path)
  code, _, err = launch("run", grid, "--dry-run")
  assert code == 2 and err.startswith("error:") and "requires EXPERIMENT_ROOT" in err and err.count("\n") == 1
  code, _, err = launch("run", grid, "--dry-run", f"--gin.EXPERIMENT_ROOT='{tmp_path}/x'", "--only", "nothing-*")
  assert code == 2 and "matches none" in err
  code, _, err = launch("run", grid, "--dry-run", f"--gin.EXPERIMENT_ROOT='{tmp_path}/x'",
                        "--gin.launch.Grid.stage_overrides={'fine_tune': {'TRAIN_STEPS': 3}}")
  assert code == 2 and "stage_overrides names stages ['fine_tune']" in err
  code, _, err = launch("run", grid, "--dry-run", f"--gin.EXPERIMENT_ROOT='{tmp_path}/x'",
                        "--gin.launch.Grid.architectures=['vanilla', 'no_such_arch']")
  assert code == 2 and "needs gin file gin/models/no_such_arch.gin" in err
  code, out, _ = launch("run", grid, "--dry-run", f"--gin.EXPERIMENT_ROOT='{tmp_path}/x'", "--only", "glu-*")
  assert code == 0 and out.count("-m scaling_arch.train") == 4
  tokens = [t for line in out.splitlines() if not line.startswith("#") for t in shlex.split(line)]
  assert f"--gin.INITIAL_CHECKPOINT='{tmp_path}/x/glu-tiny-nl1/pretrain/checkpoints/<final step of pretrain>'" in tokens
  assert not os.path.exists(tmp_path / "x")  # a dry run writes nothing


# ---- the local backend, end to end (real training) -----------------------------------------------------
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  """One end-to-end story, shared by the tests below:
  A. the launcher starts the grid's first run; when its pretraining has a checkpoint it is SIGKILLed;
  B. the whole grid, plus a broken run, runs to the end (the killed run resumes);
  C. the same grid again: nothing to do.
  """
  base = tmp_path_factory.mktemp("launch_e2e")
  grid = write_grid(base / "gin")
  root = base / "experiment"
  bindings = [f"--gin.EXPERIMENT_ROOT='{root}'", child_env(str(base / "jax_cache"))]
  story = types.SimpleNamespace(grid=grid, root=str(root), state=str(root / "_launch"), bindings=bindings)

  # A: kill the launcher (SIGKILL, its whole process group) once the first checkpoint exists.
  env = dict(os.environ, PYTHONPATH=REPO)
  launcher = subprocess.Popen([sys.executable, "-m", "launch", "run", grid, "--only", KILL_RUN, "--concurrency",
                               "1", *bindings], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
  model_dir = os.path.join(story.root, KILL_RUN, "pretrain")
  try:
    wait_for(lambda: os.path.exists(f"{model_dir}/checkpoints/10/_CHECKPOINT_METADATA")
             or launcher.poll() is not None, 400, "the first checkpoint")
  finally:
    os.killpg(launcher.pid, signal.SIGKILL)
    story.a_output = launcher.communicate()[0].decode()
  stage_pid = int(read(os.path.join(story.state, "pids", KILL_RUN, "pretrain.pid")).split()[0])
  # The orphaned stage got SIGTERM (parent-death signal): it checkpoints and exits.
  wait_for(lambda: not records.process_alive(stage_pid), 120, "the killed launcher's stage to exit")
  story.a_record = read_json(f"{model_dir}/run.json")

  # B: the whole grid and a broken run, to the end, in warm workers (launch.Local.reuse_processes).
  start = time.time()
  story.b_code, story.b_out, story.b_err = launch("run", grid, *bindings, *BROKEN,
                                                  "--gin.launch.Local.reuse_processes=True")
  story.b_seconds = time.time() - start
  story.started_after_b = started_events(story.state)

  # C: again, without the broken run: nothing to do.
  start = time.time()
  story.c_code, story.c_out, story.c_err = launch("run", grid, *bindings)
  story.c_seconds = time.time() - start
  return story


def test_local_stages_share_a_persistent_compilation_cache(monkeypatch, tmp_path):
  from launch.local import Local
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert Local().environment()["JAX_COMPILATION_CACHE_DIR"] == str(
      tmp_path / ".cache/scaling_arch/jax_compilation")
  assert "JAX_COMPILATION_CACHE_DIR" not in Local(compilation_cache_dir=None).environment()
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")  # the user's own setting wins
  assert Local().environment()["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"


def test_killed_launcher_leaves_a_checkpoint_and_the_rerun_resumes_from_it(e2e):
  assert e2e.a_record["status"] == "preempted", e2e.a_output  # SIGTERM reached the stage: it checkpointed
  stopped_at = e2e.a_record["step"]
  assert 10 <= stopped_at < PRETRAIN_STEPS
  log = read(os.path.join(e2e.state, "logs", KILL_RUN, "pretrain.log"))
  assert f"Restored from MODEL_DIR checkpoint at step {stopped_at}" in log
  record = read_json(os.path.join(e2e.root, KILL_RUN, "pretrain", "run.json"))
  assert record["status"] == "complete" and record["step"] == PRETRAIN_STEPS


def test_local_grid_pretrains_then_finetunes_every_run(e2e):
  assert e2e.b_code == 1, e2e.b_out + e2e.b_err  # 1: the broken run failed; the others completed
  for run in GOOD_RUNS:
    pre = read_json(os.path.join(e2e.root, run, "pretrain", "run.json"))
    fine = read_json(os.path.join(e2e.root, run, "finetune", "run.json"))
    assert (pre["status"], pre["step"]) == ("complete", PRETRAIN_STEPS), run
    assert (fine["status"], fine["step"]) == ("complete", FINETUNE_STEPS), run
    assert pre["architecture"] == run.split("-")[0]
    log = read(os.path.join(e2e.state, "logs", run, "finetune.log"))
    assert (f"Initialized from INITIAL_CHECKPOINT {e2e.root}/{run}/pretrain/checkpoints/{PRETRAIN_STEPS} "
            "(parameters only") in log
    spec = read_json(os.path.join(e2e.root, run, "finetune", "launch_spec.json"))
    assert spec["initialized_from"] == "pretrain" and "NUM_HEADS = 2" in spec["bindings"]
    assert spec["stages_per_machine"] == 2  # launch.Local.concurrency: step times shared the cores
  # B ran its stages in warm workers: the 9 attempts of B (8 good, 2 of the broken one, less A's pid) came
  # from fewer processes than attempts; each failed attempt ended its worker, so the retry had a new one.
  pids = [int(text.split("(pid ")[1].rstrip(")")) for run in GOOD_RUNS + [BROKEN_RUN]
          for stage in ("pretrain", "finetune")
          for event, text in records.log_events(os.path.join(e2e.state, "logs", run, f"{stage}.log"))
          if event == "started" and "(pid " in text]
  assert len(set(pids)) < len(pids) - 2, pids
  broken = [int(text.split("(pid ")[1].rstrip(")")) for event, text in
            records.log_events(os.path.join(e2e.state, "logs", BROKEN_RUN, "pretrain.log")) if event == "started"]
  assert len(set(broken)) == 2, broken
  depth = read_json(os.path.join(e2e.root, "glu-tiny-nl2", "pretrain", "run.json"))["num_params"]
  assert depth > read_json(os.path.join(e2e.root, "glu-tiny-nl1", "pretrain", "run.json"))["num_params"]


def test_second_invocation_does_nothing(e2e):
  assert e2e.c_code == 0, e2e.c_out + e2e.c_err
  assert "nothing to do" in e2e.c_out
  assert started_events(e2e.state) == e2e.started_after_b  # no stage was started
  assert e2e.c_seconds < 30


def test_failed_run_is_retried_then_failed_without_stopping_the_others(e2e):
  events = records.log_events(os.path.join(e2e.state, "logs", BROKEN_RUN, "pretrain.log"))
  assert [e for e, _ in events] == ["started", "exited", "started", "exited", "failed"]  # max_retries = 1
  assert not os.path.exists(os.path.join(e2e.state, "logs", BROKEN_RUN, "finetune.log"))
  assert f"FAILED   {BROKEN_RUN}/pretrain after 2 attempt(s)" in e2e.b_out
  code, out, _ = launch("status", e2e.grid, *e2e.bindings, *BROKEN)
  assert code == 0
  rows = {tuple(line.split()[:3]) for line in out.splitlines()}
  assert (BROKEN_RUN, "pretrain", "failed") in rows and (BROKEN_RUN, "finetune", "pending") in rows
  assert f"failed: {BROKEN_RUN}/pretrain: error: " in out and "no_such_argument" in out


def test_status_table_reads_run_records_and_metrics(e2e):
  code, out, _ = launch("status", e2e.grid, *e2e.bindings)
  assert code == 0
  lines = out.splitlines()
  assert lines[0].split() == ["run", "stage", "state", "step", "loss", "steps/s", "ETA"]
  for run in GOOD_RUNS:
    row = next(l.split() for l in lines if l.startswith(run + " ") and " pretrain " in l)
    assert row[2:4] == ["complete", f"{PRETRAIN_STEPS}/{PRETRAIN_STEPS}"] and float(row[4]) > 0
  assert "4/4 runs complete; 8 stages: 8 complete" in out


def test_changed_configuration_of_an_existing_run_is_refused(e2e):
  changed = f"--gin.RUN_OVERRIDES={{'{KILL_RUN}': {{'TRAIN_STEPS': 50}}}}"
  code, out, err = launch("run", e2e.grid, *e2e.bindings, changed, "--dry-run")
  assert code == 2 and out == ""
  assert f"Run {KILL_RUN} stage pretrain: " in err and "different configuration" in err
  assert "['TRAIN_STEPS = 50'] now" in err and err.count("\n") == 1


# ---- cancel (local), with a fake trainer -----------------------------------------------------------------
FAKE_TRAIN = """\
import json, os, signal, sys, time
model_dir = next(a.split('=', 1)[1].strip("'") for a in sys.argv if a.startswith('--gin.MODEL_DIR='))
os.makedirs(model_dir, exist_ok=True)
def record(status):
  with open(os.path.join(model_dir, 'run.json'), 'w') as f:
    json.dump({'status': status, 'step': 3, 'train_steps': 100}, f)
def stop(signum, frame):
  print('SIGTERM: checkpoint saved', flush=True)
  record('preempted')
  sys.exit(143)
signal.signal(signal.SIGTERM, stop)
record('running')
print('training', flush=True)
time.sleep(120)
"""


def test_cancel_terminates_the_launcher_and_its_stages(tmp_path):
  grid = write_grid(tmp_path / "gin")
  fake = tmp_path / "fake_train.py"
  fake.write_text(FAKE_TRAIN)
  root = tmp_path / "experiment"
  bindings = [f"--gin.EXPERIMENT_ROOT='{root}'", f"--gin.launch.Local.command=[{sys.executable!r}, '{fake}']"]
  launcher = subprocess.Popen([sys.executable, "-m", "launch", "run", grid, "--only", "glu-*", *bindings], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
  try:
    runs = ("glu-tiny-nl1", "glu-tiny-nl2")
    pid_files = [root / "_launch" / "pids" / r / "pretrain.pid" for r in runs]
    records_ = [root / r / "pretrain" / "run.json" for r in runs]  # written once the SIGTERM handler is in
    wait_for(lambda: all(p.exists() for p in pid_files + records_), 60, "both stages to start")
    pids = [int(p.read_text().split()[0]) for p in pid_files]
    code, out, _ = launch("cancel", grid, *bindings)
    assert code == 0, out
    assert f"sent SIGTERM to the launcher (pid {launcher.pid})" in out and "cancelled" in out
    assert launcher.wait(timeout=30) == 143
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert not any(records.process_alive(p) for p in pids)
  for run in ("glu-tiny-nl1", "glu-tiny-nl2"):
    assert read_json(root / run / "pretrain" / "run.json")["status"] == "preempted"
    events = [e for e, _ in records.log_events(str(root / "_launch" / "logs" / run / "pretrain.log"))]
    assert events == ["started", "stopped"]
  code, out, _ = launch("status", grid, *bindings, "--only", "glu-*")
  assert ["glu-tiny-nl1", "pretrain", "preempted", "3/100"] in [l.split()[:4] for l in out.splitlines()]
  code, out, _ = launch("cancel", grid, *bindings)
  assert code == 0 and "nothing is running" in out


# ---- the Cloud TPU VM backend, against a fake gcloud -------------------------------------------------------
FAKE_GCLOUD = """\
#!{python}
# Fake gcloud: logs its argv, keeps the TPU VMs it "created" in a file, and for an ssh that trains, writes a
# complete run.json and a final checkpoint into the MODEL_DIR named in the command.
import ast, json, os, shlex, sys
args = sys.argv[1:]
log = os.environ['FAKE_GCLOUD_LOG']
with open(log, 'a') as f:
  f.write(json.dumps(args) + '\\n')
state = log + '.vms'
vms = set(json.load(open(state))) if os.path.exists(state) else set()
verb, name = (args[3], args[4]) if len(args) > 4 else ('', '')
if verb == 'describe':
  if name not in vms:
    sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found')
  print('READY')
elif verb == 'create':
  if os.environ.get('FAKE_GCLOUD_FAIL') == 'create':
    sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: no more capacity in the zone')
  vms.add(name)
elif verb == 'delete':
  vms.discard(name)
elif verb == 'ssh':
  command = next(a for a in args if a.startswith('--command='))[len('--command='):]
  for token in shlex.split(command):
    if token.startswith('--gin.MODEL_DIR='):
      model_dir = ast.literal_eval(token.split('=', 1)[1])
      os.makedirs(os.path.join(model_dir, 'checkpoints', '4'), exist_ok=True)
      open(os.path.join(model_dir, 'checkpoints', '4', '_CHECKPOINT_METADATA'), 'w').close()
      with open(os.path.join(model_dir, 'run.json'), 'w') as f:
        json.dump({{'status': 'complete', 'step': 4, 'train_steps': 4}}, f)
      print('step 4/4  loss 1.0')
json.dump(sorted(vms), open(state, 'w'))
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(FAKE_GCLOUD.format(python=sys.executable))
  script.chmod(0o755)
  log = tmp_path / "gcloud_calls.jsonl"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))

  def calls():
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
  return calls


def _tpu_args(tmp_path, *extra):
  return ["--backend=tpu_vm", "--only", KILL_RUN, f"--gin.EXPERIMENT_ROOT='{tmp_path}/experiment'",
          "--gin.launch.TpuVm.repo_url='https://example.com/scaling-arch.git'", "--skip-plan", *extra]


def test_tpu_vm_backend_creates_runs_on_every_worker_and_deletes(tmp_path, fake_gcloud):
  grid = write_grid(tmp_path / "gin")
  code, out, err = launch("run", grid, *_tpu_args(tmp_path))
  assert code == 0, out + err
  calls = fake_gcloud()
  verbs = [c[3] for c in calls]
  assert verbs.count("create") == 1 and "delete" not in verbs
  create = calls[verbs.index("create")]
  assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "scaling-arch-test-0"]
  assert "--accelerator-type=v3-32" in create and "--zone=test-zone1-a" in create
  ssh = [c for c in calls if c[3] == "ssh"]
  assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)  # install, pretrain, fine-tune
  setup, pretrain, finetune = (next(a for a in c if a.startswith("--command=")) for c in ssh)
  assert "git clone -q https://example.com/scaling-arch.git scaling-arch" in setup
  root = f"{tmp_path}/experiment/{KILL_RUN}"
  assert "python3 -m scaling_arch.train --distributed" in pretrain
  assert f"--gin.MODEL_DIR='{root}/pretrain'" in shlex.split(pretrain)
  assert f"--gin.INITIAL_CHECKPOINT='{root}/pretrain/checkpoints/4'" in shlex.split(finetune)
  assert verbs.index("create") < calls.index(ssh[0])
  # Again: every stage complete, nothing created, nothing started.
  code, out, _ = launch("run", grid, *_tpu_args(tmp_path))
  assert code == 0 and "nothing to do" in out and len(fake_gcloud()) == len(calls)
  # Cancel: stop training on the workers (SIGTERM), then delete the VM.
  code, out, _ = launch("cancel", grid, *_tpu_args(tmp_path))
  assert code == 0 and "deleted TPU VM scaling-arch-test-0" in out
  last = fake_gcloud()[len(calls):]
  assert [c[3] for c in last] == ["describe", "ssh", "delete"]
  assert "--worker=all" in last[1] and any(a.startswith("--command=") and "kill -TERM" in a for a in last[1])


def test_tpu_vm_create_failure_is_a_clear_error(tmp_path, fake_gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_GCLOUD_FAIL", "create")
  grid = write_grid(tmp_path / "gin")
  code, out, err = launch("run", grid, *_tpu_args(tmp_path))
  assert code == 2
  assert err.startswith("error: Could not create TPU VM scaling-arch-test-0 (v3-32 in test-zone1-a): ERROR: ")
  assert "RESOURCE_EXHAUSTED" in err and "quota and capacity" in err and err.count("\n") == 1
  assert [c[3] for c in fake_gcloud()] == ["describe", "create"]  # nothing else was attempted


def test_tpu_vm_dry_run_prints_every_command_and_runs_none(tmp_path, fake_gcloud):
  grid = write_grid(tmp_path / "gin")
  code, out, _ = launch("run", grid, "--backend=tpu_vm", f"--gin.EXPERIMENT_ROOT='{tmp_path}/exp'", "--dry-run",
                        "--only", "glu-tiny-nl1", "--gin.launch.TpuVm.spot=True",
                        "--gin.launch.TpuVm.delete_when_done=True")
  assert code == 0 and fake_gcloud() == []
  assert "gcloud compute tpus tpu-vm create scaling-arch-test-0 --accelerator-type=v3-32 " in out
  assert "--spot" in out and "tpu-vm scp" in out
  assert "archive --format=tar.gz -o /tmp/scaling-arch-code.tar.gz HEAD setup.py scaling_arch tasks gin" in out
  assert out.count("--worker=all") == 4  # scp, install, pretrain, fine-tune
  assert out.rstrip().endswith("gcloud compute tpus tpu-vm delete scaling-arch-test-0 --quiet --zone=test-zone1-a")
  code, out, _ = launch("run", grid, "--backend=tpu_vm", f"--gin.EXPERIMENT_ROOT='{tmp_path}/exp'", "--dry-run",
                        "--only", "glu-tiny-nl1", "--gin.launch.TpuVm.queued_resource=True",
                        "--gin.launch.TpuVm.spot=True")
  assert "gcloud compute tpus queued-resources create scaling-arch-test-0 --node-id=scaling-arch-test-0" in out


def test_cpu_study_grid_has_seeds_at_every_point_and_a_cloze_finetune():
  grid = load("gin/grids/cpu_study.gin", ["EXPERIMENT_ROOT = '/tmp/unused_cpu_study'"])
  runs = grid.expand()
  per_point = {}
  for run in runs:
    per_point.setdefault((run.architecture, run.variant.point), []).append(run.variant.seed)
  assert len(per_point) == 12 * 3 and {a for a, _ in per_point} == set(ARCHITECTURES)
  for (_, point), seeds in per_point.items():  # 3 seeds at the ends of the ladder, 2 in between
    assert sorted(seeds) == list(range(3 if point.startswith(("tiny-nl2-dm32-", "tiny-nl2-dm96-")) else 2)), point
  widths = sorted({int(p.split("-dm")[1].split("-")[0]) for _, p in per_point})
  assert {p.split("-dm")[0] for _, p in per_point} == {"tiny-nl2"}  # one depth: width sets the parameters
  assert widths[-1] ** 2 / widths[0] ** 2 >= 8  # >= 8x in non-embedding parameters (~ d_model^2)
  parsed = 0
  pretrain_steps = None
  for run, stage in parse_every_stage([r for r in runs if r.architecture in ("vanilla", "switch")], last_step=350):
    parsed += 1
    if stage.name == "pretrain":  # no run repeats a token of the 11.2M-token train split
      pretrain_steps = gin.query_parameter("%TRAIN_STEPS")
      assert pretrain_steps * gin.query_parameter("%BATCH_SIZE") * gin.query_parameter("%INPUT_LENGTH") < 11e6
    assert gin.query_parameter("train.offline_vocab_size") == 2000
    assert gin.query_parameter("offline_vocabulary.corpus") == "packages"
    if run.variant.seed:  # replicate 0 keeps train's default seeds
      assert gin.query_parameter("train.seed") == run.variant.seed
      assert gin.query_parameter("train.data_seed") == 42 + run.variant.seed
    if stage.name == "finetune":
      assert gin.query_parameter("train.task_name") == "sa_offline_cloze"
      assert gin.query_parameter("cloze_task.corpus") == "packages"
      assert gin.query_parameter("%LEARNING_RATE") == pytest.approx(0.003)
  assert parsed == 2 * 2 * 8 and pretrain_steps == 350
  load("gin/grids/cpu_study.gin", ["EXPERIMENT_ROOT = '/tmp/unused_cpu_study'"])
  assert gin.query_parameter("launch.Local.reuse_processes") is True  # the budget counts on warm workers

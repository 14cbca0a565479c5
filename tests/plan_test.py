"""`python -m launch plan`: compiling a grid's stages for a TPU topology on the CPU (libtpu), the table,
the cache and exit status 1 for a cell that does not fit; and the fully sharded rules giving the same
train step as the default ones."""

import importlib.util
import json
import os
import time

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from launch import cli, plan
from launch.grid import LaunchError
from scaling_arch import errors, gin_utils, partitioning

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the TPU compiler) is not installed: "
                                  "pip install -e \".[tpu]\" to plan for TPU topologies")

# A tiny grid on the study's run files, shrunk to compile in seconds, for a v3-8 slice (8 devices).
GRID = """\
import launch
launch.Grid.name = 'plantest'
launch.Grid.architectures = ['vanilla']
launch.Grid.sizes = ['tiny-nl1-dm64-ff128-nh2']
launch.Grid.stages = [('pretrain', 'gin/runs/pretrain_c4.gin'), ('finetune', 'gin/runs/finetune.gin')]
launch.Grid.experiment_root = '/tmp/unused_plantest'
launch.Grid.overrides = {'MESH_SHAPE': (4, 2), 'BATCH_SIZE': 16, 'INPUT_LENGTH': 64, 'TARGET_LENGTH': 16,
                         'evaluate.InferenceEvaluator.batch_size': 8}
launch.TpuVm.accelerator_type = 'v3-8'
"""


# One stage made too big for a v3 core's 16 GiB: d_model 4096 and d_ff 2^20 (17B parameters).
TOO_BIG = ["--gin.launch.Grid.sizes=['tiny-nl1-dm4096-ff1048576-nh2']",
           "--gin.launch.Grid.stages=[('pretrain', 'gin/runs/pretrain_c4.gin')]"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  """The tiny grid planned twice (the second from the cache): (outputs, seconds, rows, paths)."""
  root = tmp_path_factory.mktemp("plan")
  grid = root / "grid.gin"
  grid.write_text(GRID)
  args = ["plan", str(grid), "--cache", str(root / "cache.jsonl"), "--out", str(root / "out")]
  results = []
  for _ in range(2):
    lines = []
    start = time.time()
    code = plan_main(args, lines)
    results.append((code, "\n".join(lines), time.time() - start))
  with open(root / "out" / "plantest-v3_2x2.json") as f:
    data = json.load(f)
  return {"results": results, "json": data, "root": root, "grid": str(grid)}


def plan_main(args, lines):
  """cli.main with the plan's printed lines collected (progress goes to stderr)."""
  original = plan.run_plan

  def run_plan(*a, **k):
    return original(*a, **{**k, "out": lines.append})
  plan.run_plan = run_plan
  try:
    return cli.main(args)
  finally:
    plan.run_plan = original


@needs_libtpu
def test_a_tiny_grid_plans_with_sensible_numbers(planned):
  code, out, _ = planned["results"][0]
  assert code == 0, out
  header = out.splitlines()[0].split()
  for column in ("run", "stage", "params", "mesh", "args", "temp", "total", "decode", "HBM", "fits",
                 "FLOPs/step", "chip-h"):
    assert column in header
  assert "total: 2/2 stages fit" in out and "v3:2x2: 4 TPU v3 chips = 8 JAX devices" in out
  data = planned["json"]
  assert data["figures"]["hbm_gib_per_device"] == 16.0 and data["figures"]["chips"] == 4
  pre, fine = data["rows"]
  for row in (pre, fine):
    assert row["mesh"] == "4x2" and row["fits"] is True and row["error"] == ""
    assert 0 < row["args_gib"] < row["total_gib"] < 1.0
    # The logits' matmul alone (forward and backward: 3 x 2 FLOPs per multiply-add) is a lower bound;
    # 6 x parameters x tokens of both stacks an upper one (most parameters are the embedding table).
    vocab, dm = 32128, 64
    assert 6 * 16 * 16 * vocab * dm < row["flops_per_step"] < 6 * row["params"] * 16 * 80 * 2
    chips = 4
    assert row["chip_hours"] == pytest.approx(row["steps"] * row["step_s"] * chips / 3600, rel=1e-9)
    assert row["step_s"] >= row["flops_per_step"] / 8 / (123e12 / 2)
  assert (pre["steps"], fine["steps"]) == (524288, 100000)
  assert pre["decode_gib"] is None and 0 < fine["decode_gib"] < 1.0  # fine-tuning decodes
  assert data["totals"]["chip_hours"] == pytest.approx(pre["chip_hours"] + fine["chip_hours"])


@needs_libtpu
def test_the_second_plan_comes_from_the_cache(planned, capfd):
  (code1, out1, t1), (code2, out2, t2) = planned["results"]
  assert code2 == code1 == 0
  strip = lambda text: [l for l in text.splitlines() if not l.startswith("wrote")]  # noqa: E731
  assert strip(out1) == strip(out2)
  assert t2 < 0.5 * t1, (t1, t2)
  with open(planned["root"] / "cache.jsonl") as f:
    assert len(f.readlines()) == 2  # one line per compiled stage, none added by the second plan


@needs_libtpu
def test_a_cell_too_big_for_the_slice_exits_1_with_remedies(planned):
  lines = []
  code = plan_main(["plan", planned["grid"], "--cache", str(planned["root"] / "cache.jsonl"), *TOO_BIG,
                    "--out", str(planned["root"] / "big")], lines)
  out = "\n".join(lines)
  assert code == 1, out
  assert "1 of 1 stages do not fit" in out
  assert "vanilla-tiny-nl1-dm4096-ff1048576-nh2/pretrain" in out and "NO" in out
  assert "gin/meshes/fully_sharded.gin" in out and "NUM_MICROBATCHES" in out


@needs_libtpu
def test_tpu_vm_launch_plans_first_and_refuses_a_grid_that_does_not_fit(planned, monkeypatch, capsys):
  # The plan above is in the cache: the launcher's check reuses it, and no gcloud command runs.
  monkeypatch.setattr(plan, "default_cache", lambda: str(planned["root"] / "cache.jsonl"))
  monkeypatch.setenv("PATH", "/nonexistent")
  code = cli.main(["run", planned["grid"], "--backend=tpu_vm", "--gin.launch.TpuVm.zone='test-zone1-a'",
                   *TOO_BIG])
  out, err = capsys.readouterr()
  assert code == 2
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: 1 stages do not fit v3-8") and "--skip-plan" in last
  rows = [l for l in out.splitlines() if "vanilla-tiny-nl1-dm4096-ff1048576-nh2" in l and " NO " in l]
  assert rows and "(cached" in err, out
  assert "Remedy:" in out and "preparing TPU VM" not in out


def test_topologies_by_slice_name_and_clear_errors():
  assert plan.topology_name("v3-32") == "v3:4x4" and plan.topology_name("v5p-32") == "v5p:2x2x4"
  assert plan.topology_name("v4:2x2x4") == "v4:2x2x4"
  with pytest.raises(LaunchError, match="GPU cannot be compiled for without one"):
    plan.topology_name("gpu-h100")
  with pytest.raises(LaunchError, match="not known"):
    plan.topology_name("v9-8")


def test_plan_without_libtpu_is_one_clear_error(monkeypatch, tmp_path, capsys):
  (tmp_path / "grid.gin").write_text(GRID)
  monkeypatch.setattr(plan, "libtpu_version", lambda: None)
  assert cli.main(["plan", str(tmp_path / "grid.gin"), "--cache", str(tmp_path / "c.jsonl")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: planning for a TPU needs its compiler, libtpu") and ".[tpu]" in err[-1]


def test_vocabulary_size_and_oom_messages_offline():
  assert plan.vocab_size("gs://t5-data/vocabs/cc_all.32000/sentencepiece.model", 4000) == 32128
  assert plan.vocab_size(None, 4000) == 4224
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
             "Used 20.76G of 15.48G hbm. Exceeded hbm capacity by 5.28G.")
  assert plan.oom_bytes(message) == pytest.approx(20.76 * 2 ** 30)
  assert plan.oom_bytes("HLO temporaries (15.71G) exceeds available HBM (15.48G)") == pytest.approx(15.71 * 2 ** 30)
  assert plan.oom_bytes("INVALID_ARGUMENT: something else") is None
  gib = 2 ** 30
  assert plan.oom_memory("HLO temporaries (15.71G) exceeds available HBM (15.48G)", 2 * gib)["total"] == \
      pytest.approx(17.71 * gib)  # temporaries, with the arguments on top
  assert plan.oom_memory(message, 2 * gib)["total"] == pytest.approx(20.76 * gib)


# ---- fully sharded rules: the same step ------------------------------------------------------------------
ONE_STEP_SETUPS = {
    # vanilla on a (data, model) mesh; Switch on an expert mesh, where `embed` splits over data x expert
    # for the dense weights and over data for the expert weights.
    "vanilla": (["NUM_ENCODER_LAYERS = 1", "NUM_DECODER_LAYERS = 1", "MESH_SHAPE = (8, 2)"], ("data",)),
    "switch": (["NUM_ENCODER_LAYERS = 2", "NUM_DECODER_LAYERS = 2", "EXPERT_EVERY = 2", "NUM_EXPERTS = 4",
                "MESH_SHAPE = (2, 2, 4)", "partitioning.Partitioner.axis_names = ('data', 'model', 'expert')"],
               ("data", "expert")),
}


def _one_step(arch, rules):
  extra, _ = ONE_STEP_SETUPS[arch]
  gin_utils.parse([f"gin/models/{arch}.gin", "gin/sizes/tiny.gin", "gin/runs/pretrain_local.gin"],
                  ["MODEL_DIR = '/tmp/unused'", "EMBED_DIM = 64", "MLP_DIM = 128", "NUM_HEADS = 2",
                   "HEAD_DIM = 16", "INPUT_LENGTH = 32", "TARGET_LENGTH = 8", *extra,
                   f"partitioning.Partitioner.rules = '{rules}'"])
  settings = plan.train_settings()
  tr = plan.build_trainer(settings, jax.devices())
  rng = np.random.RandomState(0)
  batch = {}
  for key, shape in tr.batch_shapes.items():
    if "segment_ids" in key:
      batch[key] = np.ones(shape, np.int32)
    elif "positions" in key:
      batch[key] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    elif "weights" in key:
      batch[key] = np.ones(shape, np.int32)
    else:
      batch[key] = rng.randint(3, 4000, shape).astype(np.int32)
  state, metrics = tr.train_step(tr.init_state(), tr.partitioner.put_batch(batch))
  specs = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(sh.spec) for path, sh in
           jax.tree_util.tree_flatten_with_path(tr.param_shardings)[0]}
  out = float(metrics["loss"]), jax.device_get(state.params), specs
  gin.clear_config()
  return out


@pytest.mark.parametrize("arch", sorted(ONE_STEP_SETUPS))
def test_fully_sharded_rules_give_the_same_train_step(arch):
  loss, params, specs = _one_step(arch, "default")
  loss_fs, params_fs, specs_fs = _one_step(arch, "fully_sharded")
  batch_axes = ONE_STEP_SETUPS[arch][1]
  embedding = "token_embedder/embedding"
  as_axes = lambda entry: (entry,) if isinstance(entry, str) else tuple(entry or ())
  assert "data" not in str(specs[embedding])
  assert batch_axes in [as_axes(e) for e in specs_fs[embedding]]  # embed split over the batch axes
  if arch == "switch":
    experts = [p for p in specs_fs if p.endswith("wi")]
    assert experts and all(specs_fs[p][-3:] == ("expert", "data", "model") for p in experts), \
        {p: specs_fs[p] for p in experts}
  assert loss_fs == pytest.approx(loss, rel=1e-5)
  flat, flat_fs = jax.tree.leaves(params), jax.tree.leaves(params_fs)
  assert len(flat) == len(flat_fs) > 5
  for a, b in zip(flat, flat_fs):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fully_sharded_rules_leave_activations_whole():
  """Only parameters take the `embed` rows: an activation's batch (or token-group) dimension claims the
  batch axes first, on a (data, model) mesh and on an expert mesh alike."""
  rules = partitioning.logical_axis_rules("fully_sharded")
  spec = lambda names: tuple(nn.logical_to_mesh_axes(names, rules))
  assert spec(("batch", "length", "embed")) == (("data", "expert"), None, None)
  assert spec(("expert_group", None, "embed")) == (("data", "expert"), None, None)
  assert spec(("embed", "mlp")) == (("data", "expert"), "model")
  assert spec(("expert", "embed", "expert_mlp")) == ("expert", "data", "model")
  assert partitioning.logical_axis_rules("default") == partitioning.LOGICAL_AXIS_RULES
  with pytest.raises(errors.MeshError, match="use one of 'default', 'fully_sharded'"):
    partitioning.logical_axis_rules("fsdp")


PAPER_PLAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "paper_plan")


@needs_libtpu
def test_the_committed_paper_plan_covers_the_grid_and_every_stage_fits():
  """docs/paper_plan is the plan of gin/grids/paper.gin as it is now: every stage's configuration (with
  these library versions) has a line in the committed cache, and every one fits v3-32."""
  from launch.grid import load
  grid = load("gin/grids/paper.gin", ["EXPERIMENT_ROOT = 'gs://bucket/paper'",
                                      "TFDS_DATA_DIR = 'gs://bucket/tfds'"])
  stages = [s for r in grid.expand() for s in r.stages]
  sl = plan.Slice.get("v3:4x4")
  versions = plan.versions()
  with open(os.path.join(PAPER_PLAN, "paper-v3_4x4.json")) as f:
    committed = json.load(f)
  if {k: committed["versions"].get(k) for k in ("jax", "jaxlib", "libtpu")} != {
      k: versions[k] for k in ("jax", "jaxlib", "libtpu")}:
    pytest.skip(f"the committed plan was made with {committed['versions']}, these are {versions}")
  cache = plan.Cache(os.path.join(PAPER_PLAN, "cache.jsonl"))
  try:
    rows = plan.plan(stages, sl, cache, cached_only=True)
  finally:
    gin.clear_config()
  assert len(rows) == 288
  unplanned = [f"{r['run']}/{r['stage']}" for r in rows if r["error"]]
  assert not unplanned, f"stages without a committed plan (re-plan, docs/paper_plan/README.md): {unplanned}"
  assert all(r["fits"] for r in rows), [r["run"] for r in rows if not r["fits"]]  # fits: with 10% of HBM free
  assert committed["totals"]["stages_fitting"] == 288
  np.testing.assert_allclose(committed["totals"]["chip_hours"], sum(r["chip_hours"] for r in rows), rtol=1e-6)

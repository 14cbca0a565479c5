"""Tests of the scaling-law analysis (scaling_arch/analysis): fits on synthetic power laws, crossovers,
regions, extrapolation, rank correlation, and the CLI end to end on a fixture experiment that the test
writes in the launcher's layout (EXPERIMENT_ROOT/<run>/<stage>/run.json, metrics.jsonl, launch_spec.json)
from known power laws, so the expected alphas and crossover follow from the formula, not a golden file."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from scaling_arch.analysis import AnalysisError, collect, compare, study
from scaling_arch.analysis import __main__ as cli
from scaling_arch.analysis.powerlaw import fit_power_law

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic(alpha, n=8, sigma=0.05, c=3.0, seed=0, direction=1):
  """y = c * x^(direction * alpha) * exp(noise) at n sizes over three decades of x."""
  rng = np.random.default_rng(seed)
  x = np.geomspace(1e12, 1e15, n)
  return x, c * x ** (direction * alpha) * np.exp(rng.normal(0.0, sigma, n))


# ---- power-law fits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,direction", [(0.3, 1), (-0.2, 1), (0.05, -1), (-0.04, -1)])
def test_alpha_interval_covers_true_alpha(alpha, direction):
  covered, errors, widths = 0, [], []
  trials = 40
  for seed in range(trials):
    x, y = synthetic(alpha, seed=seed, direction=direction)
    fit = fit_power_law(x, y, direction=direction, n_boot=1000, seed=seed)
    covered += fit.ci_low <= alpha <= fit.ci_high
    errors.append(fit.alpha - alpha)
    widths.append(fit.ci_high - fit.ci_low)
  # Nominal 95%; the case bootstrap of 8 points runs a little narrow, so ask for 80% of the datasets.
  assert covered / trials >= 0.8, f"the interval covered the true alpha in {covered}/{trials} datasets"
  assert abs(np.mean(errors)) < 0.005  # unbiased: the noise sd of the slope is about 0.008
  assert 0.005 < np.median(widths) < 0.06  # informative, not degenerate
  x, y = synthetic(alpha, seed=0, direction=direction)
  fit = fit_power_law(x, y, direction=direction)
  assert np.sign(fit.ci_low) == np.sign(fit.ci_high) == np.sign(alpha)  # the sign is resolved
  assert fit.r2 > 0.9


def test_exact_power_law_has_exact_alpha_and_r2():
  x = np.array([1e6, 3e6, 1e7, 4e7])
  fit = fit_power_law(x, 7.0 * x ** -0.07, direction=-1)
  assert fit.alpha == pytest.approx(0.07, abs=1e-9)
  assert fit.r2 == pytest.approx(1.0, abs=1e-9)
  assert fit.predict(2e7) == pytest.approx(7.0 * 2e7 ** -0.07, rel=1e-9)
  assert fit.ci_low == pytest.approx(0.07, abs=1e-9) and fit.ci_high == pytest.approx(0.07, abs=1e-9)


def test_fit_refuses_fewer_than_three_sizes():
  x = np.array([1e6, 1e6, 2e6, 2e6, 2e6])
  with pytest.raises(AnalysisError, match="2 distinct size.*at least 3"):
    fit_power_law(x, x ** 0.1, what="vanilla upstream vs flops")
  with pytest.raises(AnalysisError, match="not positive"):
    fit_power_law([1.0, 2.0, 3.0], [1.0, -2.0, 3.0])


# ---- seed replicates ---------------------------------------------------------------------------------
def seeded(offsets, alpha=0.05, c=30.0):
  """Losses y = c * x^-alpha * exp(offset) at 3 sizes x len(offsets[i]) seeds: (x, y, point labels)."""
  x = np.repeat([1e12, 1e13, 1e14], [len(o) for o in offsets])
  y = c * x ** -alpha * np.exp(np.concatenate(offsets))
  return x, y, np.repeat(["s", "m", "l"], [len(o) for o in offsets])


def test_seeds_are_fitted_through_their_means():
  offsets = list(np.random.default_rng(3).normal(0.0, 0.05, (3, 3)))  # 3 sizes x 3 seeds that scatter
  x, y, points = seeded(offsets)
  fit = fit_power_law(x, y, direction=-1, groups=points, n_boot=500)
  mx, my = x.reshape(3, 3).mean(axis=1), y.reshape(3, 3).mean(axis=1)
  slope, intercept = np.polyfit(np.log(mx), np.log(my), 1)
  assert fit.alpha == pytest.approx(-slope, rel=1e-9) and fit.intercept == pytest.approx(intercept, rel=1e-9)
  residual = np.log(my) - (intercept + slope * np.log(mx))
  assert fit.r2 == pytest.approx(1 - (residual ** 2).sum() / ((np.log(my) - np.log(my).mean()) ** 2).sum())
  assert (fit.n, fit.seeds_min, fit.seeds_max, fit.x_min, fit.x_max) == (3, 3, 3, 1e12, 1e14)
  pooled = math.sqrt(sum(((v - v.mean()) ** 2).sum() for v in y.reshape(3, 3)) / 6)
  assert fit.seed_sd == pytest.approx(pooled, rel=1e-9)
  x, y, points = seeded([[0.01, -0.01, 0.02], [0.0], [0.03, -0.02]])  # 3, 1 and 2 seeds
  uneven = fit_power_law(x, y, direction=-1, groups=points, n_boot=500)
  means = [y[points == p].mean() for p in ("s", "m", "l")]
  assert uneven.alpha == pytest.approx(-np.polyfit(np.log([1e12, 1e13, 1e14]), np.log(means), 1)[0], rel=1e-9)
  assert (uneven.n, uneven.seeds_min, uneven.seeds_max) == (3, 1, 3)


def test_seed_scatter_widens_the_interval():
  # The same three seed offsets at every size, in another order: the seed means lie exactly on a power law,
  # so a fit of the means alone has no scatter to resample; the seeds do.
  spread = 0.1
  x, y, points = seeded([[-spread, 0.0, spread], [spread, -spread, 0.0], [0.0, spread, -spread]])
  means_only = fit_power_law(x.reshape(3, 3).mean(axis=1), y.reshape(3, 3).mean(axis=1), direction=-1)
  with_seeds = fit_power_law(x, y, direction=-1, groups=points)
  assert with_seeds.alpha == pytest.approx(0.05, abs=1e-12) == means_only.alpha
  assert means_only.ci_high - means_only.ci_low < 1e-9  # ignores the seed scatter
  assert with_seeds.ci_high - with_seeds.ci_low > 0.01  # 0.1 of seed scatter over a decade per size
  assert with_seeds.ci_low < 0.05 < with_seeds.ci_high
  x, y, points = seeded([[-0.01, 0.0, 0.01], [0.01, -0.01, 0.0], [0.0, 0.01, -0.01]])
  small = fit_power_law(x, y, direction=-1, groups=points)
  assert small.ci_high - small.ci_low < (with_seeds.ci_high - with_seeds.ci_low) / 5  # more scatter, wider


def test_one_seed_per_point_is_the_plain_bootstrap_of_the_runs():
  x, y = synthetic(0.05, n=5, direction=-1, seed=4)
  n_boot, seed = 300, 11
  # The case bootstrap as it was before seeds: resample the runs, drop resamples of one x, fit each.
  idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
  bx, by = np.log(x)[idx], np.log(y)[idx]
  keep = np.ptp(bx, axis=1) > 0
  bx, by = bx[keep], by[keep]
  xm, ym = bx.mean(axis=1, keepdims=True), by.mean(axis=1, keepdims=True)
  slopes = ((bx - xm) * (by - ym)).sum(axis=1) / ((bx - xm) ** 2).sum(axis=1)
  for groups in (None, ["e", "a", "d", "b", "c"]):  # labels in any order: points in the order of their run
    fit = fit_power_law(x, y, direction=-1, n_boot=n_boot, seed=seed, groups=groups)
    np.testing.assert_array_equal(fit.boot_slope, slopes)
    tail = 100 * (1 - 0.95) / 2  # as fit_power_law computes it
    assert (fit.ci_low, fit.ci_high) == (np.percentile(-slopes, tail), np.percentile(-slopes, 100 - tail))
    assert fit.slope == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0], rel=1e-12)
    assert (fit.n, fit.seeds_min, fit.seeds_max) == (5, 1, 1) and math.isnan(fit.seed_sd)


# ---- comparisons -------------------------------------------------------------------------------------
def two_curves(noise=0.01, seed=0):
  """Losses of A (y = 30 x^-0.08) and B (y = k x^-0.03) at 8 sizes over 1e13..1e16, crossing at x* = 1e15:
  B is better below x*, the steeper A above."""
  rng = np.random.default_rng(seed)
  x = np.geomspace(1e13, 1e16, 8)
  k = 30.0 * 1e15 ** -0.05
  ya = 30.0 * x ** -0.08 * np.exp(rng.normal(0.0, noise, len(x)))
  yb = k * x ** -0.03 * np.exp(rng.normal(0.0, noise, len(x)))
  return fit_power_law(x, ya, direction=-1, seed=1), fit_power_law(x, yb, direction=-1, seed=2)


def test_crossover_finds_known_crossing():
  covered, errors = 0, []
  trials = 40
  for seed in range(trials):
    c = compare.crossover(*two_curves(seed=seed))
    assert c.found and c.support > 0.9
    assert (c.better_below, c.better_above) == ("b", "a")  # the steeper A overtakes B above x*
    assert c.ci_high / c.ci_low < 10  # an interval, not the whole range
    covered += c.ci_low <= 1e15 <= c.ci_high
    errors.append(math.log10(c.x) - 15.0)
  # The noise moves log10 x* by about 0.05 (sd); nominal 95% intervals, a little narrow with 8 points.
  assert max(abs(e) for e in errors) < 0.2
  assert abs(np.mean(errors)) < 0.03
  assert covered / trials >= 0.75, f"the interval covered x* in {covered}/{trials} datasets"


def test_crossover_absent_for_parallel_or_distant_lines():
  x = np.geomspace(1e13, 1e16, 6)
  fa = fit_power_law(x, 5 * x ** -0.05, direction=-1)
  assert not compare.crossover(fa, fit_power_law(x, 4 * x ** -0.05, direction=-1)).found
  far = compare.crossover(fa, fit_power_law(x, 4 * x ** -0.0501, direction=-1))  # meet near 1e1000
  assert not far.found and "outside the range" in far.note


def test_best_regions_switch_at_crossover():
  fa, fb = two_curves(noise=0.0)
  regions = compare.best_regions({"A": fa, "B": fb})
  assert [r[0] for r in regions] == ["B", "A"]
  assert math.log10(regions[0][2]) == pytest.approx(15.0, abs=0.05)
  assert regions[0][1] == pytest.approx(1e13, rel=1e-6) and regions[-1][2] == pytest.approx(1e16, rel=1e-6)


def test_extrapolation_error_of_known_kink():
  x = np.array([1e12, 1e13, 1e14, 1e15])
  y = 40.0 * x ** -0.05
  exact = compare.extrapolate(x, y, direction=-1)
  assert exact.rel_error == pytest.approx(0.0, abs=1e-9) and exact.covered and exact.n_fit == 3
  kinked = y.copy()
  kinked[-1] *= 1.1  # the largest model is 10% worse than the law
  e = compare.extrapolate(x, kinked, direction=-1)
  assert e.rel_error == pytest.approx(1 / 1.1 - 1, rel=1e-6)
  with pytest.raises(AnalysisError, match="needs 4"):
    compare.extrapolate(x[:3], y[:3])


def test_rank_correlation():
  up = [-5.0, -4.0, -3.5, -3.0]
  assert compare.rank_correlation(list("abcd"), up, [50, 60, 61, 70]).rho == pytest.approx(1.0)
  assert compare.rank_correlation(list("abcd"), up, [70, 61, 60, 50]).rho == pytest.approx(-1.0)
  few = compare.rank_correlation(list("abcd"), up, [50, math.nan, math.nan, 70])
  assert math.isnan(few.rho) and "needs 3" in few.note


# ---- the fixture experiment ------------------------------------------------------------------------
PARAMS = {"tiny": 15.6e6, "mini": 31.2e6, "small": 60.5e6, "base": 222.9e6, "large": 737.7e6}
TOKENS_PER_STEP, STEPS = 2560, 1000
# loss = c * C^-alpha and score = s * C^beta against total training FLOPs C. Upstream, albert crosses vanilla
# at C = 1e15 and glu is a little worse than vanilla throughout; downstream, glu is best throughout.
LAWS = {"vanilla": (30.0, 0.05, 2.0, 0.10), "glu": (30.5, 0.05, 2.1, 0.10),
        "albert": (30.0 * 1e15 ** -0.02, 0.03, 5.0, 0.07)}
PARAM_SHARE = {"vanilla": 1.0, "glu": 1.02, "albert": 0.4}  # albert shares layers: fewer parameters, same FLOPs


def write_run(root, arch, variant, *, size_params, flops_scale=1.0, status="complete", spec=True,
              nlp_in_record=True, finetune=True, upstream=True, noise=0.0):
  """Writes <root>/<arch>-<variant>/pretrain (and finetune) as training and the launcher would; the metrics
  follow LAWS from the FLOPs, 6 * size_params * tokens * flops_scale per step; returns the true values."""
  c, alpha, s, beta = LAWS[arch]
  params = size_params * flops_scale * PARAM_SHARE[arch]
  flops_per_step = 6 * size_params * flops_scale * TOKENS_PER_STEP
  compute = flops_per_step * STEPS
  loss = c * compute ** -alpha * math.exp(noise)
  score = s * compute ** beta * math.exp(-noise)
  steps_per_sec = 1.0 / (0.05 + flops_per_step / 5e13)  # a fixed overhead plus the FLOPs
  stage_dir = os.path.join(root, f"{arch}-{variant}", "pretrain")
  os.makedirs(stage_dir)
  steps = STEPS if status == "complete" else STEPS // 2
  record = {"architecture": arch, "size": variant.split("-")[0], "num_params": int(params),
            "flops_per_step": flops_per_step, "tokens_per_step": TOKENS_PER_STEP, "batch_size": 16,
            "train_steps": STEPS, "step": steps, "status": status, "steps_per_sec": steps_per_sec,
            "tokens_per_sec": steps_per_sec * TOKENS_PER_STEP, "final_loss": loss + 0.1, "devices": 1,
            "device_kind": "cpu", "eval_accuracy": 0.3}
  if upstream and nlp_in_record and status == "complete":
    record["eval_neg_log_perplexity"] = -loss
  with open(os.path.join(stage_dir, "run.json"), "w") as f:
    json.dump(record, f)
  with open(os.path.join(stage_dir, "metrics.jsonl"), "w") as f:
    for step in range(100, steps + 1, 100):
      f.write(json.dumps({"step": step, "loss": loss + 1000 / step, "steps_per_sec": steps_per_sec}) + "\n")
      if upstream and step % 500 == 0:  # the last evaluation (step 1000) is the final loss
        f.write(json.dumps({"step": step, "eval_neg_log_perplexity": -(loss + 500 / step - 0.5)}) + "\n")
  if spec:
    with open(os.path.join(stage_dir, "launch_spec.json"), "w") as f:
      json.dump({"run": f"{arch}-{variant}", "stage": "pretrain", "architecture": arch, "variant": variant,
                 "gin_files": [], "bindings": [], "initialized_from": None, "hash": "x"}, f)
  if finetune:
    ft_dir = os.path.join(root, f"{arch}-{variant}", "finetune")
    os.makedirs(ft_dir)
    with open(os.path.join(ft_dir, "run.json"), "w") as f:
      json.dump({**record, "status": "complete", "downstream_score": score, "glue_average": score}, f)
    with open(os.path.join(ft_dir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 10, "downstream/downstream_score": score}) + "\n")
  return {"loss": loss, "score": score, "compute": compute, "params": params, "step_time": 1 / steps_per_sec}


@pytest.fixture
def experiment(tmp_path):
  """3 architectures x 4 sizes, depth / width variants of vanilla and glu, one unfinished run."""
  root = str(tmp_path / "exp")
  os.makedirs(os.path.join(root, "_launch", "logs"))  # the launcher's state directory: not a run
  truth = {}
  noises = {"vanilla": [0.004, -0.003, 0.002, -0.004], "glu": [-0.002, 0.004, -0.004, 0.001],
            "albert": [0.003, -0.004, 0.001, 0.002]}
  for arch in LAWS:
    for i, size in enumerate(("tiny", "mini", "small", "base")):
      truth[f"{arch}-{size}"] = write_run(
          root, arch, size, size_params=PARAMS[size], noise=noises[arch][i], spec=(size != "mini"),
          nlp_in_record=(size != "small"), finetune=(arch, size) != ("albert", "base"))
  truth["vanilla-small-dl2"] = write_run(root, "vanilla", "small-dl2", size_params=PARAMS["small"],
                                         flops_scale=0.75)
  truth["vanilla-small-ff4096"] = write_run(root, "vanilla", "small-ff4096", size_params=PARAMS["small"],
                                            flops_scale=1.35)
  truth["glu-small-nl2"] = write_run(root, "glu", "small-nl2", size_params=PARAMS["small"], flops_scale=0.4)
  write_run(root, "glu", "large", size_params=PARAMS["large"], status="running", finetune=False)
  return root, truth


def test_collect_reads_the_layout(experiment):
  root, truth = experiment
  table = collect.collect(root)
  assert sorted(table.run) == sorted(list(truth) + ["glu-large"])
  row = table.set_index("run").loc["vanilla-small"]  # upstream only in metrics.jsonl: the last eval line
  assert row.neg_log_perplexity == pytest.approx(-(truth["vanilla-small"]["loss"] + 500 / STEPS - 0.5), rel=1e-9)
  row = table.set_index("run").loc["glu-mini"]  # no launch_spec.json: named from the directory
  assert (row.architecture, row.variant, row["size"], row.protocol) == ("glu", "mini", "mini", "ladder")
  assert row.train_flops == pytest.approx(truth["glu-mini"]["compute"], rel=1e-9)
  assert row.tokens == TOKENS_PER_STEP * STEPS
  assert row.downstream_score == pytest.approx(truth["glu-mini"]["score"], rel=1e-9)
  assert row.step_time == pytest.approx(truth["glu-mini"]["step_time"], rel=1e-9)
  assert row.num_params == int(truth["glu-mini"]["params"])
  protocols = table.set_index("run")[["protocol", "series"]].to_dict("index")
  assert protocols["vanilla-small-dl2"] == {"protocol": "depth", "series": "small-dl"}
  assert protocols["vanilla-small-ff4096"] == {"protocol": "width", "series": "small-ff"}
  running = table.set_index("run").loc["glu-large"]
  assert not running.included and "running" in running.skip_reason
  assert math.isnan(table.set_index("run").loc["albert-base"].downstream_score)


def test_report_builds_from_fixture(experiment, tmp_path, capsys):
  root, truth = experiment
  out = str(tmp_path / "out")
  assert cli.main([root, "--out", out, "--bootstrap", "400"]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith("collected 16 runs")
  runs = pd.read_parquet(os.path.join(out, "runs.parquet"))
  assert len(runs) == 16 and len(pd.read_csv(os.path.join(out, "runs.csv"))) == 16
  for column in ("architecture", "size", "protocol", "num_params", "flops_per_step", "train_flops", "tokens",
                 "steps_per_sec", "neg_log_perplexity", "downstream_score"):
    assert column in runs.columns

  alphas = pd.read_csv(os.path.join(out, "alphas.csv")).set_index(["architecture", "metric", "axis"])
  for arch, (_, alpha, _, beta) in LAWS.items():
    for metric, true in (("upstream", alpha), ("downstream", beta)):
      if (arch, metric) == ("albert", "downstream"):
        assert alphas.loc[(arch, metric, "flops")].n == 3  # its base run was not fine-tuned
      row = alphas.loc[(arch, metric, "flops")]
      assert row.ci_low - 0.005 <= true <= row.ci_high + 0.005, (arch, metric, row.alpha, true)
      assert row.alpha == pytest.approx(true, abs=0.01)
  for arch in LAWS:  # parameters are proportional to FLOPs within an architecture: the same alpha
    assert alphas.loc[(arch, "upstream", "params")].alpha == pytest.approx(
        alphas.loc[(arch, "upstream", "flops")].alpha, rel=1e-9)
    # step time = overhead + FLOPs / rate: its slope from the true values (numpy's polyfit).
    ladder = [truth[f"{arch}-{size}"] for size in ("tiny", "mini", "small", "base")]
    slope = np.polyfit(np.log([t["step_time"] for t in ladder]), np.log([t["loss"] for t in ladder]), 1)[0]
    assert alphas.loc[(arch, "upstream", "step_time")].alpha == pytest.approx(-slope, rel=1e-6)

  crossings = pd.read_csv(os.path.join(out, "crossovers.csv"))
  va = crossings[(crossings.metric == "upstream") & (crossings.axis == "flops") & (crossings.a == "albert") &
                 (crossings.b == "vanilla")].iloc[0]
  assert va.found and abs(math.log10(va.x) - 15.0) < 0.3 and va.better_above == "vanilla" and va.within_observed
  assert va.ci_low <= 1e15 <= va.ci_high
  regions = pd.read_csv(os.path.join(out, "regions.csv"))
  upstream = regions[regions.metric == "upstream"]
  assert list(upstream.best) == ["albert", "vanilla"]
  assert math.log10(upstream.iloc[0]["to"]) == pytest.approx(math.log10(va.x), abs=0.01)
  assert list(regions[regions.metric == "downstream"].best) == ["glu"]
  rank = pd.read_csv(os.path.join(out, "rank_correlation.csv"))
  tiny = rank[rank.matched == "size tiny"].iloc[0]
  assert tiny.n == 3 and -1.0 <= tiny.rho <= 1.0
  assert rank[rank.matched == "size base"].iloc[0].n == 2  # albert-base has no score: too few, a note
  extrapolation = pd.read_csv(os.path.join(out, "extrapolation.csv"))
  assert set(extrapolation.architecture) == {"vanilla", "glu", "albert"}
  extrapolation = extrapolation[extrapolation.metric == "upstream"].set_index(["architecture", "axis"])
  for arch in LAWS:  # a power law in FLOPs (noise 0.4%), not in step time (a fixed overhead bends it)
    assert abs(extrapolation.loc[(arch, "flops")].rel_error) < 0.02
    assert abs(extrapolation.loc[(arch, "step_time")].rel_error) > 2 * abs(extrapolation.loc[(arch, "flops")].rel_error)
  protocols = pd.read_csv(os.path.join(out, "protocols.csv")).set_index("variant")
  assert protocols.loc["small-ff4096"].flops_ratio == pytest.approx(1.35, rel=1e-9)
  assert protocols.loc["small-nl2"].delta_upstream == pytest.approx(
      truth["glu-small"]["loss"] - truth["glu-small-nl2"]["loss"], rel=1e-9)

  stems = ["scaling_upstream", "scaling_downstream", "vs_vanilla_upstream", "vs_vanilla_downstream",
           "protocols_upstream", "protocols_downstream"]
  md = open(os.path.join(out, "report.md")).read()
  page = open(os.path.join(out, "report.html")).read()
  for stem in stems:
    with open(os.path.join(out, "figures", f"{stem}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in open(os.path.join(out, "figures", f"{stem}.svg")).read()
    assert f"(figures/{stem}.png)" in md and f'alt="{stem}"' in page
  assert page.count("<img") == len(stems) and page.count("data:image/png;base64,") == len(stems)
  headings = ["## Runs", "## Skipped runs", "## Scaling laws (alpha)", "## Crossovers",
              "## Best architecture per compute region", "## Upstream versus downstream",
              "## Extrapolation check", "## Depth versus width"]
  for heading in headings:
    assert heading in md
  tables = md.count("\n|---|")
  assert tables >= len(headings) and page.count("<table>") == tables
  assert "glu-large" in md and "pretraining running" in md  # the skipped run, and why
  assert "alpha > 0" in md  # the sign convention is stated


def test_seed_replicates_are_collected_as_points_and_fitted_through_their_means(tmp_path, capsys):
  root = str(tmp_path / "exp")
  # vanilla: 3 seeds at the ends of the ladder, 2 between (one replicate without launch_spec.json).
  noises = {"tiny": [0.03, -0.02, 0.01], "mini": [-0.01, 0.02], "small": [0.02, -0.03], "base": [0.0, 0.01, -0.02]}
  for size, offsets in noises.items():
    for seed, noise in enumerate(offsets):
      variant = f"{size}-s{seed}" if seed else size
      write_run(root, "vanilla", variant, size_params=PARAMS[size], noise=noise, finetune=False,
                spec=(variant != "mini-s1"))
  write_run(root, "vanilla", "small-dl2", size_params=PARAMS["small"], flops_scale=0.75, finetune=False)
  write_run(root, "vanilla", "small-dl2-s1", size_params=PARAMS["small"], flops_scale=0.75, finetune=False,
            noise=0.01)
  table = collect.collect(root).set_index("run")
  row = table.loc["vanilla-tiny-s1"]
  assert (row.variant, row.point, row.seed, row["size"], row.knobs, row.protocol, row.series) == (
      "tiny-s1", "tiny", 1, "tiny", "", "ladder", "ladder")
  assert (table.loc["vanilla-mini-s1"].point, table.loc["vanilla-mini-s1"].seed) == ("mini", 1)  # from its name
  assert (table.loc["vanilla-tiny"].point, table.loc["vanilla-tiny"].seed) == ("tiny", 0)
  depth = table.loc["vanilla-small-dl2-s1"]
  assert (depth.point, depth.seed, depth.knobs, depth.protocol, depth.series) == (
      "small-dl2", 1, "dl2", "depth", "small-dl")

  result = study.analyse(collect.collect(root), n_boot=400)
  assert len(result.points) == 10 and list(result.means.point) == ["tiny", "mini", "small", "base"]
  assert list(result.means.seeds) == [3, 2, 2, 3]
  fit = result.alphas.set_index(["metric", "axis"]).loc[("upstream", "flops")]
  points = result.points
  mx = points.groupby("point", sort=False).train_flops.mean()
  my = points.groupby("point", sort=False).upstream_loss.mean()
  assert fit.alpha == pytest.approx(-np.polyfit(np.log(mx), np.log(my), 1)[0], rel=1e-9)
  assert (fit.n, fit.seeds_min, fit.seeds_max) == (4, 2, 3) and 0 < fit.seed_sd < 0.05 * my.max()
  protocols = result.protocols.set_index("variant")  # the depth point against the ladder's small, both means
  assert list(protocols.index) == ["small-dl2"]
  assert protocols.loc["small-dl2"].delta_upstream == pytest.approx(
      points[points.point == "small"].upstream_loss.mean() - table.loc[["vanilla-small-dl2",
      "vanilla-small-dl2-s1"]].upstream_loss.mean(), rel=1e-9)
  assert list(result.rank_correlation.matched[:4]) == ["size tiny", "size mini", "size small", "size base"]
  assert cli.main([root, "--out", str(tmp_path / "out"), "--bootstrap", "100"]) == 0
  line = next(l for l in capsys.readouterr().out.splitlines() if l.split()[:2] == ["vanilla", "upstream"])
  assert "n=4  seeds 2-3 per point, seed sd " in line, line
  assert result.extrapolation.set_index(["metric", "axis"]).loc[("upstream", "flops")].actual == pytest.approx(
      my["base"], rel=1e-12)  # the held-out largest size is its seed mean

  out = str(tmp_path / "out")
  assert cli.main([root, "--out", out, "--bootstrap", "200"]) == 0
  assert {"seeds_min", "seeds_max", "seed_sd"} <= set(pd.read_csv(os.path.join(out, "alphas.csv")).columns)
  md = open(os.path.join(out, "report.md")).read()
  assert "| seeds |" in md and "| seed sd |" in md and "| 2-3 |" in md and "seeds with replacement" in md


# ---- clear errors ------------------------------------------------------------------------------------
def one_error_line(capsys, argv, match):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_minor_tick_labels_do_not_crowd():
  from scaling_arch.analysis.figures import _minor_labels
  wide = _minor_labels(5.5)  # e.g. FLOPs from 9e11 to 5e12: one major tick (1e12)
  assert [wide(v) for v in (9e11, 2e12, 3e12, 4e12, 5e12)] == ["", "2e+12", "3e+12", "", "5e+12"]
  narrow = _minor_labels(1.02)  # e.g. losses from 5.22 to 5.30: minor ticks only, all labelled
  assert [narrow(v) for v in (5.22, 5.25, 5.3)] == ["5.22", "5.25", "5.3"]
  assert narrow(1.01) == "" and narrow(9.9) == ""  # beside a power of ten


def test_error_no_runs(tmp_path, capsys):
  os.makedirs(tmp_path / "empty" / "_launch")
  one_error_line(capsys, [str(tmp_path / "empty")], "holds no runs")
  one_error_line(capsys, [str(tmp_path / "absent")], "is not a directory")


def test_error_run_missing_metric(tmp_path, capsys):
  root = str(tmp_path / "exp")
  for size in ("tiny", "mini", "small"):
    write_run(root, "vanilla", size, size_params=PARAMS[size], upstream=(size != "mini"), finetune=False)
  one_error_line(capsys, [root], "vanilla-mini: eval_neg_log_perplexity")
  table = collect.collect(root, allow_missing=True)
  row = table.set_index("run").loc["vanilla-mini"]
  assert not row.included and row.skip_reason == "missing eval_neg_log_perplexity"


def test_error_single_size_per_architecture(tmp_path, capsys):
  root = str(tmp_path / "exp")
  for arch in LAWS:
    write_run(root, arch, "tiny", size_params=PARAMS["tiny"], finetune=False)
    write_run(root, arch, "tiny-nl2", size_params=PARAMS["tiny"], flops_scale=0.5, finetune=False)
  one_error_line(capsys, [root], "no architecture has complete runs at 3 or more sizes")
  with pytest.raises(AnalysisError, match="--series tiny-nl"):  # the way out names the depth series
    study.analyse(collect.collect(root))
  write_run(root, "vanilla", "tiny-nl1", size_params=PARAMS["tiny"], flops_scale=0.25, finetune=False)
  result = study.analyse(collect.collect(root), series="tiny-nl", n_boot=200)  # cpu_mini's depth ladder
  assert list(result.alphas[result.alphas.axis == "flops"].architecture) == ["vanilla"]
  assert result.alphas.iloc[0].alpha == pytest.approx(LAWS["vanilla"][1], abs=1e-6)
  upstream_notes = result.fit_notes[result.fit_notes.metric == "upstream"]
  assert set(upstream_notes.architecture) == {"albert", "glu"}  # two depths each: noted, not fitted
  assert upstream_notes.reason.str.contains("2 distinct size").all()
  assert cli.main([root, "--series", "tiny-dm"]) == 2
  assert "series 'tiny-dm' has no runs" in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path):
  os.makedirs(tmp_path / "empty")
  proc = subprocess.run([sys.executable, "-m", "scaling_arch.analysis", str(tmp_path / "empty")], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_runs_launched_beside_others_are_noted_as_timed_on_shared_cores(experiment):
  root, _ = experiment
  assert not any("shared cores" in n for n in study.analyse(collect.collect(root), n_boot=50).notes)
  for run in ("vanilla-tiny", "glu-small"):  # as the local launcher records --concurrency 2
    path = os.path.join(root, run, "pretrain", "launch_spec.json")
    with open(path) as f:
      spec = json.load(f)
    with open(path, "w") as f:
      json.dump({**spec, "stages_per_machine": 2}, f)
  table = collect.collect(root)
  assert table.set_index("run").loc["vanilla-tiny"].stages_per_machine == 2
  notes = study.analyse(table, n_boot=50).notes
  assert any(n.startswith("2 of ") and "up to 2 stages at once" in n and "shared cores" in n for n in notes), notes


def test_an_axis_of_one_major_tick_labels_its_minor_ticks(tmp_path):
  from matplotlib.figure import Figure
  from scaling_arch.analysis.figures import _axes_labels
  fig = Figure()
  ax = fig.add_subplot()
  ax.plot([2.3e11, 4.5e12], [4.6, 5.0])  # FLOPs over 1.3 decades: 1e12 is the only major tick
  _axes_labels(ax, "upstream")
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig).draw()
  labels = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
  assert "3e+11" in labels and "2e+12" in labels, labels

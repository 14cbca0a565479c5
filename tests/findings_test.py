"""Tests of the findings table (scaling_arch/analysis/findings.py): synthetic experiments with known power
laws and seed scatter, built so that each finding holds, fails, or is within the noise, and the verdicts
must follow."""

import math

import numpy as np
import pandas as pd
import pytest

from scaling_arch.analysis import findings, study

POINTS = {"tiny-dm32": 1e12, "tiny-dm64": 4e12, "tiny-dm96": 9e12}  # pretraining FLOPs per point
SEEDS = {"tiny-dm32": 3, "tiny-dm64": 2, "tiny-dm96": 3}


def runs_table(laws, *, seed_sd=0.002, rng_seed=0):
  """A collected runs table: for each architecture, (c, alpha, s, beta) gives upstream loss c * x^-alpha and
  downstream score s * x^beta at the FLOPs x of each point, times exp(noise) per seed (sd seed_sd)."""
  rng = np.random.default_rng(rng_seed)
  rows = []
  for arch, (c, alpha, s, beta) in laws.items():
    for point, x in POINTS.items():
      for seed in range(SEEDS[point]):
        loss = c * x ** -alpha * math.exp(rng.normal(0, seed_sd))
        score = s * x ** beta * math.exp(rng.normal(0, seed_sd))
        variant = point + (f"-s{seed}" if seed else "")
        rows.append({"run": f"{arch}-{variant}", "architecture": arch, "variant": variant, "size": "tiny",
                     "point": point, "seed": seed, "knobs": point.split("-")[1], "protocol": "width",
                     "series": "tiny-dm", "status": "complete", "included": True, "skip_reason": "",
                     "num_params": x / 1e6, "train_flops": x, "step_time": 0.01 * (x / 1e12) ** 0.5, "tokens": 1e6,
                     "steps_per_sec": 100 * (x / 1e12) ** -0.5,
                     "upstream_loss": loss, "neg_log_perplexity": -loss, "downstream_score": score,
                     "device_kind": "cpu", "devices": 1, "stages_per_machine": 1})
  return pd.DataFrame(rows)


def verdicts(laws, **kwargs):
  table = runs_table(laws, **{k: v for k, v in kwargs.items() if k in ("seed_sd", "rng_seed")})
  result = study.analyse(table, series="tiny-dm", n_boot=400, downstream_chance=kwargs.get("chance"))
  return result, dict(zip(result.findings.finding, result.findings.verdict))


# vanilla: the steepest upstream and downstream; performer and the mixer shallower upstream; albert negative
# downstream; evolved ahead of vanilla at the smallest point (both metrics), behind at the largest.
PAPER_LIKE = {"vanilla": (30.0, 0.05, 1e-5, 0.5), "performer": (12.0, 0.02, 3e-5, 0.45),
              "mixer": (14.0, 0.025, 5e-5, 0.42), "albert": (20.0, 0.035, 1e5, -0.3),
              "evolved": (12.0, 0.02, 3e-3, 0.3)}


def test_paper_like_experiment_agrees_with_the_paper():
  result, v = verdicts(PAPER_LIKE)
  assert v["vanilla has the best upstream slope"] == "agrees"
  assert v["vanilla has the best downstream slope"] == "agrees"
  assert v["Performer scales poorly upstream"] == "agrees"
  assert v["MLP-Mixer scales poorly (upstream)"] == "agrees"
  assert v["ALBERT scales negatively downstream"] == "agrees"
  assert v["Evolved beats vanilla at the smallest size, not at the largest (downstream)"] == "agrees"
  assert v["Architectures scale differently"] == "agrees"
  targets = result.targets.set_index("target").met
  assert targets.iloc[0] and targets.iloc[2]  # vanilla's fit is clean; every architecture has a downstream fit
  # the numbers column carries the measured alphas
  row = result.findings.set_index("finding").loc["Performer scales poorly upstream", "this study"]
  assert f"{result.fits[('upstream', 'flops', 'performer')].alpha:+.4f}" in row


def test_opposite_experiment_disagrees():
  laws = dict(PAPER_LIKE)
  laws["performer"] = (300.0, 0.09, 1e-5, 0.5)  # steeper than vanilla upstream
  laws["albert"] = (20.0, 0.035, 1e-3, 0.3)  # positive downstream
  laws["evolved"] = (60.0, 0.06, 1e-5, 0.5)  # behind vanilla at the smallest point
  _, v = verdicts(laws)
  assert v["Performer scales poorly upstream"] == "disagrees"
  assert v["ALBERT scales negatively downstream"] == "disagrees"
  assert v["Evolved beats vanilla at the smallest size, not at the largest (upstream)"] == "disagrees"
  assert v["vanilla has the best upstream slope"] == "disagrees"  # performer is steeper beyond the bootstrap


def test_differences_within_the_seed_scatter_are_not_measurable():
  laws = {a: (30.0, 0.05, 1e-5, 0.5) for a in ("vanilla", "performer", "mixer", "albert", "evolved")}
  _, v = verdicts(laws, seed_sd=0.03)
  for finding in ("Performer scales poorly upstream", "MLP-Mixer scales poorly (upstream)",
                  "Evolved beats vanilla at the smallest size, not at the largest (upstream)"):
    assert v[finding] == "not measurable", finding


def test_downstream_at_chance_is_not_measurable():
  laws = {a: (c, alpha, 8.33, 0.0) for a, (c, alpha, _, _) in PAPER_LIKE.items()}  # flat at chance
  result, v = verdicts(laws, seed_sd=0.02, chance=8.33)
  measurable, evidence = findings.downstream_measurable(result, 8.33)
  assert not measurable and "0 of 15 points" in evidence
  for finding in ("vanilla has the best downstream slope", "ALBERT scales negatively downstream",
                  "Evolved beats vanilla at the smallest size, not at the largest (downstream)",
                  "Upstream quality does not reliably predict downstream"):
    assert v[finding] == "not measurable", finding
  assert v["Performer scales poorly upstream"] == "agrees"  # upstream findings are unaffected


def test_above_share_reads_the_bootstraps():
  result, _ = verdicts(PAPER_LIKE)
  van, perf = result.fits[("upstream", "flops", "vanilla")], result.fits[("upstream", "flops", "performer")]
  assert findings.above_share(van, perf) == pytest.approx(1.0)
  assert findings.above_share(perf, van) == pytest.approx(0.0)
  assert findings.above_share(van, van) == pytest.approx(0.5, abs=0.05)


def test_targets_count_fits_by_r2():
  laws = dict(PAPER_LIKE)
  result, _ = verdicts(laws)
  t = result.targets
  assert t.target.iloc[1].startswith("at least 4 of 5 architectures")
  assert t.met.iloc[1]
  noisy, _ = verdicts(laws, seed_sd=0.08, rng_seed=3)
  r2 = noisy.alphas[(noisy.alphas.metric == "upstream") & (noisy.alphas.axis == "flops")].set_index(
      "architecture").r2
  assert noisy.targets.met.iloc[1] == ((r2 >= 0.9).sum() >= 4)


def test_report_shows_the_findings_and_targets(tmp_path):
  from scaling_arch.analysis import report
  result, _ = verdicts(PAPER_LIKE)
  md = report.render_md(report.blocks(result, {}, "synthetic"))
  assert "## The study's findings, here" in md and "## Targets of the CPU study" in md
  assert "| Performer scales poorly upstream |" in md and "| agrees |" in md
  assert set(result.tables()) >= {"findings", "targets"}

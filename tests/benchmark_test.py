"""Tests of the train-step benchmark (scaling_arch/benchmark.py) on a tiny vanilla model.

The benchmark runs in-process on the 16 forced CPU devices (tests/conftest.py), with a one-layer
d_model-64 model, a 512-token vocabulary and a quick matmul-peak measurement; the checks are on the
consistency of the figures it returns (and writes), not on their speed.
"""

import json
import math

import gin
import jax
import pytest

from scaling_arch import benchmark, errors

# Tiny geometry: every size macro of the vanilla model, overridden.
L, D, FF, H, DH, V = 1, 64, 128, 2, 32, 512
BATCH, INPUTS, TARGETS = 16, 32, 8
GIN_FILES = ["gin/models/vanilla.gin", "gin/sizes/tiny.gin", "gin/runs/benchmark.gin"]
BINDINGS = [f"NUM_ENCODER_LAYERS={L}", f"NUM_DECODER_LAYERS={L}", f"EMBED_DIM={D}", f"MLP_DIM={FF}",
            f"NUM_HEADS={H}", f"HEAD_DIM={DH}"]


def vanilla_params() -> int:
  """Parameters of the vanilla model: tied embedding, relative bias tables, RMSNorm scales, kernels."""
  hd = H * DH
  encoder_layer = 4 * D * hd + 2 * D * FF + 2 * D
  decoder_layer = 8 * D * hd + 2 * D * FF + 3 * D
  return V * D + L * encoder_layer + L * decoder_layer + 2 * (D + H * 32)


def vanilla_train_flops() -> float:
  """Matmul FLOPs of one train step (forward x 3): encoder weights see the input tokens, decoder
  weights the target tokens (cross-attention keys/values the input tokens), plus attention and the
  tied output layer. 6 * params * (input + target tokens) would overcount an encoder-decoder ~2x."""
  hd = H * DH
  t_in, t_tgt = BATCH * INPUTS, BATCH * TARGETS
  forward = 2 * L * t_in * (4 * D * hd + 2 * D * FF)  # encoder projections and MLP
  forward += 2 * L * t_tgt * (4 * D * hd + 2 * D * hd + 2 * D * FF)  # decoder self q/k/v/o, cross q/o, MLP
  forward += 2 * L * t_in * 2 * D * hd  # cross-attention keys and values of the encoder output
  forward += 2 * t_tgt * D * V  # logits
  forward += 2 * 2 * L * BATCH * H * DH * (INPUTS * INPUTS + TARGETS * TARGETS + TARGETS * INPUTS)  # QK^T, AV
  return 3.0 * forward


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  path = tmp_path_factory.mktemp("benchmark") / "bench.json"
  lines = []
  try:
    out = benchmark.run_benchmark(
        gin_files=GIN_FILES, gin_bindings=BINDINGS, batch_size=BATCH, input_length=INPUTS, target_length=TARGETS, vocab_size=V,
        warmup_steps=1, steps=2, json_out=str(path), peak_sizes=(128, 256), peak_min_seconds=0.05,
        peak_trials=2, print_fn=lines.append)
  finally:
    gin.clear_config()
  return out, lines, path


def test_figures_are_consistent(result):
  r, _, _ = result
  assert r["devices"] == jax.device_count() == 16
  assert r["mesh"] == {"data": 16, "model": 1}
  assert r["num_params"] == vanilla_params()
  assert len(r["step_times"]) == 2
  assert 0 < r["step_time_best"] <= r["step_time_median"] <= max(r["step_times"])
  assert r["tokens_per_step"] == BATCH * (INPUTS + TARGETS)
  assert r["tokens_per_sec"] == pytest.approx(BATCH * (INPUTS + TARGETS) / r["step_time_median"], rel=1e-9)
  assert r["peak_flops_per_sec"] > 0
  assert r["peak_flops_per_sec"] == pytest.approx(r["peak_flops_per_sec_per_device"] * 16, rel=1e-9)
  assert r["peak_flops_per_sec"] == pytest.approx(r["peak_by_size"][str(r["peak_matmul_size"])], rel=1e-9)
  assert r["peak_flops_per_sec"] == pytest.approx(max(r["peak_by_size"].values()), rel=1e-9)
  assert r["peak_flops_per_sec"] == max(r["peak_flops_per_sec_before"], r["peak_flops_per_sec_after"])
  assert r["max_rss_bytes"] is None or r["max_rss_bytes"] > 0
  assert r["xla_peak_bytes"] is None or r["xla_peak_bytes"] > 0
  assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_time_median"] / r["peak_flops_per_sec"],
                                   rel=1e-9)
  assert r["mfu_best"] == pytest.approx(r["flops_per_step"] / r["step_time_best"] / r["peak_flops_per_sec"],
                                        rel=1e-9)
  assert 0 < r["mfu"] <= r["mfu_best"] < 1.5
  assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0


def test_flops_match_the_analytic_count(result):
  r, _, _ = result
  analytic = vanilla_train_flops()
  # XLA counts elementwise work (softmax, norms, loss, Adafactor) too: a little above the matmuls.
  assert 0.9 * analytic < r["flops_per_step"] < 1.3 * analytic, (r["flops_per_step"], analytic)


def test_printed_lines_and_json(result):
  r, lines, path = result
  text = "\n".join(lines)
  for prefix in ("config: vanilla tiny", "params: ", "matmul peak: ", "step time: median ", "tokens/s: ",
                 "memory: ", "FLOPs/step: ", "MFU: "):
    assert any(line.startswith(prefix) for line in lines), (prefix, text)
  assert f"params: {vanilla_params():,}" in lines
  assert f"MFU: {100 * r['mfu']:.1f}%" in text
  written = json.loads(path.read_text())
  assert written["mfu"] == pytest.approx(r["mfu"])
  assert written["flops_per_step"] == r["flops_per_step"]
  assert written["gin_bindings"] == BINDINGS
  assert written["gin_files"] == GIN_FILES


def test_bad_flags_are_user_errors():
  with pytest.raises(errors.ConfigError, match="steps"):
    benchmark.run_benchmark(steps=0)
  with pytest.raises(errors.ConfigError, match="vocab_size"):
    benchmark.random_batch(2, 4, 4, vocab_size=1)
  gin.clear_config()

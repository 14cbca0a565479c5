"""Funnel Transformer (pooling, pooled masks and positions, block split) and Evolved Transformer
(halved depth, segment-aware convolutions, convolution caches, parameter count)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import architectures_test as harness
from scaling_arch import models
from scaling_arch.architectures import evolved, funnel


def param_shapes(arch, bindings=(), size="tiny", vocab=harness.VOCAB):
  module = harness.build(arch, size=size, bindings=list(bindings), vocab=vocab)
  x = jnp.ones((1, harness.INPUT_LENGTH), jnp.int32)
  y = jnp.ones((1, harness.TARGET_LENGTH), jnp.int32)
  return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x, y, y)["params"])


def tiny_model(arch, bindings=harness.TINY):
  module = harness.build(arch, bindings=list(bindings))
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(1, harness.VOCAB, (2, harness.INPUT_LENGTH)), jnp.int32)
  tgt = jnp.asarray(rng.randint(1, harness.VOCAB, (2, harness.TARGET_LENGTH)), jnp.int32)
  variables = jax.jit(module.init)(jax.random.key(0), enc, harness.shift(tgt), tgt)
  return harness.jitted(module), {"params": variables["params"]}, enc, tgt


# -- Funnel -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,blocks", [(12, (4, 4, 4)), (6, (2, 2, 2)), (24, (8, 8, 8)), (4, (2, 1, 1)),
                                           (5, (2, 2, 1)), (2, (1, 1, 0)), (1, (1, 0, 0))])
def test_funnel_splits_layers_over_three_blocks(layers, blocks):
  assert funnel.split_layers(layers, 3) == blocks


def test_funnel_mean_pooling_stays_within_a_segment():
  x = jnp.arange(8, dtype=jnp.float32)[None, :, None] + 1.0   # values 1..8
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0]])
  pooled, pooled_seg = funnel.mean_pool(x, seg, 2)
  np.testing.assert_array_equal(pooled_seg, [[1, 1, 2, 0]])
  # Window (1, 1): mean; (1, 2): only the segment-1 token; (2, 2): mean; (0, 0): padding, zero.
  np.testing.assert_allclose(pooled[0, :, 0], [1.5, 3.0, 5.5, 0.0])
  _, seg_real_pad = funnel.mean_pool(x, jnp.asarray([[1, 1, 1, 0, 0, 0, 0, 0]]), 2)
  np.testing.assert_array_equal(seg_real_pad, [[1, 1, 0, 0]])


def test_funnel_encoder_pools_to_a_quarter_with_one_shared_position_table():
  module, variables, enc, tgt = tiny_model("funnel")
  params = variables["params"]
  # 2 encoder layers -> blocks (1, 1, 0): block 0 scanned, block 1's layer pools, block 2 pools alone.
  assert set(params["encoder"]) == {"block_0", "pool_1", "final_norm", "relpos"}
  assert nn.unbox(params["encoder"]["relpos"]["rel_embedding"]).shape == (4, 32)
  seg = jnp.asarray([[1] * 11 + [0] * 5, [1] * 6 + [2] * 10], jnp.int32)
  encoded, pooled_seg = module.apply(variables, enc, seg, method=module.module.encode)
  assert encoded.shape == (2, harness.INPUT_LENGTH // 4, 64)
  np.testing.assert_array_equal(pooled_seg, [[1, 1, 1, 0], [1, 1, 2, 2]])
  # A length that is not a multiple of 4 is padded: 14 -> 16 -> 4 pooled positions.
  encoded, pooled_seg = module.apply(variables, enc[:, :14], method=module.module.encode)
  assert encoded.shape == (2, 4, 64)
  np.testing.assert_array_equal(pooled_seg, [[1, 1, 1, 1]] * 2)


def test_funnel_windows_across_a_packing_boundary_do_not_leak():
  """Segment 1 has 7 tokens, so windows straddle the boundary: segment 2's tokens must not reach
  segment 1's pooled outputs, nor the decoder tokens of segment 1."""
  module, variables, enc, tgt = tiny_model("funnel")
  seg = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
  dec_seg = jnp.asarray([[1] * 4 + [2] * 4], jnp.int32)
  tokens = enc[:1]
  other = tokens.at[:, 7:].set((tokens[:, 7:] * 5) % (harness.VOCAB - 1) + 1)
  tgt = tgt[:1]
  dec_in = harness.shift(tgt, dec_seg)
  encode = lambda t: module.apply(variables, t, seg, method=module.module.encode)
  (a, seg_a), (b, _) = encode(tokens), encode(other)
  first = np.asarray(seg_a[0] == 1)
  assert first.sum() == 2
  np.testing.assert_allclose(a[0, first], b[0, first], atol=1e-5)
  assert float(jnp.abs(a[0, ~first] - b[0, ~first]).max()) > 1e-4
  la = module.apply(variables, tokens, dec_in, tgt, seg, dec_seg)
  lb = module.apply(variables, other, dec_in, tgt, seg, dec_seg)
  np.testing.assert_allclose(la[0, :4], lb[0, :4], atol=1e-5)


def test_funnel_block_sizes_can_be_set_and_are_validated():
  p = param_shapes("funnel", ["architectures.FunnelEncoder.block_sizes = (2, 1, 1)"], size="tiny")
  assert p["encoder"]["block_0"]["mlp"]["wi"]["kernel"].shape[0] == 2
  assert "block_1" not in p["encoder"] and "pool_2" in p["encoder"]
  with pytest.raises(ValueError, match="block_sizes"):
    param_shapes("funnel", ["architectures.FunnelEncoder.block_sizes = (2, 2, 2)"], size="tiny")


def test_funnel_has_the_vanilla_parameter_count():
  base = models.count_params(param_shapes("funnel", size="base", vocab=32128))
  assert base == 222_903_552


# -- Evolved ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,cells", [(12, 6), (24, 12), (6, 3), (4, 2), (3, 1), (2, 1), (1, 1)])
def test_evolved_halves_the_number_of_layers(layers, cells):
  assert evolved.evolved_num_layers(layers) == cells


def test_evolved_parameter_tree_at_tiny():
  p = param_shapes("evolved", harness.TINY[:] + ["NUM_ENCODER_LAYERS = 4", "NUM_DECODER_LAYERS = 6"])
  enc, dec = p["encoder"]["layers"], p["decoder"]["layers"]
  assert enc["glu_0"]["kernel"].shape == (2, 64, 64) and enc["glu_0"]["bias"].shape == (2, 64)
  assert enc["conv3x1"]["kernel"].shape == (2, 3, 64, 32)
  assert enc["sep_conv9x1"]["depthwise_kernel"].shape == (2, 9, 256)
  assert dec["wide_self_attention"]["query"]["kernel"].shape == (3, 64, 2 * 4 * 16)  # 2H heads
  assert dec["self_attention"]["query"]["kernel"].shape == (3, 64, 4 * 16)
  assert dec["sep_conv11x1"]["depthwise_kernel"].shape == (3, 11, 64)
  assert p["decoder"]["relpos"]["self_attention"]["rel_embedding"].shape == (4, 32)
  assert p["decoder"]["relpos"]["wide_self_attention"]["rel_embedding"].shape == (8, 32)


def evolved_base_params(d=768, heads=12, dkv=64, dff=3072, cells=6, vocab=32128):
  hd = heads * dkv
  glu = 2 * (d * d + d)
  enc_conv = d * 4 * d + 3 * d * (d // 2) + 2 * 4 * d + (9 * 4 * d + 4 * d) + (4 * d * (d // 2) + d // 2)
  enc = glu + enc_conv + 4 * d * hd + 2 * d * dff + 4 * d
  sep = lambda k, cin, cout: k * cin + cin + cin * cout + cout
  dec_conv = sep(11, d, 2 * d) + sep(7, d, d // 2) + 2 * 2 * d + sep(7, 2 * d, d)
  dec = 4 * d * 2 * hd + 4 * d * hd + dec_conv + 4 * d * hd + 4 * d * hd + 2 * d * dff + 5 * d
  return vocab * d + cells * (enc + dec) + 2 * d + 32 * heads * (1 + 1 + 2)


def test_evolved_base_parameter_count():
  count = models.count_params(param_shapes("evolved", size="base", vocab=32128))
  assert count == evolved_base_params() == 216_254_976
  assert abs(count - 217e6) / 217e6 < 0.005  # the reference figure (Narang et al. 2021, Table 1)


def conv_apply(conv, x, seg, **kwargs):
  variables = conv.init(jax.random.key(0), x, seg)
  return conv.apply(variables, x, seg, **kwargs), variables


@pytest.mark.parametrize("conv", [
    evolved.Conv1D(min_offset=-1, max_offset=1, features=6),
    evolved.SeparableConv1D(min_offset=-4, max_offset=4, features=6),
    evolved.SeparableConv1D(min_offset=-10, max_offset=0, features=6)], ids=["enc3", "enc9", "dec11"])
def test_evolved_convolutions_respect_segments_and_padding(conv):
  x = jax.random.normal(jax.random.key(1), (1, 12, 4))
  seg_np = np.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0, 0]])
  seg = jnp.asarray(seg_np)
  out, variables = conv_apply(conv, x, seg)
  out = np.asarray(out)
  for s in (1, 2, 3, 0):
    changed = x.at[:, seg_np[0] == s].add(3.0)
    other = np.asarray(conv.apply(variables, changed, seg))
    untouched = (seg_np[0] != s) & (seg_np[0] > 0)
    np.testing.assert_allclose(out[0, untouched], other[0, untouched], atol=1e-6)
    if s > 0:
      assert np.abs(out[0, seg_np[0] == s] - other[0, seg_np[0] == s]).max() > 1e-3
  # Each segment is convolved as if it were alone in its own row.
  for s, (lo, hi) in {1: (0, 3), 2: (3, 8), 3: (8, 10)}.items():
    alone = conv.apply(variables, x[:, lo:hi], jnp.ones((1, hi - lo), jnp.int32))
    np.testing.assert_allclose(out[:, lo:hi], alone, atol=1e-5)


def test_evolved_causal_convolution_reads_position_zero_and_its_cache_matches_the_full_pass():
  conv = evolved.SeparableConv1D(min_offset=-6, max_offset=0, features=5)
  x = jax.random.normal(jax.random.key(2), (2, 9, 4))
  seg = jnp.ones((2, 9), jnp.int32)
  full, variables = conv_apply(conv, x, seg)
  # No zeroed position 0: the input at position 0 reaches the outputs at positions 0..6.
  moved = conv.apply(variables, x.at[:, 0].add(1.0), seg)
  assert float(jnp.abs(moved[:, :7] - full[:, :7]).min()) > 0.0
  np.testing.assert_allclose(moved[:, 7:], full[:, 7:], atol=1e-6)
  # Incremental: the first decode=True call creates the cache, later ones consume one step each.
  _, state = conv.apply(variables, jnp.zeros_like(x), seg, decode=True, mutable=["cache"])
  cache = state["cache"]
  assert cache["inputs"].shape == (2, 6, 4)
  for t in range(9):
    step, state = conv.apply({**variables, "cache": cache}, x[:, t:t + 1], seg[:, :1], decode=True,
                             mutable=["cache"])
    cache = state["cache"]
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")


def test_evolved_packed_examples_at_an_odd_boundary_do_not_see_each_other():
  """Like the harness's packing test, with examples of 5 + 11 input and 3 + 5 target tokens, so every
  convolution window straddles the boundary somewhere."""
  module, variables, enc, tgt = tiny_model("evolved")
  le, ld = 5, 3
  packed_enc = jnp.concatenate([enc[0, :le], enc[1, :16 - le]])[None]
  packed_tgt = jnp.concatenate([tgt[0, :ld], tgt[1, :8 - ld]])[None]
  seg_e = jnp.asarray([[1] * le + [2] * (16 - le)], jnp.int32)
  seg_d = jnp.asarray([[1] * ld + [2] * (8 - ld)], jnp.int32)
  packed = module.apply(variables, packed_enc, harness.shift(packed_tgt, seg_d), packed_tgt, seg_e, seg_d)
  for i, (e_part, d_part, d_slice) in enumerate([(enc[0, :le], tgt[0, :ld], slice(0, ld)),
                                                 (enc[1, :16 - le], tgt[1, :8 - ld], slice(ld, 8))]):
    e = jnp.zeros((1, 16), jnp.int32).at[0, :e_part.shape[0]].set(e_part)
    d = jnp.zeros((1, 8), jnp.int32).at[0, :d_part.shape[0]].set(d_part)
    alone = module.apply(variables, e, harness.shift(d), d)
    np.testing.assert_allclose(packed[:, d_slice], alone[:, :d_part.shape[0]], atol=1e-4, err_msg=str(i))

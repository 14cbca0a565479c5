"""Token mixers that replace self-attention: lightweight / dynamic convolutions
(scaling_arch/architectures/convolutions.py) and the MLP-Mixer token-mixing MLPs
(scaling_arch/architectures/mixer.py). Module-level checks; the model contract is architectures_test.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling_arch import errors
from scaling_arch.architectures import convolutions, mixer
from scaling_arch.layers import attention

D, HEADS = 8, 2


def naive_conv(u, weights, seg, offsets, heads):
  """Per position and tap, in numpy: reads only inside the row, the same segment, never padding."""
  u, w, seg = np.asarray(u), np.asarray(weights), np.asarray(seg)
  b, length, d = u.shape
  out = np.zeros_like(u)
  for bi in range(b):
    for t in range(length):
      for i, r in enumerate(offsets):
        s = t + r
        if 0 <= s < length and seg[bi, s] == seg[bi, t] and seg[bi, t] > 0:
          wt = w[bi if w.shape[0] > 1 else 0, t if w.shape[1] > 1 else 0, :, i]
          out[bi, t] += np.repeat(wt, d // heads) * u[bi, s]
  return out


def test_tap_offsets():
  assert convolutions.tap_offsets(9, causal=False) == tuple(range(-4, 5))
  assert convolutions.tap_offsets(9, causal=True) == tuple(range(-8, 1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_depthwise_conv_is_segment_aware(causal, dynamic):
  rng = np.random.RandomState(0)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0, 0, 0], [1] * 12], jnp.int32)
  u = jnp.asarray(rng.randn(2, 12, D), jnp.float32) * (seg > 0)[..., None]
  offsets = convolutions.tap_offsets(5, causal)
  shape = (2, 12, HEADS, 5) if dynamic else (1, 1, HEADS, 5)
  weights = jax.nn.softmax(jnp.asarray(rng.randn(*shape), jnp.float32), -1)
  got = convolutions.depthwise_conv(u, weights, seg, offsets, HEADS)
  np.testing.assert_allclose(got, naive_conv(u, weights, seg, offsets, HEADS), atol=1e-6)


@pytest.mark.parametrize("cls", [convolutions.LightweightConvolution, convolutions.DynamicConvolution])
def test_conv_block_params_and_decoding(cls):
  module = cls(num_heads=HEADS, kernel_size=9)
  x = jnp.asarray(np.random.RandomState(1).randn(2, 12, D), jnp.float32)
  inputs = attention.self_attention_inputs(jnp.ones((2, 12), jnp.int32), causal=True)
  params = module.init(jax.random.key(0), x, x, inputs, deterministic=True)["params"]
  shapes = jax.tree.map(lambda p: p.shape, nn_unbox(params))
  if cls is convolutions.LightweightConvolution:
    assert shapes["kernel"] == (HEADS, 9)  # one kernel per head, shared by its channels
  else:
    assert shapes["kernel_predictor"]["kernel"] == (D, HEADS * 9)
  assert shapes["glu_0"] == {"kernel": (D, D), "bias": (D,)}
  full = module.apply({"params": params}, x, x, inputs, deterministic=True)
  # Causal: changing the future does not change the past.
  changed = module.apply({"params": params}, x.at[:, 7:].add(1.0), x, inputs, deterministic=True)
  np.testing.assert_allclose(changed[:, :7], full[:, :7], atol=1e-6)
  # Incremental decoding with the last k - 1 inputs cached.
  _, state = module.apply({"params": params}, x, x, inputs, deterministic=True, decode=True,
                          mutable=["cache"])
  assert state["cache"]["conv_inputs"].shape == (2, 8, D)
  cache = state["cache"]
  step_inputs = attention.self_attention_inputs(jnp.ones((2, 1), jnp.int32), causal=True)
  for t in range(12):
    out, state = module.apply({"params": params, "cache": cache}, x[:, t:t + 1], x[:, t:t + 1],
                              step_inputs, deterministic=True, decode=True, mutable=["cache"])
    cache = state["cache"]
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")


def nn_unbox(tree):
  import flax.linen as nn
  return nn.unbox(tree)


def init_mixer(module, x, seg, causal=False):
  inputs = attention.self_attention_inputs(seg, causal=causal)
  return module.init(jax.random.key(0), x, x, inputs, deterministic=True)["params"], inputs


def test_mixer_length_errors_name_the_macro():
  module = mixer.TokenMixing(max_length=8)
  x = jnp.ones((1, 9, D))
  with pytest.raises(ValueError, match=r"length 8 \(gin macro %INPUT_LENGTH\).*length 9"):
    init_mixer(module, x, jnp.ones((1, 9), jnp.int32))
  strict = mixer.TokenMixing(max_length=8, allow_shorter=False)
  with pytest.raises(ValueError, match="INPUT_LENGTH"):
    init_mixer(strict, jnp.ones((1, 6, D)), jnp.ones((1, 6), jnp.int32))
  with pytest.raises(ValueError, match="TARGET_LENGTH"):
    init_mixer(mixer.CausalTokenMixing(max_length=4), jnp.ones((1, 6, D)), jnp.ones((1, 6), jnp.int32),
               causal=True)


def unpacked_mixer(params, x, length):
  """The plain Mixer token MLP on one example placed at the start of a zero row."""
  w1, b1, w2, b2 = (np.asarray(nn_unbox(params)[k]) for k in ("w1", "b1", "w2", "b2"))
  h = np.asarray(jax.nn.gelu(jnp.einsum("jp,pc->jc", w1, x) + b1[:, None], approximate=True))
  return (np.einsum("pj,jc->pc", w2, h) + b2[:, None])[:length]


def test_encoder_mixer_mixes_each_packed_example_separately_and_ignores_padding():
  rng = np.random.RandomState(2)
  module = mixer.TokenMixing(max_length=12)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 3, 0, 0, 0], [1] * 9 + [0] * 3], jnp.int32)
  x = jnp.asarray(rng.randn(2, 12, D), jnp.float32)
  params, inputs = init_mixer(module, x, seg)
  out = module.apply({"params": params}, x, x, inputs, deterministic=True)
  for b, spans in ((0, [(0, 3), (3, 8), (8, 9)]), (1, [(0, 9)])):
    for start, end in spans:
      alone = np.zeros((12, D), np.float32)
      alone[:end - start] = x[b, start:end]
      np.testing.assert_allclose(out[b, start:end], unpacked_mixer(params, alone, end - start),
                                 rtol=1e-5, atol=1e-5)
  garbage = x.at[:, 9:].set(100.0)
  np.testing.assert_allclose(module.apply({"params": params}, garbage, garbage, inputs,
                                          deterministic=True)[:, :9], out[:, :9], atol=1e-6)
  # A shorter input is the same as padding it to the configured length.
  short = module.apply({"params": params}, x[:, :9], x[:, :9],
                       attention.self_attention_inputs(seg[:, :9], causal=False), deterministic=True)
  np.testing.assert_allclose(short, out[:, :9], atol=1e-5)


def test_encoder_mixer_mixes_every_example_of_a_crowded_row():
  """As many examples as tokens (1-token examples), and 2^k - 1 / 2^k examples at the group boundaries:
  every example is mixed exactly as alone, whatever the number of examples in the row."""
  length = 16
  module = mixer.TokenMixing(max_length=length)
  rng = np.random.RandomState(3)
  rows = [list(range(1, 17)),                                   # 16 examples of 1 token
          [1, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11],  # 11 examples, one long
          [1] * 5 + [2] * 3 + [3] * 3 + [4] * 2 + [5, 6, 7],     # 7 examples
          [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 0, 0, 0, 0, 0, 0]]      # 8 examples, padding
  seg = jnp.asarray(rows, jnp.int32)
  x = jnp.asarray(rng.randn(len(rows), length, D), jnp.float32)
  params, inputs = init_mixer(module, x, seg)
  out = np.asarray(module.apply({"params": params}, x, x, inputs, deterministic=True))
  for b, row in enumerate(rows):
    row = np.asarray(row)
    for g in set(row.tolist()) - {0}:
      where = np.flatnonzero(row == g)
      alone = np.zeros((length, D), np.float32)
      alone[:len(where)] = x[b, where]
      np.testing.assert_allclose(out[b, where], unpacked_mixer(params, alone, len(where)),
                                 rtol=1e-5, atol=1e-5, err_msg=f"row {b}, example {g}")
    np.testing.assert_array_equal(out[b, row == 0], 0.0)


def _reference_mixer_loss(params, x, rows, length):
  """sum(out * weights) where each example of each row is mixed alone (jnp, one example at a time)."""
  w = nn_unbox(params)
  total = 0.0
  for b, row in enumerate(rows):
    row = np.asarray(row)
    for g in set(row.tolist()) - {0}:
      where = np.flatnonzero(row == g)
      alone = jnp.zeros((length, x.shape[-1])).at[:len(where)].set(x[b, where])
      h = jax.nn.gelu(jnp.einsum("jp,pc->jc", w["w1"], alone) + w["b1"][:, None], approximate=True)
      y = (jnp.einsum("pj,jc->pc", w["w2"], h) + w["b2"][:, None])[:len(where)]
      total = total + jnp.sum(y * jnp.cos(1.0 + b + where[:, None] + jnp.arange(x.shape[-1])))
  return total


@pytest.mark.parametrize("slots_per_pass", [1, 2, 8])
def test_encoder_mixer_passes_give_the_exact_values_and_gradients(slots_per_pass):
  """Groups larger than slots_per_pass loop over rematerialized passes: values and gradients (inputs and
  weights) are those of every example mixed alone, for passes of 1, 2 and 8 slots."""
  length = 16
  rows = [list(range(1, 17)),                                   # 16 one-token examples: groups 0..4
          [1] * 6 + [2] * 4 + [3, 3, 4, 5, 6, 7],               # 7 examples
          [1] * 10 + [0] * 6]                                   # one example and padding
  seg = jnp.asarray(rows, jnp.int32)
  x = jnp.asarray(np.random.RandomState(5).randn(len(rows), length, D), jnp.float32)
  module = mixer.TokenMixing(max_length=length, slots_per_pass=slots_per_pass)
  params, inputs = init_mixer(module, x, seg)
  weights = jnp.cos(1.0 + jnp.arange(len(rows))[:, None, None] + jnp.arange(length)[None, :, None]
                    + jnp.arange(D))

  def loss(p, x):
    out = module.apply({"params": p}, x, x, inputs, deterministic=True)
    return jnp.sum(out * weights * (seg > 0)[..., None])

  value, (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  ref, (r_params, r_x) = jax.value_and_grad(_reference_mixer_loss, argnums=(0, 1))(params, x, rows, length)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_allclose(g_x, r_x, rtol=1e-4, atol=1e-5)
  for name in ("w1", "b1", "w2", "b2"):
    np.testing.assert_allclose(nn_unbox(g_params)[name], nn_unbox(r_params)[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_encoder_mixer_slots_per_pass_must_be_a_power_of_two():
  x = jnp.ones((1, 8, D))
  with pytest.raises(errors.ConfigError, match="slots_per_pass = 3: it must be a power of 2"):
    init_mixer(mixer.TokenMixing(max_length=8, slots_per_pass=3), x, jnp.ones((1, 8), jnp.int32))


@pytest.mark.parametrize("policy", [None, "dots_no_batch"])
def test_encoder_mixer_step_memory_is_bounded_whatever_a_row_may_hold(policy):
  """At length 512 a row may hold up to 512 examples (10 slot groups, 1,023 hiddens). The compiled
  forward + backward of three scanned, rematerialized layers must not hold every slot's hidden: the former
  single lax.switch over the group count needed 557 MiB of temporaries for one layer here (every branch's
  residuals), and under the layers' dots_no_batch policy a nested jax.checkpoint still let the policy save
  every group's hiddens for every layer (63 GiB per v3 core at base)."""
  from scaling_arch.layers import transformer
  batch, length, d, layers = 2, 512, 128, 3
  module = mixer.TokenMixing(max_length=length)
  x = jnp.ones((batch, length, d), jnp.float32)
  seg = jnp.ones((batch, length), jnp.int32)
  params, _ = init_mixer(module, x, seg)
  stacked = jax.tree.map(lambda a: jnp.stack([a] * layers), params)
  remat = transformer.REMAT_POLICIES[policy] if policy else None

  def loss(p, x, seg):
    inp = attention.self_attention_inputs(seg, causal=False)
    layer = lambda h, lp: (h + module.apply({"params": lp}, h, h, inp, deterministic=True), None)
    out, _ = jax.lax.scan(jax.checkpoint(layer, policy=remat), x, p)
    return jnp.sum(out ** 2)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(stacked, x, seg).compile()
  every_hidden = batch * (2 ** 10 - 1) * (d // 2) * d * 4
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < every_hidden, (temp / 2 ** 20, every_hidden / 2 ** 20)


def test_encoder_mixer_cost_counts_one_mixer_per_layer():
  """FLOPs per step are measured on the unrolled trace (transformer.unrolled_scans): there the Mixer counts
  the unpacked row's one mixer, not the conditional slot groups that only packed batches run."""
  from scaling_arch.layers import transformer
  batch, length, d = 2, 64, 32
  module = mixer.TokenMixing(max_length=length)
  x = jnp.ones((batch, length, d), jnp.float32)
  seg = jnp.ones((batch, length), jnp.int32)
  params, _ = init_mixer(module, x, seg)

  def flops():
    loss = lambda p, x, seg: jnp.sum(module.apply(
        {"params": p}, x, x, attention.self_attention_inputs(seg, causal=False), deterministic=True) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, seg).cost_analysis()["flops"]

  with transformer.unrolled_scans():
    counted = flops()
  one_mixer = 2 * 2 * batch * (d // 2) * length * d          # forward: two matmuls over the length
  assert 2 * one_mixer <= counted <= 5 * one_mixer, (counted, one_mixer)  # forward + backward
  assert flops() > 2 * counted                               # the groups, when traced to run


def test_causal_mixer_is_causal_packed_prefix_sliceable_and_decodes():
  rng = np.random.RandomState(4)
  module = mixer.CausalTokenMixing(max_length=10)
  x = jnp.asarray(rng.randn(2, 10, D), jnp.float32)
  ones = jnp.ones((2, 10), jnp.int32)
  params, inputs = init_mixer(module, x, ones, causal=True)
  w1 = np.asarray(nn_unbox(params)["w1"])
  assert np.all(np.triu(w1, 1) == 0) and np.all(np.diag(w1) != 0)
  full = module.apply({"params": params}, x, x, inputs, deterministic=True)
  changed = module.apply({"params": params}, x.at[:, 6:].add(1.0), x, inputs, deterministic=True)
  np.testing.assert_allclose(changed[:, :6], full[:, :6], atol=1e-6)
  assert float(jnp.abs(changed[:, 6:] - full[:, 6:]).max()) > 1e-3
  # A prefix is computed with W[:l, :l]: same outputs.
  prefix = module.apply({"params": params}, x[:, :4], x[:, :4],
                        attention.self_attention_inputs(ones[:, :4], causal=True), deterministic=True)
  np.testing.assert_allclose(prefix, full[:, :4], atol=1e-5)
  # Packed: the second example (positions 4..9) behaves as if alone at positions 0..5.
  seg = jnp.asarray([[1] * 4 + [2] * 6] * 2, jnp.int32)
  packed = module.apply({"params": params}, x, x, attention.self_attention_inputs(seg, causal=True),
                        deterministic=True)
  alone = module.apply({"params": params}, x[:, 4:], x[:, 4:],
                       attention.self_attention_inputs(ones[:, :6], causal=True), deterministic=True)
  np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-5)
  np.testing.assert_allclose(packed[:, :4], full[:, :4], atol=1e-5)
  # Incremental decoding (cache of inputs and hidden) equals the full computation.
  _, state = module.apply({"params": params}, x, x, inputs, deterministic=True, decode=True,
                          mutable=["cache"])
  cache = state["cache"]
  step_inputs = attention.self_attention_inputs(jnp.ones((2, 1), jnp.int32), causal=True)
  for t in range(10):
    out, state = module.apply({"params": params, "cache": cache}, x[:, t:t + 1], x[:, t:t + 1],
                              step_inputs, deterministic=True, decode=True, mutable=["cache"])
    cache = state["cache"]
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")

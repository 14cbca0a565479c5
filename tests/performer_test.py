"""FAVOR+ (scaling_arch/architectures/performer.py): the chunked segment-aware sums equal the quadratic
masked form, the causal attention is linear in length (cost analysis and jaxpr shapes), the features are
redrawn in training only, and the random features estimate the softmax kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling_arch.architectures import performer
from scaling_arch.layers import attention


def quadratic_reference(qf, kf, v, segment_ids, causal):
  scores = jnp.einsum("blhm,bshm->bhls", qf, kf)
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    mask &= jnp.tril(jnp.ones(mask.shape[-2:], bool))
  return jnp.einsum("bhls,bshe->blhe", scores * mask[:, None], v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk_size", [4, 5, 64])
def test_chunked_sums_equal_masked_quadratic_form(causal, chunk_size):
  rng = np.random.RandomState(0)
  b, length, h, m, e = 2, 23, 2, 8, 3
  qf = jnp.asarray(rng.rand(b, length, h, m), jnp.float32)
  kf = jnp.asarray(rng.rand(b, length, h, m), jnp.float32)
  v = jnp.asarray(rng.randn(b, length, h, e), jnp.float32)
  # Row 0: examples of lengths 3, 9 (crossing chunk edges), 1, 6, then padding; row 1: one example.
  seg0 = [1] * 3 + [2] * 9 + [3] + [4] * 6 + [0] * 4
  seg = jnp.asarray([seg0, [1] * length], jnp.int32)
  kf = kf * (seg > 0)[..., None, None]
  got = performer.linear_attention(qf, kf, v, seg, causal=causal, chunk_size=chunk_size)
  want = quadratic_reference(qf, kf, v, seg, causal)
  nonpad = (seg > 0)[..., None, None]
  np.testing.assert_allclose(got * nonpad, want * nonpad, rtol=1e-5, atol=1e-5)


def causal_favor(length, batch=1, heads=2, head_dim=16, m=32, chunk_size=64):
  """The decoder self-attention's FAVOR+ computation (features, sums, ratio) at one length."""
  def fn(q, k, v, segment_ids):
    omega = performer.orthogonal_random_features(jax.random.key(0), m, head_dim)
    qf = performer.favor_features(q, omega, is_query=True)
    kf = performer.favor_features(k, omega, is_query=False) * (segment_ids > 0)[..., None, None]
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,))], -1)
    out = performer.linear_attention(qf, kf, v1, segment_ids, causal=True, chunk_size=chunk_size)
    return out[..., :-1] / out[..., -1:]
  shapes = (jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32),) * 3 + (
      jax.ShapeDtypeStruct((batch, length), jnp.int32),)
  return fn, shapes


def test_causal_favor_is_linear_in_length():
  flops, avals = {}, {}
  for length in (1024, 4096):
    fn, shapes = causal_favor(length)
    cost = jax.jit(fn).lower(*shapes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops[length] = cost["flops"]
    jaxpr = jax.make_jaxpr(fn)(*shapes)
    avals[length] = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars
                     if hasattr(v.aval, "shape")]
    # No intermediate holds a pair of positions: nothing [.., L, .., L, ..] (nor bigger than the chunk).
    for shape in avals[length]:
      assert sum(dim >= length for dim in shape) <= 1, shape
  ratio = flops[4096] / flops[1024]
  assert 3.5 < ratio < 4.6, (flops, ratio)


def test_decode_step_equals_teacher_forcing_module_level():
  module = performer.FavorAttention(num_heads=2, head_dim=8, num_features=16, chunk_size=4)
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 11, 16), jnp.float32)
  seg = jnp.ones((2, 11), jnp.int32)
  inputs = attention.self_attention_inputs(seg, causal=True)
  params = module.init(jax.random.key(0), x, x, inputs, deterministic=True)["params"]
  full = module.apply({"params": params}, x, x, inputs, deterministic=True)
  _, state = module.apply({"params": params}, x, x, inputs, deterministic=True, decode=True,
                          mutable=["cache"])
  cache = state["cache"]
  for t in range(11):
    step_inputs = attention.self_attention_inputs(jnp.ones((2, 1), jnp.int32), causal=True)
    out, state = module.apply({"params": params, "cache": cache}, x[:, t:t + 1], x[:, t:t + 1],
                              step_inputs, deterministic=True, decode=True, mutable=["cache"])
    cache = state["cache"]
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")


def test_features_are_redrawn_in_training_and_fixed_in_evaluation():
  module = performer.FavorAttention(num_heads=2, head_dim=8, num_features=16)
  x = jnp.asarray(np.random.RandomState(2).randn(1, 6, 16), jnp.float32)
  inputs = attention.self_attention_inputs(jnp.ones((1, 6), jnp.int32), causal=False)
  params = module.init(jax.random.key(0), x, x, inputs, deterministic=True)["params"]
  run = lambda det, r: module.apply({"params": params}, x, x, inputs, deterministic=det,
                                    rngs={"dropout": jax.random.key(r)})
  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert float(jnp.abs(run(False, 0) - run(False, 1)).max()) > 1e-4
  np.testing.assert_array_equal(run(False, 3), run(False, 3))


def test_positive_features_estimate_the_softmax_kernel():
  rng = np.random.RandomState(3)
  d = 16
  q = jnp.asarray(rng.randn(64, d) * 0.5, jnp.float32)
  k = jnp.asarray(rng.randn(64, d) * 0.5, jnp.float32)
  omega = performer.orthogonal_random_features(jax.random.key(0), 4096, d)
  qf = performer.favor_features(q, omega, is_query=True, epsilon=0.0)
  kf = performer.favor_features(k, omega, is_query=False, epsilon=0.0)
  approx = qf @ kf.T
  approx = approx / approx.sum(-1, keepdims=True)
  exact = jax.nn.softmax(q @ k.T / np.sqrt(d), axis=-1)
  assert float(jnp.abs(approx - exact).sum(-1).max()) < 0.1
  # Orthogonality inside each block of d rows.
  block = omega[:d] / jnp.linalg.norm(omega[:d], axis=-1, keepdims=True)
  np.testing.assert_allclose(block @ block.T, np.eye(d), atol=1e-5)


def test_gram_schmidt_rows_equal_sign_fixed_qr():
  # The loop replaces jnp.linalg.qr (which stalled on multi-device CPU meshes): same rows as LAPACK's
  # QR of x^T with R's diagonal made positive.
  x = np.random.RandomState(5).randn(3, 32, 32).astype(np.float32)
  rows = np.asarray(performer.orthonormalize_rows(jnp.asarray(x)))
  for block, got in zip(x, rows):
    q, r = np.linalg.qr(block.T.astype(np.float64))
    expected = (q * np.sign(np.diag(r))).T
    np.testing.assert_allclose(got, expected, atol=2e-4)

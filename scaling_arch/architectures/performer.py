"""Performer (Choromanski et al. 2020): FAVOR+ linear attention with positive orthogonal random features
(architectures spec section 6, decision 5).

`FavorAttention` replaces softmax self-attention in both stacks (bidirectional in the encoder, causal in
the decoder); cross-attention keeps softmax. For each head, with x~ = x d_k^-1/4 (normalize_data; W_q's
init is then the unfolded N(0, d^-1/2), option (b) of the spec, so the estimated kernel is
exp(q.k / sqrt(d_k))):

  Omega [m, d_k]: ceil(m / d_k) blocks of orthonormal rows (Gram-Schmidt of a Gaussian), each row rescaled by the norm
      of a Gaussian vector; shared by the heads of a layer, one draw per layer.
  phi(q)_i = m^-1/2 (exp(w_i.q~ - max_j w_j.q~) + eps)              per-query stabiliser (reads q_t only)
  phi(k)_i = m^-1/2 (exp(w_i.k~ - |k~|^2/2 - c) + eps e^-c)          c = max(0, max_i |w_i|^2/2 - 50)
  out_t = phi(q_t) . sum_s phi(k_s) v_s^T / phi(q_t) . sum_s phi(k_s)

The key stabiliser c is a constant of Omega (it reads no position, so it is causal-safe and cancels
exactly in the ratio, eps included); since w.k - |k|^2/2 <= |w|^2/2, it bounds every key exponent by 50, so
the sums cannot overflow in float32. All FAVOR+ arithmetic is float32.

Sums run over the keys of the query's packed example only, and padding keys have phi(k) = 0. They are
computed in chunks of `chunk_size` positions (memory and time linear in the length, no [L, L] array):
inside a chunk a masked [C, C] product (same segment; and s <= t when causal); across chunks a segmented
prefix sum of per-chunk key-value sums (`lax.associative_scan` that resets where a new packed example
begins), forward for the causal decoder, forward and backward for the bidirectional encoder. So packing
is supported exactly, with any number of examples per row.

Random features are redrawn at every training step (deterministic=False) from the step's `dropout` RNG
stream (each scanned layer gets its own), and are a fixed draw from `feature_seed` at evaluation and
decoding. Incremental decoding caches the running sums S = sum phi(k) v^T and z = sum phi(k) per layer.

Positions: learned absolute position embeddings, added to the inputs at the position within the packed
example (`PerformerEncoder` / `PerformerDecoder` derive it from the segment ids where the skeleton would
use the row index).
"""

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from scaling_arch.layers import initializers
from scaling_arch.layers.attention import AttentionInputs, head_projection
from scaling_arch.layers.dense import Dense
from scaling_arch.layers.embedding import AbsolutePositionEmbed
from scaling_arch.layers.transformer import Decoder, Encoder

MAX_KEY_EXPONENT = 50.0


def segment_positions(segment_ids):
  """Position of each token within its packed example (0 at padding)."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length, dtype=jnp.int32)
  prev = jnp.concatenate([jnp.full_like(segment_ids[:, :1], -1), segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)
  return jnp.where(segment_ids > 0, idx - start, 0).astype(jnp.int32)


def orthonormalize_rows(x):
  """Gram-Schmidt (each projection applied twice, for float32) on the rows of x [..., d, d].

  Written with plain array ops rather than `jnp.linalg.qr`: the LAPACK QR custom call stalled the
  partitioned train step on a multi-device CPU mesh (4x4 and 16x1 meshes of forced host devices never
  finished the step), and d = head_dim is small enough that a d-step loop costs nothing beside the layer.
  Gaussian rows give Haar-distributed orthonormal blocks, as QR does.
  """
  dim = x.shape[-2]

  def body(i, q):
    v = jax.lax.dynamic_index_in_dim(x, i, axis=-2, keepdims=False)
    basis = q * (jnp.arange(dim) < i)[:, None]
    for _ in range(2):
      v = v - jnp.einsum("...j,...jk->...k", jnp.einsum("...jk,...k->...j", basis, v), basis)
    v = v * jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True))
    return jax.lax.dynamic_update_index_in_dim(q, v, i, axis=-2)

  return jax.lax.fori_loop(0, dim, body, jnp.zeros_like(x))


def orthogonal_random_features(key, num_features: int, dim: int):
  """Omega [m, d]: blocks of d orthonormal rows (orthonormalized Gaussians), rows scaled by chi(d) norms."""
  num_blocks = math.ceil(num_features / dim)
  k_blocks, k_norms = jax.random.split(key)
  gaussian = jax.random.normal(k_blocks, (num_blocks, dim, dim), jnp.float32)
  rows = orthonormalize_rows(gaussian).reshape(num_blocks * dim, dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(k_norms, (num_features, dim), jnp.float32), axis=-1)
  return rows * norms[:, None]


def favor_features(x, omega, *, is_query: bool, normalize_data: bool = True, epsilon: float = 1e-6):
  """Positive random features phi(x) [..., m] of x [..., d_k] (float32)."""
  x = x.astype(jnp.float32)
  if normalize_data:
    x = x * (x.shape[-1] ** -0.25)
  proj = jnp.einsum("...d,md->...m", x, omega)
  scale = omega.shape[0] ** -0.5
  if is_query:
    return scale * (jnp.exp(proj - jnp.max(proj, axis=-1, keepdims=True)) + epsilon)
  c = jnp.maximum(0.0, 0.5 * jnp.max(jnp.sum(omega * omega, axis=-1)) - MAX_KEY_EXPONENT)
  c = jax.lax.stop_gradient(c)
  diag = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  return scale * (jnp.exp(proj - diag - c) + epsilon * jnp.exp(-c))


def _segmented_sum(resets, states, reverse: bool):
  """Inclusive segmented prefix sum along axis 1: the running sum restarts where `resets` is set."""

  def combine(a, b):
    ra, sa = a
    rb, sb = b
    r = rb.reshape(rb.shape + (1,) * (sb.ndim - rb.ndim))
    return ra | rb, jnp.where(r, sb, sa + sb)

  return jax.lax.associative_scan(combine, (resets, states), reverse=reverse, axis=1)[1]


def linear_attention(qf, kf, v, segment_ids, *, causal: bool, chunk_size: int = 64):
  """sum_s [seg_s == seg_t (, s <= t)] (qf_t . kf_s) v_s for every t, chunked: O(L) time and memory.

  qf, kf: [B, L, H, m] features (kf zero at padding); v: [B, L, H, e]; segment_ids: [B, L] (packed
  examples must be contiguous runs of one id). Returns [B, L, H, e].
  """
  batch, length, heads, m = qf.shape
  e = v.shape[-1]
  c = min(chunk_size, length)
  n = -(-length // c)
  pad = n * c - length
  if pad:
    padding = ((0, 0), (0, pad), (0, 0), (0, 0))
    qf, kf, v = jnp.pad(qf, padding), jnp.pad(kf, padding), jnp.pad(v, padding)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  q = qf.reshape(batch, n, c, heads, m)
  k = kf.reshape(batch, n, c, heads, m)
  v = v.reshape(batch, n, c, heads, e)
  seg = segment_ids.reshape(batch, n, c)

  # Inside each chunk: a masked [C, C] product.
  visible = seg[:, :, :, None] == seg[:, :, None, :]
  if causal:
    visible &= jnp.tril(jnp.ones((c, c), bool))
  scores = jnp.einsum("bnchm,bndhm->bnhcd", q, k) * visible[:, :, None].astype(q.dtype)
  out = jnp.einsum("bnhcd,bndhe->bnche", scores, v)

  none = jnp.full((batch, 1), -1, seg.dtype)  # no chunk before the first / after the last
  zero = jnp.zeros((batch, 1, heads, m, e), q.dtype)

  # From earlier chunks: the running sum of the example that is open at the end of the previous chunk.
  last = seg[:, :, -1]
  tail = (seg == last[..., None]).astype(k.dtype)
  tails = jnp.einsum("bndhm,bndhe->bnhme", k * tail[..., None, None], v)
  prev_last = jnp.concatenate([none, last[:, :-1]], axis=1)
  running = _segmented_sum(last != prev_last, tails, reverse=False)
  carry = jnp.concatenate([zero, running[:, :-1]], axis=1)
  use = (seg == prev_last[..., None]).astype(q.dtype)
  out = out + jnp.einsum("bnchm,bnhme->bnche", q * use[..., None, None], carry)

  if not causal:  # From later chunks: the same, backwards.
    first = seg[:, :, 0]
    head = (seg == first[..., None]).astype(k.dtype)
    heads_sum = jnp.einsum("bndhm,bndhe->bnhme", k * head[..., None, None], v)
    next_first = jnp.concatenate([first[:, 1:], none], axis=1)
    running = _segmented_sum(first != next_first, heads_sum, reverse=True)
    carry = jnp.concatenate([running[:, 1:], zero], axis=1)
    use = (seg == next_first[..., None]).astype(q.dtype)
    out = out + jnp.einsum("bnchm,bnhme->bnche", q * use[..., None, None], carry)

  return out.reshape(batch, n * c, heads, e)[:, :length]


@gin.configurable(module="architectures")
class FavorAttention(nn.Module):
  """FAVOR+ self-attention with the call signature of MultiHeadAttention (no relative bias, no mask bias:
  padding and packing are handled in the sums). Kernels as MultiHeadAttention's (query, key, value, out);
  W_q is initialized N(0, d^-1/2) when normalize_data (the 1/sqrt(d_k) is applied to the data instead)."""
  num_heads: int
  head_dim: int
  num_features: int = 256
  chunk_size: int = 64
  redraw_features: bool = True
  feature_seed: int = 0
  normalize_data: bool = True
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  is_cross_attention: bool = False

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, attention_inputs: AttentionInputs, *, deterministic: bool,
               decode: bool = False):
    if self.is_cross_attention:
      raise ValueError("FavorAttention implements self-attention; keep MultiHeadAttention for "
                       "cross-attention (decision 5).")
    d = inputs_q.shape[-1]
    hd = self.num_heads * self.head_dim

    def proj(name, std, x):
      return head_projection(x, self.num_heads, self.head_dim, std=std, dtype=self.dtype, name=name)

    q_std = d ** -0.5 if self.normalize_data else (d * self.head_dim) ** -0.5
    q = proj("query", q_std, inputs_q)
    k = proj("key", d ** -0.5, inputs_kv)
    v = proj("value", d ** -0.5, inputs_kv)

    if not deterministic and self.redraw_features:
      key = self.make_rng("dropout")
    else:
      key = jax.random.key(self.feature_seed)
    omega = orthogonal_random_features(key, self.num_features, self.head_dim)
    qf = favor_features(q, omega, is_query=True, normalize_data=self.normalize_data, epsilon=self.epsilon)
    kf = favor_features(k, omega, is_query=False, normalize_data=self.normalize_data, epsilon=self.epsilon)
    kf = kf * (attention_inputs.kv_segment_ids > 0)[..., None, None].astype(kf.dtype)
    v1 = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)

    causal = attention_inputs.causal
    stepping = False
    if decode and causal:
      stepping = self.has_variable("cache", "sums")
      sums = self.variable("cache", "sums", jnp.zeros,
                           (inputs_q.shape[0], self.num_heads, self.num_features, self.head_dim + 1),
                           jnp.float32)
    if stepping:
      # This step's tokens see the cached sums of all earlier positions and each other causally.
      step = qf.shape[1]
      scores = jnp.einsum("bchm,bdhm->bhcd", qf, kf) * jnp.tril(jnp.ones((step, step), jnp.float32))
      out = (jnp.einsum("bhcd,bdhe->bche", scores, v1) +
             jnp.einsum("bchm,bhme->bche", qf, sums.value))
      sums.value = sums.value + jnp.einsum("bdhm,bdhe->bhme", kf, v1)
    else:
      out = linear_attention(qf, kf, v1, attention_inputs.q_segment_ids, causal=causal,
                             chunk_size=self.chunk_size)
    num, den = out[..., :-1], out[..., -1:]
    out = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0).astype(self.dtype)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(out.shape[:-2] + (hd,))
    return Dense(d, kernel_axes=("joined_kv", "embed"), kernel_init=initializers.normal_std(hd ** -0.5),
                 dtype=self.dtype, name="out")(out)


@gin.configurable(module="architectures")
class PerformerPositionEmbed(AbsolutePositionEmbed):
  """AbsolutePositionEmbed that refuses sequences longer than its table (a gather would clamp them)."""

  def __call__(self, positions):
    if positions.shape[-1] > self.max_length:
      raise ValueError(
          f"PerformerPositionEmbed: a sequence of length {positions.shape[-1]} exceeds the position table "
          f"({self.max_length} rows); raise PERFORMER_MAX_LENGTH (gin).")
    return super().__call__(positions)


@gin.configurable(module="architectures")
class PerformerEncoder(Encoder):
  """The skeleton's Encoder, with absolute positions counted within each packed example when the batch
  does not give them (the skeleton falls back to the row index)."""

  def __call__(self, x, segment_ids, positions=None, *, deterministic: bool):
    if positions is None:
      positions = segment_positions(segment_ids)
    return super().__call__(x, segment_ids, positions, deterministic=deterministic)


@gin.configurable(module="architectures")
class PerformerDecoder(Decoder):
  """The skeleton's Decoder, adding absolute position embeddings at the position within each packed
  example (the skeleton's `input_position_factory` uses the row index); leave that one None.
  When stepping, the position is the stack's cache counter."""
  position_embedder_factory: Optional[Callable[..., nn.Module]] = None

  @nn.compact
  def __call__(self, x, encoded, encoder_segment_ids, segment_ids, *, deterministic: bool,
               decode: bool = False):
    if self.input_position_factory is not None:
      raise ValueError("PerformerDecoder adds positions itself: bind position_embedder_factory and leave "
                       "input_position_factory None.")
    if self.position_embedder_factory is not None:
      batch, length = x.shape[:2]
      if decode and self.has_variable("cache", "position"):
        offset = self.get_variable("cache", "position")
        positions = offset + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
      else:
        positions = segment_positions(segment_ids)
      x = x + self.position_embedder_factory(dtype=self.dtype, name="position_embedder")(positions)
    return super().__call__(x, encoded, encoder_segment_ids, segment_ids, deterministic=deterministic,
                            decode=decode)

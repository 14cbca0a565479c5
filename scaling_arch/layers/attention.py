"""Softmax multi-head attention (T5 v1.0: no biases, no 1/sqrt(d_k) factor, scale folded into W_q's init)
with a key/value cache for incremental decoding, and the inputs every token-mixing sublayer receives.

A query that may see no key (padding; a packed decoder example whose encoder inputs are empty) gets a zero
output, in training and in cached decoding alike, never an average over other examples or padding.
"""

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp

from scaling_arch.layers import initializers
from scaling_arch.layers.dense import Dense

NEG_INF = -1e10


@flax.struct.dataclass
class AttentionInputs:
  """What a token-mixing sublayer needs besides its inputs: which positions may see which.

  Segment ids are 0 at padding and otherwise number the packed examples of a row; positions are indices
  along the (packed) sequence, used for causality. `position_bias` is an additive [1|B, H, Lq, Lk] bias
  (relative position bias) or None. During incremental decoding the query positions hold the cache index.
  """
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array
  position_bias: Optional[jax.Array] = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  def mask(self):
    """Boolean [B, 1, Lq, Lk]: same segment, neither side padding, and (if causal) key not in the future."""
    q, k = self.q_segment_ids[:, :, None], self.kv_segment_ids[:, None, :]
    mask = (q == k) & (q > 0) & (k > 0)
    if self.causal:
      mask &= self.q_positions[..., :, None] >= self.kv_positions[..., None, :]
    return mask[:, None]

  def bias(self):
    """Additive float32 bias [B, H|1, Lq, Lk]: the mask as 0 / -1e10 plus the position bias."""
    bias = jnp.where(self.mask(), 0.0, NEG_INF).astype(jnp.float32)
    if self.position_bias is not None:
      bias = bias + self.position_bias.astype(jnp.float32)
    return bias


def self_attention_inputs(segment_ids, *, causal: bool, position_bias=None):
  positions = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
  return AttentionInputs(segment_ids, segment_ids, positions, positions, position_bias, causal)


def cross_attention_inputs(q_segment_ids, kv_segment_ids):
  zq = jnp.zeros(q_segment_ids.shape, jnp.int32)
  zk = jnp.zeros(kv_segment_ids.shape, jnp.int32)
  return AttentionInputs(q_segment_ids, kv_segment_ids, zq, zk, None, False)


def dot_product_attention(q, k, v, bias, *, dropout_rate: float, deterministic: bool, dropout_rng=None,
                          dtype=jnp.float32, float32_logits: bool = True, query_has_key=None):
  """q [B, Lq, H, D], k/v [B, Lk, H, D], bias [B|1, H|1, Lq, Lk] -> [B, Lq, H, D].

  `query_has_key` [B, Lq] (optional): False where the query may see no key at all. Its output is zero: a
  softmax over nothing but -1e10 masks would otherwise weigh every key alike, other packed examples and
  padding included.
  """
  if float32_logits:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  logits = logits + bias
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = weights * keep.astype(dtype) / jnp.asarray(1.0 - dropout_rate, dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(dtype))
  if query_has_key is not None:
    out = out * query_has_key[:, :, None, None].astype(dtype)
  return out


def head_projection(x, num_heads: int, head_dim: int, *, std: float, dtype, name: str):
  """[..., d] -> [..., heads, kv]: one of an attention's query / key / value projections (a Dense with a
  N(0, std) kernel on the `joined_kv` axis), made inside the calling module's compact method."""
  y = Dense(num_heads * head_dim, kernel_axes=("embed", "joined_kv"), kernel_init=initializers.normal_std(std),
            dtype=dtype, name=name)(x)
  y = y.reshape(y.shape[:-1] + (num_heads, head_dim))
  return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))


@gin.configurable(module="layers")
class MultiHeadAttention(nn.Module):
  """Multi-head softmax attention over [B, L, d] inputs with T5 v1.0 initialization.

  Kernels are 2-D ([embed, joined_kv] and [joined_kv, embed]) so that Adafactor factors them and the
  `model` mesh axis splits heads. With decode=True the module keeps a key/value cache in the `cache`
  collection: the first call (with full-length inputs) creates it, later calls (one token) append to it.
  Cross-attention (`is_cross_attention`) recomputes its keys and values from the encoder output.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  float32_logits: bool = True
  is_cross_attention: bool = False

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, attention_inputs: AttentionInputs, *, deterministic: bool,
               decode: bool = False):
    d = inputs_q.shape[-1]
    hd = self.num_heads * self.head_dim

    def proj(name, std, x):
      return head_projection(x, self.num_heads, self.head_dim, std=std, dtype=self.dtype, name=name)

    q = proj("query", (d * self.head_dim) ** -0.5, inputs_q)
    k = proj("key", d ** -0.5, inputs_kv)
    v = proj("value", d ** -0.5, inputs_kv)

    if decode and not self.is_cross_attention:
      k, v, attention_inputs = self._update_cache(k, v, attention_inputs)

    bias = attention_inputs.bias()
    query_has_key = jnp.any(attention_inputs.mask(), axis=-1)[:, 0]   # [B, Lq]
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    out = dot_product_attention(q, k, v, bias, dropout_rate=self.dropout_rate, deterministic=deterministic,
                                dropout_rng=dropout_rng, dtype=self.dtype,
                                float32_logits=self.float32_logits, query_has_key=query_has_key)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(out.shape[:-2] + (hd,))
    return Dense(d, kernel_axes=("joined_kv", "embed"), kernel_init=initializers.normal_std(hd ** -0.5),
                 dtype=self.dtype, name="out")(out)

  def _update_cache(self, k, v, attention_inputs):
    """Writes this step's key/value at the cache index; returns the whole cache and its visibility."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if not initialized:
      return k, v, attention_inputs
    index = cache_index.value
    max_length = cached_key.value.shape[1]
    step = k.shape[1]
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                                    (0, index, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value,
                                                      v.astype(cached_value.value.dtype), (0, index, 0, 0))
    cache_index.value = index + step
    batch = k.shape[0]
    kv_positions = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch, max_length))
    q_positions = jnp.broadcast_to(index + jnp.arange(step, dtype=jnp.int32), (batch, step))
    inputs = AttentionInputs(
        q_segment_ids=jnp.ones((batch, step), jnp.int32),
        kv_segment_ids=jnp.ones((batch, max_length), jnp.int32),
        q_positions=q_positions, kv_positions=kv_positions,
        position_bias=attention_inputs.position_bias, causal=True)
    return cached_key.value, cached_value.value, inputs

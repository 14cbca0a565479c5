"""T5's bucketed relative position bias: one [heads, buckets] table per stack, shared by its layers."""

import math
from typing import Any

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from scaling_arch.layers import initializers


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128):
  """Maps key - query offsets to buckets: exact for small distances, logarithmic up to max_distance."""
  n = -relative_position
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Clamp before the log so n == 0 does not produce -inf (it is taken by the exact branch anyway).
  val_if_large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


@gin.configurable(module="layers")
class RelativePositionBias(nn.Module):
  """Returns a [1, heads, q_len, k_len] additive attention bias.

  `query_offset` is the position of the first query (the cache index during incremental decoding).
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, k_len: int, query_offset=0):
    table = self.param("rel_embedding",
                       nn.with_logical_partitioning(initializers.glorot_uniform_2d(),
                                                    ("heads", "relpos_buckets")),
                       (self.num_heads, self.num_buckets), jnp.float32)
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + query_offset
    k_pos = jnp.arange(k_len, dtype=jnp.int32)[None, :]
    buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    # One-hot contraction rather than a gather: it shards cleanly over heads.
    onehot = jnp.asarray(buckets[..., None] == jnp.arange(self.num_buckets), dtype=jnp.float32)
    bias = jnp.einsum("hb,qkb->hqk", table, onehot)
    return bias[None].astype(self.dtype)

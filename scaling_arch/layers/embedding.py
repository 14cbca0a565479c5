"""Token embeddings and the output heads that read the vocabulary distribution off the decoder."""

from typing import Any

import flax.linen as nn
import gin
import jax.numpy as jnp

from scaling_arch.layers import initializers
from scaling_arch.layers.dense import Dense


@gin.configurable(module="layers")
class Embed(nn.Module):
  """A [vocab, embed] table, N(0, 1) as in T5 v1.0; `attend` gives x E^T for a tied output layer."""
  num_embeddings: int
  features: int
  embedding_init: Any = initializers.normal_std(1.0)
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x):
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


@gin.configurable(module="layers")
class AbsolutePositionEmbed(nn.Module):
  """Learned absolute position embeddings, added to token embeddings (architectures without relative
  position bias, such as the Performer)."""
  max_length: int = 2048
  features: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, positions):
    table = self.param("embedding",
                       nn.with_logical_partitioning(initializers.normal_std(1.0), ("unmodeled", "embed")),
                       (self.max_length, self.features), jnp.float32)
    return jnp.take(table, positions, axis=0).astype(self.dtype)


@gin.configurable(module="layers")
class TiedHead(nn.Module):
  """T5 v1.0 output layer: logits = (x * d^-1/2) E^T with the shared input embedding E."""
  vocab_size: int = 0  # unused: the vocabulary is the embedder's
  scale_by_inverse_sqrt_dim: bool = True
  returns_log_probs = False

  def __call__(self, x, embedder, deterministic: bool = True):
    if self.scale_by_inverse_sqrt_dim:
      x = x * (x.shape[-1] ** -0.5)
    return embedder.attend(x).astype(jnp.float32)


@gin.configurable(module="layers")
class UntiedHead(nn.Module):
  """T5.1.1 output layer: logits = x W_out, W_out of shape [embed, vocab], no rescaling of x."""
  vocab_size: int
  dtype: Any = jnp.float32
  returns_log_probs = False

  @nn.compact
  def __call__(self, x, embedder=None, deterministic: bool = True):
    return Dense(self.vocab_size, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                 name="logits")(x).astype(jnp.float32)

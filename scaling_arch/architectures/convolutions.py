"""Lightweight and dynamic convolutions (Wu et al. 2019) as self-attention replacements.

The block is the one of the paper's codebase (Mesh TensorFlow `LocalConvAttnBlock`, architectures spec
section 10.1), with the corrections of decision 9:

  u  = (x W_a + b_a) * sigmoid(x W_b + b_b)              GLU input projection d -> d, with biases
  w  = softmax over the k taps of the kernel              per head: lightweight W [H, k] (one kernel per
                                                          head); dynamic W(t) = u_t W_dyn, W_dyn [d, H*k]
  c_t = sum_r w_r(t) * u_{t+r} + b_c                      depthwise: channel c uses the kernel of its head
                                                          h = c // (d / H) (fairseq's contiguous heads)
  y  = (c W_p + b_p) W_o + b_o                            pointwise d -> d, then output projection d -> d

Taps are centred in the encoder (offsets -(k//2) .. k//2) and causal in the decoder (-(k-1) .. 0); the
module reads which from `AttentionInputs.causal`. Unlike the codebase, a tap reads nothing across a packed
example's boundary or from padding: a tap whose source position has another segment id (or is padding or
outside the row) contributes zero, as zero padding at a sequence edge does (no renormalisation of the
softmax, as in the codebase and fairseq). No position is zeroed besides padding (the codebase zeroed the
decoder's position 0 and packed starts because their token id is 0).

Incremental decoding keeps the last k - 1 conv inputs u of each layer in the `cache` collection.
"""

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from scaling_arch.layers import initializers
from scaling_arch.layers.attention import AttentionInputs
from scaling_arch.layers.dense import Dense


def tap_offsets(kernel_size: int, causal: bool) -> tuple[int, ...]:
  """Relative source offsets r of the taps (output t reads input t + r)."""
  if causal:
    return tuple(range(-(kernel_size - 1), 1))
  left = kernel_size // 2
  return tuple(range(-left, kernel_size - left))


def shift(x, r: int, axis: int = 1):
  """out[t] = x[t + r] along `axis`, zero where t + r falls outside the array."""
  length = x.shape[axis]
  if r == 0:
    return x
  if abs(r) >= length:
    return jnp.zeros_like(x)
  pad = [(0, 0)] * x.ndim
  if r > 0:
    pad[axis] = (0, r)
    sliced = jax.lax.slice_in_dim(x, r, length, axis=axis)
  else:
    pad[axis] = (-r, 0)
    sliced = jax.lax.slice_in_dim(x, 0, length + r, axis=axis)
  return jnp.pad(sliced, pad)


def depthwise_conv(u, weights, segment_ids, offsets, num_heads: int):
  """Segment-aware depthwise convolution with per-head kernels.

  u: [B, L, d] (already zero at padding); weights: [B|1, L|1, H, k] (normalised taps, in the order of
  `offsets`); segment_ids: [B, L] (0 = padding). Returns [B, L, d]: sum over taps whose source position is
  inside the row and in the query's (non-padding) segment.
  """
  batch, length, d = u.shape
  uh = u.reshape(batch, length, num_heads, d // num_heads)
  out = jnp.zeros_like(uh)
  for i, r in enumerate(offsets):
    src_seg = shift(segment_ids, r)  # 0 outside the row, like padding
    valid = (src_seg == segment_ids) & (segment_ids > 0)
    w = weights[..., i] * valid[..., None].astype(weights.dtype)  # [B, L, H]
    out = out + w[..., None] * shift(uh, r)
  return out.reshape(batch, length, d)


class _ConvolutionBlock(nn.Module):
  """GLU -> softmax-normalised per-head depthwise convolution -> pointwise -> output projection.

  Same call signature as MultiHeadAttention (inputs_kv is ignored: the block mixes inputs_q with itself).
  Subclasses give the kernel (`_kernel_logits`).
  """
  num_heads: int
  kernel_size: int = 9
  # DropConnect on the normalised kernel (fairseq's weight_dropout); 0 in pretraining.
  weight_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def _kernel_logits(self, u):
    raise NotImplementedError

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, attention_inputs: AttentionInputs, *, deterministic: bool,
               decode: bool = False):
    del inputs_kv
    d = inputs_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"{type(self).__name__}: the model width {d} is not divisible by num_heads "
                       f"{self.num_heads} (each head owns d / num_heads contiguous channels).")
    causal = attention_inputs.causal
    offsets = tap_offsets(self.kernel_size, causal)

    def dense(features, axes, name, x):
      return Dense(features, kernel_axes=axes, kernel_init=initializers.fan_in_normal(), use_bias=True,
                   dtype=self.dtype, name=name)(x)

    x = inputs_q
    u = dense(d, ("embed", "joined_kv"), "glu_0", x) * jax.nn.sigmoid(
        dense(d, ("embed", "joined_kv"), "glu_1", x))
    segment_ids = attention_inputs.q_segment_ids
    u = u * (segment_ids > 0)[..., None].astype(u.dtype)
    u = nn.with_logical_constraint(u, ("batch", "length", "joined_kv"))

    query_length = u.shape[1]
    if decode and causal:
      initialized = self.has_variable("cache", "conv_inputs")
      cached = self.variable("cache", "conv_inputs", jnp.zeros,
                             (u.shape[0], self.kernel_size - 1, d), u.dtype)
      if initialized:
        # Stepping: the window is the cached k - 1 previous inputs (zeros before the sequence start,
        # which contribute nothing, like zero padding) followed by this step's inputs.
        u = jnp.concatenate([cached.value.astype(u.dtype), u], axis=1)
        segment_ids = jnp.ones(u.shape[:2], jnp.int32)
        cached.value = u[:, -(self.kernel_size - 1):] if self.kernel_size > 1 else cached.value

    logits = self._kernel_logits(u).astype(jnp.float32)  # [1|B, 1|L, H, k]
    weights = jax.nn.softmax(logits, axis=-1)
    if not deterministic and self.weight_dropout_rate > 0.0:
      weights = nn.Dropout(self.weight_dropout_rate)(weights, deterministic=False)
    conv = depthwise_conv(u, weights.astype(self.dtype), segment_ids, offsets, self.num_heads)
    conv = conv[:, -query_length:]
    conv_bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("joined_kv",)),
                           (d,), jnp.float32)
    conv = nn.with_logical_constraint(conv + conv_bias.astype(self.dtype), ("batch", "length", "joined_kv"))
    y = dense(d, ("joined_kv", "mlp"), "pointwise", conv)
    y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
    return dense(d, ("mlp", "embed"), "out", y)


@gin.configurable(module="architectures")
class LightweightConvolution(_ConvolutionBlock):
  """Lightweight convolution: one softmax-normalised kernel of k taps per head, W [H, k], shared by the
  head's d / H channels and by every position."""

  def _kernel_logits(self, u):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2),
            ("heads", "unmodeled")),
        (self.num_heads, self.kernel_size), jnp.float32)  # std k^-1/2, as the codebase
    return kernel[None, None]


@gin.configurable(module="architectures")
class DynamicConvolution(_ConvolutionBlock):
  """Dynamic convolution: the kernel of each head at position t is predicted from the conv input u_t,
  W(t) = reshape(u_t W_dyn, [H, k]) with W_dyn [d, H*k], no bias (fairseq); causal by construction."""

  def _kernel_logits(self, u):
    logits = Dense(self.num_heads * self.kernel_size, kernel_axes=("joined_kv", "unmodeled"),
                   kernel_init=initializers.fan_in_normal(1.0 / self.kernel_size),  # std (k d)^-1/2
                   dtype=self.dtype, name="kernel_predictor")(u)
    return logits.reshape(u.shape[:2] + (self.num_heads, self.kernel_size))

"""Evolved Transformer (So et al. 2019) cells on the T5 v1.0 chassis (architectures spec section 3,
decision 11), as Mesh TensorFlow's evolved_transformer.py builds them. Every numbered step is one
residual sublayer in the skeleton's pre-RMSNorm wrapper: x + Dropout(F(RMSNorm(x))).

Encoder cell (`EvolvedEncoderLayer`):
  1. GLU: (h Wa + ba) * sigmoid(h Wb + bb), d -> d, with biases.
  2. Convolution branches: left ReLU(h W1), d -> 4d; right ReLU(Conv1D_3(h)), d -> d/2, zero-padded to
     4d; LayerNorm_4d(left + right); separable Conv_9 (depthwise over 4d, pointwise 4d -> d/2), zero-padded
     to d (only the first d/2 residual channels are written).
  3. Self-attention (H heads). 4. ReLU feed-forward.
Decoder cell (`EvolvedDecoderLayer`):
  1. Causal self-attention with 2H heads + cross-attention with H heads, summed.
  2. Causal convolution branches: left ReLU(SepConv_11(h)), d -> 2d; right SepConv_7(h), d -> d/2,
     zero-padded to 2d; LayerNorm_2d(left + right); SepConv_7, 2d -> d.
  3. Causal self-attention (H heads). 4. Cross-attention (H heads). 5. Swish feed-forward.
Decoder convolutions read offsets -(k-1)..0 only; the encoder's are centred (-1..1 and -4..4).

One ET cell counts as two vanilla layers, so each stack has `evolved_num_layers(N) = max(1, N // 2)`
cells (6 + 6 at base).

Corrections of the reference code (which this project does not reproduce):
- Convolutions respect segment ids: a tap reads a position only if it lies in the same packed example
  as the output position, and never reads padding (segment id 0); outside that it reads zero, as at the
  sequence edges. The reference convolutions leak across packed examples.
- No input position is zeroed: the reference multiplies every convolution input by (inputs != 0), which
  in the decoder zeroes position 0 (BOS) and the first token of each packed example.
Incremental decoding: each causal convolution keeps its last k-1 inputs in the `cache` collection (the
first full-length call with decode=True creates it, later calls consume the next token(s)); the attention
layers keep their key/value caches.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from scaling_arch.layers import initializers
from scaling_arch.layers.attention import MultiHeadAttention
from scaling_arch.layers.dense import Dense
from scaling_arch.layers.mlp import MlpBlock
from scaling_arch.layers.norms import LayerNorm, RMSNorm
from scaling_arch.layers.relative_position import RelativePositionBias
from scaling_arch.layers.transformer import LayerInputs, residual_dropout

Factory = Callable[..., nn.Module]


@gin.configurable(module="architectures")
def evolved_num_layers(num_layers: int) -> int:
  """ET cells per stack for a vanilla depth: one cell ~ two vanilla layers, so N // 2 (at least 1)."""
  return max(1, int(num_layers) // 2)


def truncated_normal_std(std: float):
  """Truncated normal (+-2 sigma) rescaled so its standard deviation is `std`."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * (std / 0.87962566103423978)
  return init


def pad_channels(x, size: int):
  """Zero-pads the last dimension of x to `size` (the reference's _pad_channels_dim)."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


class _WindowedConv(nn.Module):
  """Base for 1-D convolutions over taps at offsets min_offset..max_offset, segment-aware, with an
  input cache for incremental decoding when causal (max_offset == 0)."""
  min_offset: int = 0
  max_offset: int = 0

  @property
  def width(self) -> int:
    return self.max_offset - self.min_offset + 1

  def windows(self, x, segment_ids, decode: bool):
    """[B, L, k, C]: x at t + r for each offset r, zero outside the sequence and outside t's segment."""
    if self.min_offset > self.max_offset:
      raise ValueError(f"min_offset {self.min_offset} > max_offset {self.max_offset}")
    offsets = range(self.min_offset, self.max_offset + 1)
    batch, length, _ = x.shape
    if decode:
      if self.max_offset != 0:
        raise ValueError("Incremental decoding needs a causal convolution (max_offset == 0).")
      context = self.width - 1
      if context > 0:
        initialized = self.has_variable("cache", "inputs")
        cache = self.variable("cache", "inputs", jnp.zeros, (batch, context, x.shape[-1]), x.dtype)
        if initialized:
          # Stepping: one example per row, its previous inputs in the cache (zeros before position 0).
          extended = jnp.concatenate([cache.value, x.astype(cache.value.dtype)], axis=1)
          cache.value = extended[:, -context:]
          return jnp.stack([extended[:, context + r:context + r + length] for r in offsets], axis=2)
    left, right = max(0, -self.min_offset), max(0, self.max_offset)
    xp = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    sp = jnp.pad(segment_ids, ((0, 0), (left, right)))
    taps = []
    for r in offsets:
      same = (sp[:, left + r:left + r + length] == segment_ids) & (segment_ids > 0)
      taps.append(xp[:, left + r:left + r + length] * same[..., None].astype(x.dtype))
    return jnp.stack(taps, axis=2)


class Conv1D(_WindowedConv):
  """Full 1-D convolution, kernel [k, C_in, C_out] (glorot uniform), no bias."""
  features: int = 0
  kernel_axes: Sequence[str] = ("unmodeled", "embed", "mlp")
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids, decode: bool = False):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.glorot_uniform(),
                                                               tuple(self.kernel_axes)),
                        (self.width, x.shape[-1], self.features), jnp.float32)
    win = self.windows(x.astype(self.dtype), segment_ids, decode)
    return jnp.einsum("blkc,kcf->blf", win, kernel.astype(self.dtype))


class SeparableConv1D(_WindowedConv):
  """Depthwise convolution (taps [k, C_in], std sqrt(1/k), one bias [C_in]) then a pointwise dense
  C_in -> features with bias (the reference's separable_conv1d)."""
  features: int = 0
  in_axis: str = "embed"
  out_axis: str = "mlp"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids, decode: bool = False):
    channels = x.shape[-1]
    taps = self.param("depthwise_kernel",
                      nn.with_logical_partitioning(truncated_normal_std(self.width ** -0.5),
                                                   ("unmodeled", self.in_axis)),
                      (self.width, channels), jnp.float32)
    bias = self.param("depthwise_bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.in_axis,)),
                      (channels,), jnp.float32)
    win = self.windows(x.astype(self.dtype), segment_ids, decode)
    h = jnp.einsum("blkc,kc->blc", win, taps.astype(self.dtype)) + bias.astype(self.dtype)
    return Dense(self.features, (self.in_axis, self.out_axis), initializers.fan_in_normal(), use_bias=True,
                 dtype=self.dtype, name="pointwise")(h)


def _dropout(rate: float):
  return nn.Dropout(rate, broadcast_dims=(-2,))


@gin.configurable(module="architectures")
class EvolvedEncoderLayer(nn.Module):
  """The ET encoder cell: [GLU, convolution branches, self-attention, feed-forward] (module docstring).
  Returns (x, None) for `nn.scan`."""
  self_attention_factory: Factory = MultiHeadAttention
  feed_forward_factory: Factory = MlpBlock
  norm_factory: Factory = RMSNorm
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    d = x.shape[-1]
    segment_ids = inputs.self_attention.q_segment_ids

    # 1. Gated linear unit, with biases.
    h = self.norm_factory(dtype=self.dtype, name="pre_glu_norm")(x)
    value = Dense(d, ("embed", "mlp"), initializers.fan_in_normal(), use_bias=True, dtype=self.dtype,
                  name="glu_0")(h)
    gate = Dense(d, ("embed", "mlp"), initializers.fan_in_normal(), use_bias=True, dtype=self.dtype,
                 name="glu_1")(h)
    x = x + residual_dropout(self.dropout_rate)(value * jax.nn.sigmoid(gate), deterministic=deterministic)

    # 2. Convolution branches.
    h = self.norm_factory(dtype=self.dtype, name="pre_conv_norm")(x)
    left = jax.nn.relu(Dense(4 * d, ("embed", "mlp"), initializers.fan_in_normal(), dtype=self.dtype,
                             name="conv1x1")(h))
    left = _dropout(self.dropout_rate)(left, deterministic=deterministic)
    right = jax.nn.relu(Conv1D(min_offset=-1, max_offset=1, features=d // 2, dtype=self.dtype,
                               name="conv3x1")(h, segment_ids))
    right = _dropout(self.dropout_rate)(right, deterministic=deterministic)
    h = LayerNorm(dtype=self.dtype, axis_name="mlp", name="conv_layer_norm")(left + pad_channels(right, 4 * d))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = SeparableConv1D(min_offset=-4, max_offset=4, features=d // 2, in_axis="mlp", out_axis="embed",
                        dtype=self.dtype, name="sep_conv9x1")(h, segment_ids)
    x = x + residual_dropout(self.dropout_rate)(pad_channels(h, d), deterministic=deterministic)

    # 3. Self-attention.
    h = self.norm_factory(dtype=self.dtype, name="pre_attention_norm")(x)
    h = self.self_attention_factory(dtype=self.dtype, name="attention")(
        h, h, inputs.self_attention, deterministic=deterministic, decode=False)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)

    # 4. Feed-forward.
    h = self.norm_factory(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = self.feed_forward_factory(dtype=self.dtype, name="mlp")(h, deterministic=deterministic)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


@gin.configurable(module="architectures")
class EvolvedDecoderPositionBias(nn.Module):
  """The decoder's relative position biases: one [H, 32] table for the H-head self-attention and one
  [2H, 32] table for the 2H-head self-attention of the first sublayer, each shared by every layer of the
  stack. Returns their biases concatenated on the heads axis: [1, 3H, q, k] (H first)."""
  num_heads: int
  bidirectional: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, k_len: int, query_offset=0):
    narrow = RelativePositionBias(num_heads=self.num_heads, bidirectional=self.bidirectional,
                                  dtype=self.dtype, name="self_attention")(q_len, k_len, query_offset)
    wide = RelativePositionBias(num_heads=2 * self.num_heads, bidirectional=self.bidirectional,
                                dtype=self.dtype, name="wide_self_attention")(q_len, k_len, query_offset)
    return jnp.concatenate([narrow, wide], axis=1)


@gin.configurable(module="architectures")
class EvolvedDecoderLayer(nn.Module):
  """The ET decoder cell: [2H-head self-attention + H-head cross-attention, causal convolution branches,
  self-attention, cross-attention, feed-forward (Swish)] (module docstring).

  `num_heads` is H. The position bias the stack passes is EvolvedDecoderPositionBias's [1, 3H, q, k].
  """
  num_heads: int
  self_attention_factory: Factory = MultiHeadAttention
  cross_attention_factory: Factory = MultiHeadAttention
  feed_forward_factory: Factory = MlpBlock
  norm_factory: Factory = RMSNorm
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def _split_bias(self, self_inputs):
    bias = self_inputs.position_bias
    if bias is None:
      return self_inputs, self_inputs
    heads = self.num_heads
    if bias.shape[1] != 3 * heads:
      raise ValueError(f"EvolvedDecoderLayer expects a [*, 3H={3 * heads}, q, k] position bias "
                       f"(architectures.EvolvedDecoderPositionBias), got {bias.shape}.")
    return (self_inputs.replace(position_bias=bias[:, :heads]),
            self_inputs.replace(position_bias=bias[:, heads:]))

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    d = x.shape[-1]
    segment_ids = inputs.self_attention.q_segment_ids
    narrow_inputs, wide_inputs = self._split_bias(inputs.self_attention)

    # 1. 2H-head self-attention + H-head cross-attention.
    h = self.norm_factory(dtype=self.dtype, name="pre_dual_attention_norm")(x)
    wide = self.self_attention_factory(num_heads=2 * self.num_heads, dtype=self.dtype,
                                       name="wide_self_attention")(
        h, h, wide_inputs, deterministic=deterministic, decode=decode)
    cross = self.cross_attention_factory(dtype=self.dtype, is_cross_attention=True,
                                         name="dual_cross_attention")(
        h, inputs.encoded, inputs.cross_attention, deterministic=deterministic, decode=decode)
    x = x + residual_dropout(self.dropout_rate)(wide + cross, deterministic=deterministic)

    # 2. Causal convolution branches.
    h = self.norm_factory(dtype=self.dtype, name="pre_conv_norm")(x)
    left = SeparableConv1D(min_offset=-10, max_offset=0, features=2 * d, in_axis="embed", out_axis="mlp",
                           dtype=self.dtype, name="sep_conv11x1")(h, segment_ids, decode)
    left = _dropout(self.dropout_rate)(jax.nn.relu(left), deterministic=deterministic)
    right = SeparableConv1D(min_offset=-6, max_offset=0, features=d // 2, in_axis="embed", out_axis="mlp",
                            dtype=self.dtype, name="sep_conv7x1_1")(h, segment_ids, decode)
    right = _dropout(self.dropout_rate)(right, deterministic=deterministic)
    h = LayerNorm(dtype=self.dtype, axis_name="mlp", name="conv_layer_norm")(left + pad_channels(right, 2 * d))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = SeparableConv1D(min_offset=-6, max_offset=0, features=d, in_axis="mlp", out_axis="embed",
                        dtype=self.dtype, name="sep_conv7x1_2")(h, segment_ids, decode)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)

    # 3. Self-attention (H heads).
    h = self.norm_factory(dtype=self.dtype, name="pre_self_attention_norm")(x)
    h = self.self_attention_factory(dtype=self.dtype, name="self_attention")(
        h, h, narrow_inputs, deterministic=deterministic, decode=decode)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)

    # 4. Cross-attention (H heads).
    h = self.norm_factory(dtype=self.dtype, name="pre_cross_attention_norm")(x)
    h = self.cross_attention_factory(dtype=self.dtype, is_cross_attention=True, name="cross_attention")(
        h, inputs.encoded, inputs.cross_attention, deterministic=deterministic, decode=decode)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)

    # 5. Feed-forward (Swish, from the gin scope decoder/).
    h = self.norm_factory(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = self.feed_forward_factory(dtype=self.dtype, name="mlp")(h, deterministic=deterministic)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None

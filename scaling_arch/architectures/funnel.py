"""Funnel Transformer (Dai et al. 2020) as the reference codebase builds it (architectures spec section 7,
decision 6): the encoder is `num_blocks` blocks (default 3) and the sequence is mean-pooled (window and
stride `pooling_size`, default 2) when blocks 2, 3, ... begin, so the blocks run at L, L/2, L/4. The
decoder is the skeleton's and cross-attends to the pooled encoder output (no up-sampling), masked with
the pooled segment ids that the encoder returns.

Where the pooling happens (Mesh TensorFlow's FunnelTransformerLayerStack): in the first layer of each
block after the first, after that layer's self-attention (which still runs at the previous length) and
before its feed-forward. A block with no layers (stacks shallower than `num_blocks`) pools at its start.

Pooled masks: the pooled segment id is the window's first element (as in the reference), and the mean
is taken only over the window's elements of that same segment, so nothing leaks across examples and
padding content is never read.

Packing is exact only when every packed example starts at a multiple of the total pooling factor
pooling_size^(num_blocks - 1) (4 for 3 blocks): then every window lies inside one example and an example
is pooled exactly as alone in its row. The data pipeline guarantees it: gin/models/funnel.gin sets
`tasks.input_alignment.multiple` (macro FUNNEL_INPUT_ALIGNMENT) and the pipeline pads each example's
inputs to that multiple with padding before seqio packs them (tasks/data.py). `FunnelEncoder.
input_alignment` is bound to the same macro and a value that is not a multiple of the pooling factor is
refused when the model is built. (Unaligned, an example that does not start at a window boundary would be
pooled differently, and a token whose window starts in the previous example would be dropped.)

Pooled positions: the relative position bias (one [heads, 32] table shared by every encoder layer of
every block) is applied to re-indexed pooled positions 0..L_b - 1, so one bucket step in block b spans
2^b input tokens (as in the reference; the paper uses Transformer-XL relative attention instead).

Layers per block: `num_layers` split into `num_blocks` as evenly as possible, earlier blocks taking the
remainder (12 -> 4, 4, 4; 6 -> 2, 2, 2; 4 -> 2, 1, 1; 2 -> 1, 1, 0); `block_sizes` sets it explicitly.
Inputs whose length is not a multiple of pooling_size^(num_blocks - 1) are padded (segment id 0) to one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from scaling_arch import errors
from scaling_arch.layers import attention as attention_lib
from scaling_arch.layers.transformer import (REMAT_POLICIES, Encoder, EncoderLayer, LayerInputs,
                                             apply_layer_stack, module_fields, residual_dropout)


def split_layers(num_layers: int, num_blocks: int) -> tuple[int, ...]:
  """`num_layers` over `num_blocks` as evenly as possible, earlier blocks taking the remainder."""
  if num_blocks < 1 or num_layers < 0:
    raise ValueError(f"Cannot split {num_layers} layers into {num_blocks} blocks.")
  base, extra = divmod(num_layers, num_blocks)
  return tuple(base + (1 if i < extra else 0) for i in range(num_blocks))


def mean_pool(x, segment_ids, window: int):
  """Non-overlapping mean pooling of [B, L, d] (L a multiple of `window`) within segments.

  The pooled segment id is the window's first element; the mean runs over the window's elements of that
  segment only (0 where the window starts with padding). Returns (pooled [B, L/w, d], segment ids).
  """
  batch, length, d = x.shape
  xw = x.reshape(batch, length // window, window, d)
  sw = segment_ids.reshape(batch, length // window, window)
  first = sw[..., 0]
  same = ((sw == first[..., None]) & (first[..., None] > 0)).astype(x.dtype)
  count = jnp.maximum(jnp.sum(same, axis=-1, keepdims=True), 1.0)
  pooled = jnp.sum(xw * same[..., None], axis=2) / count
  return pooled, first


class FunnelPoolingLayer(EncoderLayer):
  """An encoder layer that pools between its self-attention and its feed-forward.

  Built from the stack's layer template (same factories and dropout). Returns (pooled x, pooled
  segment ids).
  """
  pooling_size: int = 2

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    h = self.norm_factory(dtype=self.dtype, name="pre_attention_norm")(x)
    h = self.self_attention_factory(dtype=self.dtype, name="attention")(
        h, h, inputs.self_attention, deterministic=deterministic, decode=False)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    x, segment_ids = mean_pool(x, inputs.self_attention.q_segment_ids, self.pooling_size)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = self.norm_factory(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = self.feed_forward_factory(dtype=self.dtype, name="mlp")(h, deterministic=deterministic)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), segment_ids


@gin.configurable(module="architectures")
class FunnelEncoder(Encoder):
  """The skeleton's encoder, in `num_blocks` blocks with mean pooling between them (module docstring).

  `layer_factory` must build a `layers.EncoderLayer` (its fields configure the pooling layers too).
  Returns (encoded [B, ceil(L / pooling_size^(num_blocks-1)), d], pooled segment ids).
  """
  num_blocks: int = 3
  pooling_size: int = 2
  block_sizes: Optional[Sequence[int]] = None
  # The multiple the data pipeline pads every packed example's inputs to (tasks.input_alignment); it must
  # be a multiple of pooling_size^(num_blocks - 1) for packing to be exact. 0: not checked (unpacked use).
  input_alignment: int = 0

  def layers_per_block(self) -> tuple[int, ...]:
    if self.block_sizes is None:
      return split_layers(self.num_layers, self.num_blocks)
    sizes = tuple(int(n) for n in self.block_sizes)
    if len(sizes) != self.num_blocks or sum(sizes) != self.num_layers or min(sizes) < 0:
      raise ValueError(f"FunnelEncoder.block_sizes={sizes} must have num_blocks={self.num_blocks} "
                       f"non-negative entries summing to num_layers={self.num_layers}.")
    return sizes

  @nn.compact
  def __call__(self, x, segment_ids, positions=None, *, deterministic: bool):
    if self.pooling_size < 1:
      raise ValueError(f"pooling_size must be >= 1, got {self.pooling_size}")
    factor = self.pooling_size ** (self.num_blocks - 1)
    if self.input_alignment and self.input_alignment % factor:
      raise errors.ConfigError(
          f"FunnelEncoder: packed examples are aligned to {self.input_alignment} tokens but the pooling "
          f"factor is {factor} (pooling_size^(num_blocks - 1)); set FUNNEL_INPUT_ALIGNMENT = {factor} so "
          "that no pooling window straddles two packed examples.")
    sizes = self.layers_per_block()
    if self.input_position_factory is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), segment_ids.shape)
      x = x + self.input_position_factory(dtype=self.dtype, name="position_embedder")(positions)
    # Pad to a multiple of the total pooling factor (padding: segment id 0).
    pad = (-x.shape[1]) % factor
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    x = residual_dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    relpos = None
    if self.position_bias_factory is not None:
      relpos = self.position_bias_factory(bidirectional=True, name="relpos")  # one table, every block

    def layer_inputs(x, segment_ids):
      bias = relpos(x.shape[1], x.shape[1]) if relpos is not None else None
      return LayerInputs(attention_lib.self_attention_inputs(segment_ids, causal=False, position_bias=bias))

    template = self.layer_factory(dtype=self.dtype, parent=None)
    pool_cls = FunnelPoolingLayer
    if self.remat_policy != "none":
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
      pool_cls = nn.remat(FunnelPoolingLayer, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(3, 4))

    inputs = layer_inputs(x, segment_ids)
    for block, num_layers in enumerate(sizes):
      rest = num_layers
      if block > 0:
        if num_layers == 0:
          x, segment_ids = mean_pool(x, segment_ids, self.pooling_size)
        else:
          x, segment_ids = pool_cls(pooling_size=self.pooling_size, name=f"pool_{block}",
                                    **module_fields(template))(x, inputs, deterministic, False)
          rest -= 1
        inputs = layer_inputs(x, segment_ids)
      if rest:
        x = apply_layer_stack(template, x, inputs, num_layers=rest, scan=self.scan_layers,
                              remat_policy=self.remat_policy, deterministic=deterministic, decode=False,
                              name=f"block_{block}")
    x = self.norm_factory(dtype=self.dtype, name="final_norm")(x)
    x = residual_dropout(self.dropout_rate)(x, deterministic=deterministic)
    return x, segment_ids

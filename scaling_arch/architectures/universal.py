"""Universal Transformer (Dehghani et al. 2018) as in the Mesh TensorFlow UTLayerStack (architectures spec
section 4, decision 3).

Each stack (encoder and decoder separately) has ONE layer (self-attention [+ cross-attention] +
feed-forward, each sublayer with its pre-norm and its GRU gate) applied repeatedly:

    x = Dropout(x0)
    repeat num_mix_before:  x = Block(x)              # optional "vanilla" mixing applications (TM: 2)
    for t in 0..T-1:        x = Block(x + S[t])       # S [T, d]: learned step embedding
    repeat num_mix_after:   x = Block(x)              # (TM: 2)
    x = Dropout(Norm_final(x))

    Block: for each sublayer F:  y = F(Norm_F(x));  x = x + Dropout(GRUGate(x, y))
    GRUGate(x, y) = (1 - z) y + z c,  z = sig(W_z [N(x); N(y)] + b_z),  r = sig(W_r [N(x); N(y)] + b_r),
                    c = act_c(W_c [N(r x); N(y)] + b_c)    (one norm N per gate; act_c = sigmoid as in MTF)

Every application, mixing ones included, uses the same weights: the parameter count does not depend on T
(it is one layer per stack + gates + T x d step embeddings). All applications run in one `nn.scan` with
broadcast parameters and a per-application slice of the `cache` collection, so incremental decoding
keeps a separate key/value cache for every application.

ACT (adaptive computation time, per-position halting as in MTF's act_layer) is a gin option, off by
default: a halting unit p = sigmoid(w . s + b) shared across steps, threshold 1 - act_epsilon, T steps at
most, output = the halting-weighted state. Halting is per position, so causality, packing and
incremental decoding are unaffected. Like MTF it adds no ponder-cost loss; the mean number of updates
is logged as a metric.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from scaling_arch.architectures import albert
from scaling_arch.layers import initializers
from scaling_arch.layers.attention import MultiHeadAttention
from scaling_arch.layers.dense import Dense
from scaling_arch.layers.mlp import ACTIVATIONS, MlpBlock
from scaling_arch.layers.norms import RMSNorm
from scaling_arch.layers.transformer import LayerInputs, residual_dropout

Factory = Callable[..., nn.Module]


@gin.configurable(module="architectures")
class GRUGate(nn.Module):
  """The UT's GRU-style gate between a sublayer's input x and output y (MTF UTLayerStack.gating 'gru').

  Three dense 2d -> d units with biases over normalized inputs; one norm (shared by the three units)
  is applied to each input separately. Unlike the reference code, the reset gate sees N(x), N(y) like
  the update gate, not N(N(x)), N(N(y)) (an in-place list mutation there).
  """
  norm_factory: Factory = RMSNorm
  candidate_activation: str = "sigmoid"  # MTF; 'tanh' would be the textbook GRU
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    d = x.shape[-1]
    norm = self.norm_factory(dtype=self.dtype, name="norm")
    act = jnp.tanh if self.candidate_activation == "tanh" else ACTIVATIONS[self.candidate_activation]

    def unit(name, a, b):
      h = jnp.concatenate([a, b], axis=-1)
      return Dense(d, ("embed", "mlp"), initializers.fan_in_normal(), use_bias=True, dtype=self.dtype,
                   name=name)(h)

    nx, ny = norm(x), norm(y)
    z = jax.nn.sigmoid(unit("update", nx, ny))
    r = jax.nn.sigmoid(unit("reset", nx, ny))
    c = act(unit("candidate", norm(r * x), ny))
    return ((1.0 - z) * y + z * c).astype(self.dtype)


def _gated_residual(x, y, gate_factory, dropout_rate, dtype, name, deterministic):
  if gate_factory is not None:
    y = gate_factory(dtype=dtype, name=name)(x, y)
  return x + residual_dropout(dropout_rate)(y, deterministic=deterministic)


@gin.configurable(module="architectures")
class UniversalEncoderLayer(nn.Module):
  """Pre-norm [self-attention, feed-forward], each sublayer's output GRU-gated before the residual."""
  self_attention_factory: Factory = MultiHeadAttention
  feed_forward_factory: Factory = MlpBlock
  norm_factory: Factory = RMSNorm
  gate_factory: Optional[Factory] = GRUGate
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    h = self.norm_factory(dtype=self.dtype, name="pre_attention_norm")(x)
    h = self.self_attention_factory(dtype=self.dtype, name="attention")(
        h, h, inputs.self_attention, deterministic=deterministic, decode=False)
    x = _gated_residual(x, h, self.gate_factory, self.dropout_rate, self.dtype, "attention_gate",
                        deterministic)
    h = self.norm_factory(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = self.feed_forward_factory(dtype=self.dtype, name="mlp")(h, deterministic=deterministic)
    x = _gated_residual(x, h, self.gate_factory, self.dropout_rate, self.dtype, "mlp_gate", deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


@gin.configurable(module="architectures")
class UniversalDecoderLayer(nn.Module):
  """Pre-norm [causal self-attention, cross-attention, feed-forward], each output GRU-gated."""
  self_attention_factory: Factory = MultiHeadAttention
  cross_attention_factory: Factory = MultiHeadAttention
  feed_forward_factory: Factory = MlpBlock
  norm_factory: Factory = RMSNorm
  gate_factory: Optional[Factory] = GRUGate
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    h = self.norm_factory(dtype=self.dtype, name="pre_self_attention_norm")(x)
    h = self.self_attention_factory(dtype=self.dtype, name="self_attention")(
        h, h, inputs.self_attention, deterministic=deterministic, decode=decode)
    x = _gated_residual(x, h, self.gate_factory, self.dropout_rate, self.dtype, "self_attention_gate",
                        deterministic)
    h = self.norm_factory(dtype=self.dtype, name="pre_cross_attention_norm")(x)
    h = self.cross_attention_factory(dtype=self.dtype, is_cross_attention=True, name="cross_attention")(
        h, inputs.encoded, inputs.cross_attention, deterministic=deterministic, decode=decode)
    x = _gated_residual(x, h, self.gate_factory, self.dropout_rate, self.dtype, "cross_attention_gate",
                        deterministic)
    h = self.norm_factory(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = self.feed_forward_factory(dtype=self.dtype, name="mlp")(h, deterministic=deterministic)
    x = _gated_residual(x, h, self.gate_factory, self.dropout_rate, self.dtype, "mlp_gate", deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


# Kinds of application in the single scan over all of a stack's applications.
MIX_BEFORE, RECURRENT, MIX_AFTER = 0, 1, 2


class UniversalStep(nn.Module):
  """One application of the shared layer: the body of the scan. Scanned inputs per application: the
  step embedding (zeros for mixing applications), the kind of application, and whether it is the first
  recurrent step (where ACT's weighted state starts from zero)."""
  layer_factory: Factory
  act: bool = False
  act_threshold: float = 0.95
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, per_step, inputs: LayerInputs, deterministic: bool, decode: bool):
    step_embedding, kind, first = per_step
    layer = self.layer_factory(dtype=self.dtype, name="layer")
    if not self.act:
      x, _ = layer(carry + step_embedding.astype(carry.dtype), inputs, deterministic, decode)
      return x, None

    # ACT (MTF act_layer, act_type 'basic'): carry = (state, weighted state, halting probability,
    # remainders, number of updates). Mixing applications after the recurrence read the weighted state.
    state, weighted, halting, remainders, n_updates = carry
    recurrent = kind == RECURRENT
    x = jnp.where(kind == MIX_AFTER, weighted, state) + step_embedding.astype(state.dtype)
    p = Dense(1, ("embed", "unmodeled"), initializers.fan_in_normal(), use_bias=True, dtype=jnp.float32,
              name="halting_unit")(x.astype(jnp.float32))
    p = jax.nn.sigmoid(p[..., 0])
    y, _ = layer(x, inputs, deterministic, decode)

    running = (halting < 1.0).astype(jnp.float32)
    new_halted = (halting + p * running > self.act_threshold).astype(jnp.float32) * running
    still_running = (halting + p * running <= self.act_threshold).astype(jnp.float32) * running
    act_halting = halting + p * still_running
    act_remainders = remainders + new_halted * (1.0 - act_halting)
    act_halting = act_halting + new_halted * act_remainders
    act_updates = n_updates + still_running + new_halted
    w = (p * still_running + new_halted * act_remainders)[..., None]
    previous = jnp.where(first, jnp.zeros_like(weighted), weighted).astype(jnp.float32)
    act_weighted = (y.astype(jnp.float32) * w + previous * (1.0 - w)).astype(y.dtype)

    weighted = jnp.where(recurrent, act_weighted, y)
    halting = jnp.where(recurrent, act_halting, halting)
    remainders = jnp.where(recurrent, act_remainders, remainders)
    n_updates = jnp.where(recurrent, act_updates, n_updates)
    return (y, weighted, halting, remainders, n_updates), None


def apply_universal_layers(stack: nn.Module, x, inputs: LayerInputs, *, deterministic: bool,
                           decode: bool):
  """The UT stacks' `apply_layers`: every application of the shared layer in one scan."""
  d = x.shape[-1]
  steps, before, after = stack.num_layers, stack.num_mix_before, stack.num_mix_after
  table = stack.param("step_embedding",
                      nn.with_logical_partitioning(initializers.normal_std(1.0), ("layers", "embed")),
                      (steps, d), jnp.float32)
  step_embedding = jnp.concatenate([jnp.zeros((before, d), jnp.float32), table,
                                    jnp.zeros((after, d), jnp.float32)]).astype(stack.dtype)
  kinds = jnp.asarray([MIX_BEFORE] * before + [RECURRENT] * steps + [MIX_AFTER] * after, jnp.int32)
  first = jnp.asarray([False] * before + [True] * min(steps, 1) + [False] * (max(steps - 1, 0) + after))
  kwargs = dict(layer_factory=stack.layer_factory, act=stack.act, act_threshold=1.0 - stack.act_epsilon,
                dtype=stack.dtype)
  if stack.act:
    zeros = jnp.zeros(x.shape[:-1], jnp.float32)
    carry = (x, x, zeros, zeros, zeros)
  else:
    carry = x
  carry, _ = albert.scan_shared(
      UniversalStep, kwargs, carry, (step_embedding, kinds, first), inputs, deterministic, decode,
      num_applications=before + steps + after, scan=stack.scan_layers, remat_policy=stack.remat_policy,
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), static_argnums=(4, 5))
  if not stack.act:
    return carry
  _, weighted, _, _, n_updates = carry
  if not decode:
    nonpad = (inputs.self_attention.q_segment_ids > 0).astype(jnp.float32)
    stack.sow("metrics", "ponder_time", jnp.sum(n_updates * nonpad) / jnp.maximum(jnp.sum(nonpad), 1.0))
  return weighted


@gin.configurable(module="architectures")
class UniversalEncoder(albert.SharedEncoder):
  """The UT encoder stack: `num_layers` (T) recurrent applications of one gated layer, plus optional
  mixing applications and ACT; otherwise as `layers.Encoder`."""
  layer_factory: Factory = UniversalEncoderLayer
  num_mix_before: int = 0
  num_mix_after: int = 0
  act: bool = False
  act_epsilon: float = 0.05

  def apply_layers(self, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
    return apply_universal_layers(self, x, inputs, deterministic=deterministic, decode=decode)


@gin.configurable(module="architectures")
class UniversalDecoder(albert.SharedDecoder):
  """The UT decoder stack (causal self-attention and cross-attention in the shared layer); each
  application keeps its own key/value cache during incremental decoding."""
  layer_factory: Factory = UniversalDecoderLayer
  num_mix_before: int = 0
  num_mix_after: int = 0
  act: bool = False
  act_epsilon: float = 0.05

  def apply_layers(self, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
    return apply_universal_layers(self, x, inputs, deterministic=deterministic, decode=decode)

"""Switch Transformer (Fedus et al. 2021): a top-1 routed mixture-of-experts feed-forward in every
`expert_every`-th layer of both stacks (architectures spec section 5, decision 4).

Pieces:
- `SwitchFeedForward`: the MoE feed-forward. Tokens are split into groups (the tokens of a batch shard,
  at most `group_size` of them), routed top-1 by a float32 router (multiplicative jitter in training),
  dispatched to `num_experts` ReLU MLPs with one-hot dispatch / combine einsums under a per-group
  capacity, and combined with the router's gate. Experts' kernels are stacked on an `expert` axis
  ([expert, embed, expert_mlp], [expert, expert_mlp, embed]) that the partitioner shards over the
  `expert` mesh axis; the logical constraints on the expert-major activations make XLA insert the
  all-to-alls. A token that overflows its expert's capacity gets a zero output, so the residual passes
  it through unchanged. The load-balancing loss (and the optional router z-loss) are sown into the
  `aux_loss` collection (EncoderDecoderModel adds them to the loss); the load-balancing loss, router
  z-loss, fraction of tokens dropped and expert imbalance are sown into `metrics`.
- MoE layers are the skeleton's `layers.EncoderLayer` / `layers.DecoderLayer` with this feed-forward (gin
  scope `moe`); the skeleton passes every feed-forward the segment ids, so padding is never routed (and
  never takes capacity).
- `SwitchEncoder` / `SwitchDecoder`: stacks that scan over blocks of `expert_every` layers
  (`expert_every - 1` dense layers and one MoE layer), so compile time does not grow with depth. Layer i
  (1-based) is an MoE layer iff i % expert_every == 0: a 12-layer stack with expert_every = 4 has MoE
  layers 4, 8, 12; the `num_layers % expert_every` layers left over after the last block are dense (a
  stack shallower than `expert_every` has no MoE layer).

Evaluation and decoding: with deterministic=True (evaluation, scoring, incremental decoding) the expert
capacity is the whole group, so no token is ever dropped and incremental decoding gives the same
logits as teacher forcing (a token's output depends only on itself). This costs num_experts times the
feed-forward work in the MoE layers at evaluation; `eval_group_size` bounds the size of the dispatch
tensors. `drop_tokens_at_eval = True` restores the reference code's evaluation capacity factor (2.0),
with which a full pass may drop a token that incremental decoding would not.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from scaling_arch.layers import initializers
from scaling_arch.layers.dense import Dense
from scaling_arch.layers.mlp import ACTIVATIONS
from scaling_arch.layers.transformer import (Decoder, DecoderLayer, Encoder, EncoderLayer, LayerInputs,
                                             apply_layer_stack)

Factory = Callable[..., nn.Module]
UNCONSTRAINED = PartitionSpec.UNCONSTRAINED


# -- grouping -------------------------------------------------------------------------------------------
def batch_shards(logical_axis: str = "expert_group") -> int:
  """How many devices the current mesh and axis rules split `logical_axis` over (1 outside a mesh)."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return 1
  spec = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  if spec is None or spec is UNCONSTRAINED:
    return 1
  axes = (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(mesh.shape[a] for a in axes)


def group_shape(batch: int, length: int, group_size: int, shards: int = 1) -> tuple[int, int]:
  """(num_groups, tokens_per_group) for [batch, length] tokens taken batch-major.

  A group is whole rows of one batch shard (the most rows of a shard whose tokens fit in `group_size`)
  or, when a row is longer than `group_size`, an equal piece of one row. So groups never straddle two
  shards and the [groups, group_size] reshape needs no communication. If the batch does not split
  evenly over the shards (e.g. decoding a small batch), rows are grouped as if on one shard.
  """
  if group_size < 1:
    raise ValueError(f"group_size must be positive, got {group_size}")
  rows = batch // shards if shards > 1 and batch % shards == 0 else batch
  if length <= group_size:
    k = max(r for r in range(1, rows + 1) if rows % r == 0 and r * length <= group_size)
    return batch // k, k * length
  j = min(p for p in range(1, length + 1) if length % p == 0 and length // p <= group_size)
  return batch * j, length // j


def expert_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Slots per expert per group: int(S * cf / E), at least `min_capacity`, at most S."""
  return min(tokens_per_group, max(int(tokens_per_group * capacity_factor / num_experts), min_capacity))


# -- routing --------------------------------------------------------------------------------------------
def top1_routing(logits, nonpad, capacity: int):
  """Top-1 routing of [G, S, E] float32 router logits under a per-group capacity.

  Earlier tokens of a group win a slot (a later token can never evict an earlier one). Padding
  (nonpad = 0) is not routed. Returns (dispatch [G, S, E, C] 0/1, combine [G, S, E, C] = gate * dispatch,
  stats): per-group load-balancing loss, router z-loss, fractions dropped, expert usage.
  """
  num_experts = logits.shape[-1]
  nonpad = nonpad.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  expert_index = jnp.argmax(probs, axis=-1)
  gate = jnp.max(probs, axis=-1)
  mask = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32) * nonpad[..., None]  # [G, S, E]
  # Position of each token in its expert's buffer: tokens of the group routed there before it.
  position = jnp.sum((jnp.cumsum(mask, axis=1) - mask) * mask, axis=-1).astype(jnp.int32)  # [G, S]
  kept = mask * (position < capacity)[..., None].astype(jnp.float32)
  dispatch = kept[..., None] * jax.nn.one_hot(position, capacity, dtype=jnp.float32)[:, :, None, :]
  combine = dispatch * gate[..., None, None]

  # Statistics over the real tokens of each group.
  tokens = jnp.sum(nonpad, axis=1)                                   # [G]
  denom = jnp.maximum(tokens, 1.0)[:, None]
  fraction_routed = jnp.sum(mask, axis=1) / denom                    # f_{g,e}
  mean_prob = jnp.sum(probs * nonpad[..., None], axis=1) / denom     # P_{g,e}
  balance = num_experts * jnp.sum(fraction_routed * mean_prob, axis=-1)  # [G]; 1.0 when balanced
  total = jnp.maximum(jnp.sum(tokens), 1.0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  usage = jnp.sum(mask, axis=(0, 1)) / total                         # [E], sums to 1
  stats = {
      "load_balance_loss": jnp.sum(tokens * balance) / total,        # token-weighted mean over groups
      "router_z_loss": jnp.sum(jnp.square(log_z) * nonpad) / total,
      "fraction_dropped": jnp.sum(mask - kept) / total,
      "expert_imbalance": jnp.max(usage) * num_experts,              # busiest expert / mean; 1 = balanced
      "expert_usage": usage,
  }
  return dispatch, combine, stats


def _stacked_fan_in_init(scale: float):
  """Fan-in truncated normal for [expert, in, out] kernels: fan-in is `in`, not expert * in."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                          batch_axis=(0,))


@gin.configurable(module="architectures")
class SwitchFeedForward(nn.Module):
  """Top-1 mixture of ReLU expert MLPs over [B, L, d] (Switch). See the module docstring.

  Attributes:
    num_experts: E.
    intermediate_dim: each expert's hidden size (the dense d_ff).
    capacity_factor_train / capacity_factor_eval: slots per expert per group = int(S * cf / E).
    drop_tokens_at_eval: False (default): at evaluation and decoding the capacity is the group size, so
      nothing is dropped; True: capacity_factor_eval applies (the reference code's behaviour).
    min_expert_capacity: lower bound on the slots per expert.
    group_size: most tokens per routing group in training (a group never spans two batch shards).
    eval_group_size: the same at evaluation without dropping (bounds the [G, S, E, S] dispatch tensor).
    load_balance_loss_weight: coefficient of the load-balancing loss (Switch's alpha).
    router_z_loss_weight: coefficient of the router z-loss (off by default).
    jitter: multiplicative router-input noise U(1 - jitter, 1 + jitter), training only.
    kernel_init_scale: variance scale of the router and expert kernels (Switch's reduced 0.1).
    expert_dropout_rate: dropout on the experts' hidden activations.
  """
  intermediate_dim: int
  num_experts: int = 32
  activation: str = "relu"
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  drop_tokens_at_eval: bool = False
  min_expert_capacity: int = 4
  group_size: int = 1024
  eval_group_size: int = 256
  load_balance_loss_weight: float = 0.01
  router_z_loss_weight: float = 0.0
  jitter: float = 0.01
  kernel_init_scale: float = 0.1
  expert_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids=None, *, deterministic: bool):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
    batch, length, d = x.shape
    num_experts = self.num_experts
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    no_drop = deterministic and not self.drop_tokens_at_eval
    groups, size = group_shape(batch, length, self.eval_group_size if no_drop else self.group_size,
                               batch_shards())
    if no_drop:
      capacity = size
    else:
      cf = self.capacity_factor_eval if deterministic else self.capacity_factor_train
      capacity = expert_capacity(size, num_experts, cf, self.min_expert_capacity)

    xg = nn.with_logical_constraint(x.reshape(groups, size, d), ("expert_group", None, "embed"))
    nonpad = (segment_ids > 0).reshape(groups, size)

    # Router, in float32.
    router_in = xg.astype(jnp.float32)
    if not deterministic and self.jitter > 0.0:
      noise = jax.random.uniform(self.make_rng("dropout"), router_in.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
      router_in = router_in * noise
    logits = Dense(num_experts, ("embed", "unmodeled"), initializers.fan_in_normal(self.kernel_init_scale),
                   dtype=jnp.float32, name="router")(router_in)
    dispatch, combine, stats = top1_routing(logits, nonpad, capacity)

    aux = (self.load_balance_loss_weight * stats["load_balance_loss"] +
           self.router_z_loss_weight * stats["router_z_loss"])
    # Stored as scalars (not sow's default tuples), so they are logged as metrics/<path>/<name>.
    zero = lambda: jnp.zeros((), jnp.float32)
    self.sow("aux_loss", "moe_loss", aux, init_fn=zero, reduce_fn=jnp.add)
    for name in ("load_balance_loss", "router_z_loss", "fraction_dropped", "expert_imbalance"):
      self.sow("metrics", name, stats[name], init_fn=zero, reduce_fn=lambda _, new: new)

    # Experts: dispatch to [E, G, C, d], two matmuls per expert, combine back to [G, S, d].
    init = _stacked_fan_in_init(self.kernel_init_scale)
    wi = self.param("wi", nn.with_logical_partitioning(init, ("expert", "embed", "expert_mlp")),
                    (num_experts, d, self.intermediate_dim), jnp.float32)
    wo = self.param("wo", nn.with_logical_partitioning(init, ("expert", "expert_mlp", "embed")),
                    (num_experts, self.intermediate_dim, d), jnp.float32)
    # Dispatched activations keep d_model whole (None, not `embed`: with no batch row to take the data
    # axis first, the fully sharded rules would split it over `data`, as they do the weights').
    expert_in = jnp.einsum("gsd,gsec->egcd", xg.astype(self.dtype), dispatch.astype(self.dtype))
    expert_in = nn.with_logical_constraint(expert_in, ("expert", UNCONSTRAINED, None, None))
    h = ACTIVATIONS[self.activation](jnp.einsum("egcd,edf->egcf", expert_in, wi.astype(self.dtype)))
    h = nn.with_logical_constraint(h, ("expert", UNCONSTRAINED, None, "expert_mlp"))
    h = nn.Dropout(self.expert_dropout_rate)(h, deterministic=deterministic)
    expert_out = jnp.einsum("egcf,efd->egcd", h, wo.astype(self.dtype))
    expert_out = nn.with_logical_constraint(expert_out, ("expert", UNCONSTRAINED, None, None))
    y = jnp.einsum("egcd,gsec->gsd", expert_out, combine.astype(self.dtype))
    y = nn.with_logical_constraint(y, ("expert_group", None, "embed"))
    return y.reshape(batch, length, d)


# -- layers ---------------------------------------------------------------------------------------------
class SwitchBlock(nn.Module):
  """`num_dense` dense layers then one MoE layer: the unit the Switch stacks scan over."""
  dense_layer_factory: Factory
  moe_layer_factory: Factory
  num_dense: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    for i in range(self.num_dense):
      x, _ = self.dense_layer_factory(dtype=self.dtype, name=f"dense_{i}")(x, inputs, deterministic, decode)
    x, _ = self.moe_layer_factory(dtype=self.dtype, name="moe")(x, inputs, deterministic, decode)
    return x, None


def apply_interleaved_stack(dense_layer_factory: Factory, moe_layer_factory: Factory, x,
                            inputs: LayerInputs, *, num_layers: int, expert_every: int, scan: bool,
                            remat_policy: str, deterministic: bool, decode: bool, dtype):
  """Layers 1..num_layers with an MoE layer at every `expert_every`-th; call inside a compact method.

  The num_layers // expert_every blocks are one scan (params under `blocks`, stacked on `layers`); the
  remaining num_layers % expert_every dense layers follow (params under `layers`).
  """
  if expert_every < 1:
    raise ValueError(f"expert_every must be >= 1, got {expert_every}")
  num_blocks, rest = divmod(num_layers, expert_every)
  if num_blocks:
    block = SwitchBlock(dense_layer_factory=dense_layer_factory, moe_layer_factory=moe_layer_factory,
                        num_dense=expert_every - 1, dtype=dtype, parent=None)
    x = apply_layer_stack(block, x, inputs, num_layers=num_blocks, scan=scan, remat_policy=remat_policy,
                          deterministic=deterministic, decode=decode, name="blocks")
  if rest:
    x = apply_layer_stack(dense_layer_factory(dtype=dtype, parent=None), x, inputs, num_layers=rest,
                          scan=scan, remat_policy=remat_policy, deterministic=deterministic,
                          decode=decode, name="layers")
  return x


# -- stacks ---------------------------------------------------------------------------------------------
def _apply_switch_layers(stack: nn.Module, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
  """The Switch stacks' `apply_layers`: dense layers with an MoE layer at every `expert_every`-th."""
  return apply_interleaved_stack(stack.layer_factory, stack.moe_layer_factory, x, inputs,
                                 num_layers=stack.num_layers, expert_every=stack.expert_every,
                                 scan=stack.scan_layers, remat_policy=stack.remat_policy,
                                 deterministic=deterministic, decode=decode, dtype=stack.dtype)


@gin.configurable(module="architectures")
class SwitchEncoder(Encoder):
  """The skeleton's encoder with an MoE layer (`moe_layer_factory`) at every `expert_every`-th layer.

  `layer_factory` builds the dense layers. Everything else (relative position bias, dropout, final
  norm) is the skeleton's.
  """
  moe_layer_factory: Factory = functools.partial(EncoderLayer, feed_forward_factory=SwitchFeedForward)
  expert_every: int = 4

  def apply_layers(self, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
    return _apply_switch_layers(self, x, inputs, deterministic=deterministic, decode=decode)


@gin.configurable(module="architectures")
class SwitchDecoder(Decoder):
  """The skeleton's decoder (incremental decoding included) with an MoE layer at every
  `expert_every`-th layer."""
  moe_layer_factory: Factory = functools.partial(DecoderLayer, feed_forward_factory=SwitchFeedForward)
  expert_every: int = 4

  def apply_layers(self, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
    return _apply_switch_layers(self, x, inputs, deterministic=deterministic, decode=decode)

"""MLP-Mixer token mixing (Tolstikhin et al. 2021) as self-attention replacements (spec section 11,
decision 10).

Encoder (`TokenMixing`): the Mixer's token-mixing MLP over a fixed length Le, per channel and with weights
shared over channels: y = W2 GELU(W1 x + b1) + b2 along the length, W1 [D_S, Le], W2 [Le, D_S], D_S = d/2.
Decoder (`CausalTokenMixing`, option A of the spec): the hidden is indexed by position (D_S = Ld) and both
matrices are lower-triangular, h_j = GELU(sum_{s<=j} W1[j,s] u_s + b1_j), y_t = sum_{j<=t} W2[t,j] h_j + b2_t,
so it is causal by construction and a prefix of length l uses W[:l, :l]; incremental decoding caches the
inputs and the hidden of every position.

Both index their weights by the position *within the packed example* (segment-relative), and padding is
zeroed before mixing. Packed examples never mix:
  - decoder: the [B, L, L] matrices W[pos_t, pos_s] are gathered per row and masked by "same segment,
    s <= t", so packing costs nothing extra (the einsums are those of an unpacked row);
  - encoder: the hidden is not position-indexed, so each packed example needs its own hidden [D_S, d].
    The row's examples are ranked by length and unpacked into slots (example g's tokens at positions 0..
    of its slot): ranks 2^i - 1 .. 2^(i+1) - 2 form group i, whose slots hold L // 2^i positions (the
    k-th longest of examples sharing L positions has at most L / k tokens). Group i costs as much as one
    unpacked mixer (2^i slots of L / 2^i positions) plus 2^i hiddens, so a row of n examples is exact at
    ceil(log2(n + 1)) mixers' matmul FLOPs and 2^G - 1 >= n hiddens. Each group past the first runs under
    its own `lax.cond`, only when the batch's most-packed row needs it: an unpacked batch (evaluation,
    decoding) costs exactly one mixer. Every example of every row is mixed, whatever their number.
  Memory: a group's hiddens are computed `slots_per_pass` slots at a time (a loop over passes for larger
  groups) and every group past the first is rematerialized on its own, so a step holds one pass's hiddens
  at a time. (A single `lax.switch` over G = 1..10 made XLA and JAX's autodiff size the step's buffers for
  the largest branch, and for the residuals of all branches: 58 GiB per v3 core at base.)
  FLOPs per step (`Trainer.flops_per_step`, the plan's roofline) count one mixer per layer, the cost of
  unpacked rows: the groups a packed batch adds depend on its data (each about +7% of the step at base).

Lengths: a sequence longer than the configured length is an error (`MixerLengthError`, a ValueError naming
the macro to set). A shorter one is accepted and treated as padded to the configured length: padding
is zero before mixing, so using the first L columns of W1 (rows of W2) is exactly the padded computation.
For the same reason a checkpoint pretrained at longer lengths initializes a Mixer configured for shorter
ones (fine-tuning at 64 / 16 after pretraining at 128 / 32): the weights' position axes ("length",
"hidden_length"; partitioning.POSITION_AXES) are cut to their prefix (checkpoints.restore_params).
"""

from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from scaling_arch import errors
from scaling_arch.layers import transformer
from scaling_arch.layers.attention import AttentionInputs


class MixerLengthError(errors.ConfigError, ValueError):
  """The sequence is longer than the Mixer's fixed token-mixing length."""


def _check_length(module: str, length: int, max_length: int, macro: str, allow_shorter: bool):
  if length > max_length or (length < max_length and not allow_shorter):
    raise MixerLengthError(
        f"{module}: the token-mixing weights were built for length {max_length} (gin macro %{macro}) but "
        f"the sequence has length {length}. Pad or truncate the data to {max_length}, or set "
        f"{macro} = {length} (this changes the weights' shapes, so a checkpoint of another length will "
        "not load).")


def segment_layout(segment_ids):
  """Slot (index of the packed example within its row, -1 at padding) and segment-relative position."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length, dtype=jnp.int32)
  nonpad = segment_ids > 0
  prev = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], axis=1)
  starts = nonpad & ((idx == 0) | (segment_ids != prev))
  slot = jnp.where(nonpad, jnp.cumsum(starts, axis=1) - 1, -1)
  start_index = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  position = jnp.where(nonpad, idx - start_index, 0)
  return slot.astype(jnp.int32), position.astype(jnp.int32)


# LeCun normal (truncated, std fan_in^-1/2) for [out, in] matrices: W1 [D_S, Le] and W2 [Le, D_S].
_LECUN_OUT_IN = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2)


def _group_offsets(num_groups: int, length: int):
  """Static layout of the slots of `num_groups` groups: (capacity per group, flat offset per rank)."""
  capacities = [length // 2 ** i for i in range(num_groups)]
  offsets, base = [], 0
  for i, cap in enumerate(capacities):
    offsets += [base + j * cap for j in range(2 ** i)]
    base += 2 ** i * cap
  return capacities, np.asarray(offsets, np.int32)


def _mix_slots(x, start, size, w1, b1, w2, b2, dtype):
  """The token-mixing MLP on slots of `cap` positions: example tokens x[b, start + p] for p < size, zero
  past the example's end. start, size [B, n]; w1 [D_S, cap], w2 [cap, D_S]. Returns [B, n, cap, d]."""
  cap = w2.shape[0]
  length = x.shape[1]
  p = jnp.arange(cap, dtype=jnp.int32)
  source = jnp.clip(start[..., None] + p, 0, length - 1)                   # [B, n, cap]
  valid = (p < size[..., None]).astype(dtype)
  unpacked = jax.vmap(lambda xb, ib: xb[ib])(x, source) * valid[..., None]   # [B, n, cap, d]
  h = jnp.einsum("jp,bgpc->bgjc", w1.astype(dtype), unpacked) + b1.astype(dtype)[:, None]
  h = jax.nn.gelu(h, approximate=True)
  return jnp.einsum("pj,bgjc->bgpc", w2.astype(dtype), h) + b2.astype(dtype)[:, None]


def _mix_group(x, start, size, w1, b1, w2, b2, dtype, slots_per_pass: int):
  """One slot group: its 2^i slots mixed `slots_per_pass` at a time (a loop over passes, each
  rematerialized, when the group holds more), so that only one pass's hiddens [B, n, D_S, d] are alive at
  a time. Returns [B, 2^i * cap, d]."""
  batch, num, d = x.shape[0], start.shape[1], x.shape[2]
  cap = w2.shape[0]
  if num <= slots_per_pass:
    y = _mix_slots(x, start, size, w1, b1, w2, b2, dtype)   # one pass: the custom VJP already recomputes it
  else:
    mix = jax.checkpoint(lambda s, n: _mix_slots(x, s, n, w1, b1, w2, b2, dtype))
    passes = num // slots_per_pass                                          # both powers of 2
    split = lambda a: a.reshape(batch, passes, slots_per_pass).transpose(1, 0, 2)
    y = jax.lax.map(lambda sn: mix(*sn), (split(start), split(size)))    # [P, B, n, cap, d]
    y = y.transpose(1, 0, 2, 3, 4)
  return y.reshape(batch, num * cap, d)


def _recomputed_in_backward(fn):
  """`fn` with a backward pass that runs its forward again: its only residuals are its inputs, whatever
  rematerialization policy encloses it. (Under the layers' `dots_no_batch` policy a slot's hidden, an
  einsum with no batch dimension in dot_general's sense, is saveable; a nested `jax.checkpoint` does not
  stop the enclosing policy from saving every group's hiddens for every layer: 63 GiB per v3 core at
  base.)"""
  @jax.custom_vjp
  def recomputed(*args):
    return fn(*args)

  def forward(*args):
    return fn(*args), args

  def backward(args, cotangent):
    return jax.vjp(fn, *args)[1](cotangent)

  recomputed.defvjp(forward, backward)
  return recomputed


def _mix_examples(x, slot, position, w1, b1, w2, b2, *, dtype, slots_per_pass: int):
  """Token-mixing MLP applied separately to each packed example of each row, in length-ranked slots whose
  capacity halves from group to group (module docstring). Group i runs only when some row of the batch
  holds more than 2^i - 1 examples (a `lax.cond` per group: an unpacked batch runs group 0 alone), and
  every group past the first is rematerialized on its own, so the backward holds one group's buffers at
  a time rather than those of every group the layout allows."""
  batch, length, d = x.shape
  num_groups = num_mixers(length)
  num_slots = 2 ** num_groups - 1
  idx = jnp.arange(length, dtype=jnp.int32)
  dropped = jnp.where(slot < 0, num_slots, slot)          # padding: an index past the end, dropped
  lengths = jax.vmap(lambda s: jnp.zeros(num_slots, jnp.int32).at[s].add(1, mode="drop"))(dropped)
  starts = jax.vmap(lambda s: jnp.full(num_slots, length, jnp.int32).at[s].min(idx, mode="drop"))(dropped)
  order = jnp.argsort(-lengths, axis=-1, stable=True).astype(jnp.int32)    # [B, S]: slot of each rank
  rank = jnp.argsort(order, axis=-1).astype(jnp.int32)                     # [B, S]: rank of each slot
  needed = jnp.max(slot) + 1                               # examples in the batch's most-packed row
  capacities, offsets = _group_offsets(num_groups, length)
  outputs = []
  for i, cap in enumerate(capacities):
    ranked = order[:, 2 ** i - 1:2 ** (i + 1) - 1]                          # [B, 2^i]
    start = jnp.take_along_axis(starts, ranked, axis=1)
    size = jnp.take_along_axis(lengths, ranked, axis=1)
    args = (x, start, size, w1[:, :cap], b1, w2[:cap], b2[:cap])
    if i == 0:
      outputs.append(_mix_slots(*args, dtype=dtype).reshape(batch, length, d))
      continue
    if transformer.tracing_for_cost():   # FLOPs per step: an unpacked row, one mixer (module docstring)
      outputs.append(jnp.zeros((batch, 2 ** i * cap, d), dtype))
      continue
    group = _recomputed_in_backward(
        lambda *a: _mix_group(*a, dtype=dtype, slots_per_pass=slots_per_pass))
    empty = lambda *a, n=2 ** i * cap: jnp.zeros((batch, n, d), dtype)
    outputs.append(jax.lax.cond(needed >= 2 ** i, group, empty, *args))
  flat_y = jnp.concatenate(outputs, axis=1)
  token_rank = jnp.take_along_axis(rank, jnp.clip(slot, 0, num_slots - 1), axis=1)
  flat = jnp.asarray(offsets)[token_rank] + position
  out = jax.vmap(lambda yb, ib: yb[ib])(flat_y, flat)                      # [B, L, d]
  return out * (slot >= 0)[..., None].astype(dtype)


def num_mixers(num_examples: int) -> int:
  """Groups (each one mixer's matmul FLOPs) that the exact form uses for a row of `num_examples`."""
  return max(1, int(num_examples).bit_length())


@gin.configurable(module="architectures")
class TokenMixing(nn.Module):
  """The encoder's token-mixing MLP over a fixed length (replaces bidirectional self-attention).

  Same call signature as MultiHeadAttention; inputs_kv is ignored. Parameters: W1 [D_S, Le] (`w1`),
  b1 [D_S], W2 [Le, D_S] (`w2`), b2 [Le]; LeCun-normal (truncated, std fan_in^-1/2) and zero biases.
  """
  max_length: int                      # Le: %INPUT_LENGTH
  hidden_dim: Optional[int] = None     # D_S; None: d // 2 (the Mixer's ratio)
  length_macro: str = "INPUT_LENGTH"   # named in the length error
  allow_shorter: bool = True           # a shorter sequence is taken as padded to max_length
  slots_per_pass: int = 8              # packed examples mixed at once (a power of 2): memory vs. loop steps
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, attention_inputs: AttentionInputs, *, deterministic: bool,
               decode: bool = False):
    del inputs_kv, deterministic, decode
    if self.slots_per_pass < 1 or self.slots_per_pass & (self.slots_per_pass - 1):
      raise errors.ConfigError(
          f"architectures.TokenMixing.slots_per_pass = {self.slots_per_pass}: it must be a power of 2 "
          "(the slot groups hold 1, 2, 4, ... examples); 8 is the default.")
    batch, length, d = inputs_q.shape
    _check_length(type(self).__name__, length, self.max_length, self.length_macro, self.allow_shorter)
    hidden = self.hidden_dim or d // 2
    w1 = self.param("w1", nn.with_logical_partitioning(_LECUN_OUT_IN, ("mlp", "length")),
                    (hidden, self.max_length), jnp.float32)
    b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (hidden,),
                    jnp.float32)
    w2 = self.param("w2", nn.with_logical_partitioning(_LECUN_OUT_IN, ("length", "mlp")),
                    (self.max_length, hidden), jnp.float32)
    b2 = self.param("b2", nn.with_logical_partitioning(nn.initializers.zeros, ("length",)),
                    (self.max_length,), jnp.float32)
    w1, w2, b2 = w1[:, :length], w2[:length], b2[:length]

    segment_ids = attention_inputs.q_segment_ids
    x = inputs_q * (segment_ids > 0)[..., None].astype(self.dtype)
    slot, position = segment_layout(segment_ids)

    y = _mix_examples(x, slot, position, w1, b1, w2, b2, dtype=self.dtype,
                      slots_per_pass=self.slots_per_pass)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def _lower_triangular_init(key, shape, dtype=jnp.float32):
  """Truncated normal with std (row + 1)^-1/2 on and below the diagonal (LeCun-normal on the row's
  effective fan-in), zero above it (those entries are masked and never used)."""
  rows = jnp.arange(shape[0])[:, None]
  # The same correction as flax's truncated_normal variance scaling (std of N(0,1) cut at +-2).
  std = 1.0 / (0.87962566103423978 * jnp.sqrt(rows + 1.0))
  w = jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * std
  return jnp.where(jnp.arange(shape[1])[None, :] <= rows, w, 0.0).astype(dtype)


@gin.configurable(module="architectures")
class CausalTokenMixing(nn.Module):
  """The decoder's causal token-mixing MLP (spec option A): position-indexed hidden, lower-triangular
  W1 [Ld, Ld] (`w1`: hidden position x input position) and W2 [Ld, Ld] (`w2`: output x hidden), biases
  b1, b2 [Ld]. With decode=True it caches the inputs and hidden of every position."""
  max_length: int                      # Ld: %TARGET_LENGTH
  length_macro: str = "TARGET_LENGTH"
  allow_shorter: bool = True           # prefixes are exact: W[:l, :l]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, attention_inputs: AttentionInputs, *, deterministic: bool,
               decode: bool = False):
    del inputs_kv, deterministic
    batch, length, d = inputs_q.shape
    n = self.max_length
    w1 = self.param("w1", nn.with_logical_partitioning(_lower_triangular_init, ("hidden_length", "length")),
                    (n, n), jnp.float32)
    b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros, ("hidden_length",)), (n,),
                    jnp.float32)
    w2 = self.param("w2", nn.with_logical_partitioning(_lower_triangular_init, ("length", "hidden_length")),
                    (n, n), jnp.float32)
    b2 = self.param("b2", nn.with_logical_partitioning(nn.initializers.zeros, ("length",)), (n,),
                    jnp.float32)
    dtype = self.dtype

    if decode and self.has_variable("cache", "cache_index"):
      return self._step(inputs_q, w1, b1, w2, b2)
    _check_length(type(self).__name__, length, n, self.length_macro, self.allow_shorter)
    if decode:  # the first decode call (full length) creates the caches
      self.variable("cache", "inputs", jnp.zeros, (batch, length, d), dtype)
      self.variable("cache", "hidden", jnp.zeros, (batch, length, d), dtype)
      self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))

    segment_ids = attention_inputs.q_segment_ids
    x = inputs_q * (segment_ids > 0)[..., None].astype(dtype)
    _, position = segment_layout(segment_ids)
    idx = jnp.arange(length)
    visible = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0) &
               (idx[:, None] >= idx[None, :]))                                    # [B, L, L]
    pair = (position[:, :, None], position[:, None, :])
    m1 = jnp.where(visible, w1[pair], 0.0).astype(dtype)
    m2 = jnp.where(visible, w2[pair], 0.0).astype(dtype)
    h = jax.nn.gelu(jnp.einsum("bjs,bsc->bjc", m1, x) + b1[position].astype(dtype)[..., None],
                    approximate=True)
    y = jnp.einsum("btj,bjc->btc", m2, h) + b2[position].astype(dtype)[..., None]
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))

  def _step(self, x, w1, b1, w2, b2):
    dtype = self.dtype
    inputs = self.variable("cache", "inputs", jnp.zeros, x.shape, dtype)
    hidden = self.variable("cache", "hidden", jnp.zeros, x.shape, dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    cache_length = inputs.value.shape[1]
    if cache_length > self.max_length:
      _check_length(type(self).__name__, cache_length, self.max_length, self.length_macro, False)
    step = x.shape[1]
    i = index.value
    rows = i + jnp.arange(step)
    cols = jnp.arange(cache_length)
    causal = (cols[None, :] <= rows[:, None]).astype(dtype)                        # [s, Lc]
    inputs.value = jax.lax.dynamic_update_slice(inputs.value, x.astype(dtype), (0, i, 0))
    m1 = jnp.take(w1[:, :cache_length], rows, axis=0).astype(dtype) * causal
    h = jax.nn.gelu(jnp.einsum("js,bsc->bjc", m1, inputs.value) + jnp.take(b1, rows).astype(dtype)[:, None],
                    approximate=True)
    hidden.value = jax.lax.dynamic_update_slice(hidden.value, h, (0, i, 0))
    m2 = jnp.take(w2[:, :cache_length], rows, axis=0).astype(dtype) * causal
    index.value = i + step
    return jnp.einsum("tj,bjc->btc", m2, hidden.value) + jnp.take(b2, rows).astype(dtype)[:, None]

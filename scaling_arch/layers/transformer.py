"""The encoder-decoder skeleton every architecture shares.

Each piece is a gin-bound factory: the layers take their self-attention, cross-attention, feed-forward
and norm factories; the stacks take a layer factory (and optional position-bias / absolute-position
factories); the model takes a token embedder, the two stacks and an output head. An architecture replaces
one factory in its gin file; only architectures that change the stack itself bring their own stack.

Stacks apply T5 v1.0's pre-norm residual wrapper: x + Dropout(F(RMSNorm(x))) for every sublayer, then a
final RMSNorm and dropout. Layers are scanned (`nn.scan`, params stacked on a `layers` axis) so compile
time does not grow with depth, and optionally rematerialized.
"""

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp

from scaling_arch.layers import attention as attention_lib
from scaling_arch.layers.attention import AttentionInputs, MultiHeadAttention
from scaling_arch.layers.embedding import Embed, TiedHead
from scaling_arch.layers.mlp import MlpBlock
from scaling_arch.layers.norms import RMSNorm
from scaling_arch.layers.relative_position import RelativePositionBias

Factory = Callable[..., nn.Module]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_UNROLL = contextvars.ContextVar("unroll_scans", default=False)


@contextlib.contextmanager
def unrolled_scans():
  """Inside this context scanned stacks are traced fully unrolled (same parameters, no loop).

  XLA's cost analysis counts a loop body once; the FLOPs of a step are measured on the unrolled trace.
  """
  token = _UNROLL.set(True)
  try:
    yield
  finally:
    _UNROLL.reset(token)


def tracing_for_cost() -> bool:
  """True inside unrolled_scans(): the trace is measured, not run. A layer whose work depends on the data
  (the Mixer's slot groups for packed rows) counts its data-independent part there."""
  return _UNROLL.get()


def scan_unroll() -> int | bool:
  """The `unroll` argument for scans over layers or microbatches: 1, or True inside unrolled_scans()."""
  return True if _UNROLL.get() else 1


@flax.struct.dataclass
class LayerInputs:
  """Everything a layer reads besides its residual stream (broadcast to every scanned layer)."""
  self_attention: AttentionInputs
  cross_attention: Optional[AttentionInputs] = None
  encoded: Optional[jax.Array] = None


def module_fields(module: nn.Module) -> dict[str, Any]:
  """The dataclass fields of a configured module, to rebuild it as a lifted (scanned / remat) class."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name") and f.init}


def apply_layer_stack(layer: nn.Module, x, inputs: LayerInputs, *, num_layers: int, scan: bool,
                      remat_policy: str, deterministic: bool, decode: bool, name: str = "layers"):
  """Applies `num_layers` independent copies of `layer` (a configured, unbound template).

  Must be called from inside a compact method. With scan=True the copies are one `nn.scan` whose params
  carry a leading `layers` axis; otherwise they are separate submodules `layers_0`, `layers_1`, ...
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
  cls = type(layer)
  if remat_policy != "none":
    # Static args count `self` as 0: (x=1, inputs=2, deterministic=3, decode=4).
    cls = nn.remat(cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan, static_argnums=(3, 4))
  kwargs = module_fields(layer)
  if scan:
    scanned = nn.scan(cls, variable_axes={"params": 0, "cache": 0, "aux_loss": 0, "metrics": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=num_layers,
                      unroll=scan_unroll(), metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(name=name, **kwargs)(x, inputs, deterministic, decode)
    return x
  for i in range(num_layers):
    x, _ = cls(name=f"{name}_{i}", **kwargs)(x, inputs, deterministic, decode)
  return x


def residual_dropout(rate: float):
  # One mask per example and channel, shared along the length, as T5X / Flaxformer do.
  return nn.Dropout(rate, broadcast_dims=(-2,))


@gin.configurable(module="layers")
class EncoderLayer(nn.Module):
  """Pre-norm [self-attention, feed-forward] with residuals. Returns (x, None) for `nn.scan`."""
  self_attention_factory: Factory = MultiHeadAttention
  feed_forward_factory: Factory = MlpBlock
  norm_factory: Factory = RMSNorm
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    h = self.norm_factory(dtype=self.dtype, name="pre_attention_norm")(x)
    h = self.self_attention_factory(dtype=self.dtype, name="attention")(
        h, h, inputs.self_attention, deterministic=deterministic, decode=False)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = self.norm_factory(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = self.feed_forward_factory(dtype=self.dtype, name="mlp")(
        h, segment_ids=inputs.self_attention.q_segment_ids, deterministic=deterministic)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


@gin.configurable(module="layers")
class DecoderLayer(nn.Module):
  """Pre-norm [causal self-attention, cross-attention, feed-forward] with residuals."""
  self_attention_factory: Factory = MultiHeadAttention
  cross_attention_factory: Factory = MultiHeadAttention
  feed_forward_factory: Factory = MlpBlock
  norm_factory: Factory = RMSNorm
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, deterministic: bool, decode: bool = False):
    h = self.norm_factory(dtype=self.dtype, name="pre_self_attention_norm")(x)
    h = self.self_attention_factory(dtype=self.dtype, name="self_attention")(
        h, h, inputs.self_attention, deterministic=deterministic, decode=decode)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = self.norm_factory(dtype=self.dtype, name="pre_cross_attention_norm")(x)
    h = self.cross_attention_factory(dtype=self.dtype, is_cross_attention=True, name="cross_attention")(
        h, inputs.encoded, inputs.cross_attention, deterministic=deterministic, decode=decode)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = self.norm_factory(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = self.feed_forward_factory(dtype=self.dtype, name="mlp")(
        h, segment_ids=inputs.self_attention.q_segment_ids, deterministic=deterministic)
    x = x + residual_dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


@gin.configurable(module="layers")
class Encoder(nn.Module):
  """A stack of encoder layers over embedded inputs; returns (encoded, its segment ids).

  The relative position bias (one table per stack) is computed once here and shared by every layer.
  Set `position_bias_factory = None` for architectures without it, and `input_position_factory` to add
  absolute position embeddings to the inputs. Architectures that change how the layers are stacked
  subclass this and override `apply_layers`.
  """
  num_layers: int
  layer_factory: Factory = EncoderLayer
  position_bias_factory: Optional[Factory] = RelativePositionBias
  input_position_factory: Optional[Factory] = None
  norm_factory: Factory = RMSNorm
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids, positions=None, *, deterministic: bool):
    if self.input_position_factory is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), segment_ids.shape)
      x = x + self.input_position_factory(dtype=self.dtype, name="position_embedder")(positions)
    x = residual_dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    bias = None
    if self.position_bias_factory is not None:
      bias = self.position_bias_factory(bidirectional=True, name="relpos")(x.shape[1], x.shape[1])
    inputs = LayerInputs(attention_lib.self_attention_inputs(segment_ids, causal=False,
                                                             position_bias=bias))
    x = self.apply_layers(x, inputs, deterministic=deterministic, decode=False)
    x = self.norm_factory(dtype=self.dtype, name="final_norm")(x)
    x = residual_dropout(self.dropout_rate)(x, deterministic=deterministic)
    return x, segment_ids

  def apply_layers(self, x, inputs: "LayerInputs", *, deterministic: bool, decode: bool):
    """The layers between the embedded inputs and the final norm: what a stack-changing architecture
    (shared layers, interleaved experts) overrides. Called inside `__call__`, so it may create modules."""
    return apply_layer_stack(self.layer_factory(dtype=self.dtype, parent=None), x, inputs,
                             num_layers=self.num_layers, scan=self.scan_layers, remat_policy=self.remat_policy,
                             deterministic=deterministic, decode=decode)


@gin.configurable(module="layers")
class Decoder(nn.Module):
  """A stack of decoder layers over embedded (shifted) targets; returns the final hidden states.

  With decode=True it runs incrementally: the first call (full length) creates the caches, each later
  call consumes the next token(s) and advances the stack's own position counter, which places the
  relative position bias.
  """
  num_layers: int
  layer_factory: Factory = DecoderLayer
  position_bias_factory: Optional[Factory] = RelativePositionBias
  input_position_factory: Optional[Factory] = None
  norm_factory: Factory = RMSNorm
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, encoded, encoder_segment_ids, segment_ids, *, deterministic: bool,
               decode: bool = False):
    batch, length = x.shape[:2]
    offset = 0
    key_length = length
    stepping = False
    if decode:
      stepping = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      key_slots = self.variable("cache", "key_slots", jnp.zeros, (length,), jnp.int8)
      if stepping:
        offset = position.value
        key_length = key_slots.value.shape[0]
        position.value = offset + length
    if self.input_position_factory is not None:
      positions = offset + jnp.broadcast_to(jnp.arange(length), (batch, length))
      x = x + self.input_position_factory(dtype=self.dtype, name="position_embedder")(positions)
    x = residual_dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    bias = None
    if self.position_bias_factory is not None:
      bias = self.position_bias_factory(bidirectional=False, name="relpos")(length, key_length, offset)
    if stepping:
      self_inputs = AttentionInputs(
          q_segment_ids=jnp.ones((batch, length), jnp.int32),
          kv_segment_ids=jnp.ones((batch, key_length), jnp.int32),
          q_positions=offset + jnp.broadcast_to(jnp.arange(length), (batch, length)),
          kv_positions=jnp.broadcast_to(jnp.arange(key_length), (batch, key_length)),
          position_bias=bias, causal=True)
      segment_ids = jnp.ones((batch, length), jnp.int32)
    else:
      self_inputs = attention_lib.self_attention_inputs(segment_ids, causal=True, position_bias=bias)
    inputs = LayerInputs(self_inputs, attention_lib.cross_attention_inputs(segment_ids, encoder_segment_ids),
                         encoded)
    x = self.apply_layers(x, inputs, deterministic=deterministic, decode=decode)
    x = self.norm_factory(dtype=self.dtype, name="final_norm")(x)
    return residual_dropout(self.dropout_rate)(x, deterministic=deterministic)

  def apply_layers(self, x, inputs: "LayerInputs", *, deterministic: bool, decode: bool):
    """The layers between the embedded targets and the final norm (see `Encoder.apply_layers`)."""
    return apply_layer_stack(self.layer_factory(dtype=self.dtype, parent=None), x, inputs,
                             num_layers=self.num_layers, scan=self.scan_layers, remat_policy=self.remat_policy,
                             deterministic=deterministic, decode=decode)


@gin.configurable(module="layers")
class EncoderDecoder(nn.Module):
  """The T5-style encoder-decoder: the contract every architecture implements.

  `__call__` gives teacher-forced logits (or normalized log-probabilities when the head says so),
  `encode` the encoder output and its segment ids, `decode` the decoder's logits, incrementally with a
  cache when decode=True.
  """
  vocab_size: int
  embed_dim: int
  token_embedder_factory: Factory = Embed
  encoder_factory: Factory = Encoder
  decoder_factory: Factory = Decoder
  head_factory: Factory = TiedHead
  dtype: Any = jnp.float32

  def setup(self):
    self.token_embedder = self.token_embedder_factory(
        num_embeddings=self.vocab_size, features=self.embed_dim, dtype=self.dtype)
    self.encoder = self.encoder_factory(dtype=self.dtype)
    self.decoder = self.decoder_factory(dtype=self.dtype)
    self.head = self.head_factory(vocab_size=self.vocab_size)

  @property
  def head_returns_log_probs(self) -> bool:
    return bool(getattr(self.head, "returns_log_probs", False))

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, *,
             enable_dropout: bool = False):
    if encoder_segment_ids is None:
      encoder_segment_ids = (encoder_input_tokens > 0).astype(jnp.int32)
    x = self.token_embedder(encoder_input_tokens)
    return self.encoder(x, encoder_segment_ids, encoder_positions, deterministic=not enable_dropout)

  def decode(self, encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids=None, *,
             enable_dropout: bool = False, decode: bool = False):
    if decoder_segment_ids is None:
      decoder_segment_ids = jnp.ones(decoder_input_tokens.shape, jnp.int32)
    x = self.token_embedder(decoder_input_tokens)
    h = self.decoder(x, encoded, encoder_segment_ids, decoder_segment_ids,
                     deterministic=not enable_dropout, decode=decode)
    return self.head(h, self.token_embedder, deterministic=not enable_dropout)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = False):
    if decoder_segment_ids is None:
      decoder_segment_ids = (decoder_target_tokens > 0).astype(jnp.int32)
    encoded, encoded_segment_ids = self.encode(encoder_input_tokens, encoder_segment_ids,
                                               encoder_positions, enable_dropout=enable_dropout)
    return self.decode(encoded, encoded_segment_ids, decoder_input_tokens, decoder_segment_ids,
                       enable_dropout=enable_dropout)

"""EncoderDecoderModel: the thin wrapper that turns a Flax encoder-decoder into a loss, scores and
predictions, the way T5X's model classes do.

Loss convention: cross-entropy summed over real target tokens and divided by their number (so the train
loss and the evaluation's negative log-perplexity are in nats per target token), plus T5's z-loss
(1e-4 * logZ^2, in training only) and any auxiliary losses a layer sows into the `aux_loss` collection
(mixture-of-experts load balancing). Scalars a layer sows into the `metrics` collection (e.g. the
fraction of tokens a router dropped) are averaged and logged as `metrics/<path>`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jax.Array]

INPUT_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
OPTIONAL_FEATURES = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
                     "decoder_positions")


def cross_entropy_with_z_loss(logits, targets, weights, z_loss: float):
  """Per-token cross-entropy and z-loss terms, both weighted; logits in float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - target_logit) * weights
  z = z_loss * jnp.square(log_z) * weights
  return ce, z


@gin.configurable
class EncoderDecoderModel:
  """Loss, evaluation and decoding for any architecture that implements the EncoderDecoder contract.

  Attributes:
    module: the Flax encoder-decoder (`layers.EncoderDecoder` or an architecture's own).
    z_loss: coefficient of the log-partition penalty added in training.
    aux_loss_collection: the collection layers sow auxiliary losses into.
  """

  def __init__(self, module: nn.Module, z_loss: float = 1e-4, aux_loss_collection: str = "aux_loss"):
    self.module = module
    self.z_loss = z_loss
    self.aux_loss_collection = aux_loss_collection

  # -- variables -------------------------------------------------------------------------------------
  def dummy_batch(self, batch_size: int, input_length: int, target_length: int) -> dict[str, jax.Array]:
    enc = jnp.ones((batch_size, input_length), jnp.int32)
    dec = jnp.ones((batch_size, target_length), jnp.int32)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": dec}

  def init(self, rng, batch: Batch):
    """Boxed (logically partitioned) parameters for a batch of these shapes."""
    variables = self.module.init({"params": rng, "dropout": rng}, **self._module_inputs(batch),
                                 enable_dropout=False)
    return {"params": variables["params"]}

  def _module_inputs(self, batch: Batch) -> dict[str, Any]:
    out = {k: batch[k] for k in INPUT_FEATURES}
    for k in OPTIONAL_FEATURES:
      if k in batch:
        out[k] = batch[k]
    return out

  # -- training and evaluation --------------------------------------------------------------------------
  def logits(self, params, batch: Batch, *, dropout_rng=None, enable_dropout: bool = False):
    rngs = {"dropout": dropout_rng} if enable_dropout else {}
    logits, state = self.module.apply({"params": params}, **self._module_inputs(batch),
                                      enable_dropout=enable_dropout, rngs=rngs,
                                      mutable=[self.aux_loss_collection, "metrics"])
    aux = jax.tree.leaves(state.get(self.aux_loss_collection, {}))
    aux_loss = sum((jnp.sum(a) for a in aux), jnp.zeros((), jnp.float32))
    return logits, aux_loss, sown_metrics(state.get("metrics", {}))

  def loss_fn(self, params, batch: Batch, dropout_rng, *, enable_dropout: bool = True):
    """Scalar training loss and a dict of summed statistics (for logging across microbatches)."""
    logits, aux_loss, layer_metrics = self.logits(params, batch, dropout_rng=dropout_rng,
                                                  enable_dropout=enable_dropout)
    weights = self._weights(batch)
    ce, z = cross_entropy_with_z_loss(logits, batch["decoder_target_tokens"], weights, self.z_loss)
    num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
    loss = (jnp.sum(ce) + jnp.sum(z)) / num_tokens + aux_loss
    stats = {
        "cross_entropy_sum": jnp.sum(ce),
        "z_loss_sum": jnp.sum(z),
        "aux_loss": aux_loss,
        "num_tokens": jnp.sum(weights),
        "accuracy_sum": jnp.sum((jnp.argmax(logits, -1) == batch["decoder_target_tokens"]) * weights),
        **layer_metrics,
    }
    return loss, stats

  def eval_stats(self, params, batch: Batch):
    """Summed cross-entropy and token count: negative log-perplexity = -sum / count."""
    logits, _, _ = self.logits(params, batch)
    weights = self._weights(batch)
    ce, _ = cross_entropy_with_z_loss(logits, batch["decoder_target_tokens"], weights, 0.0)
    return {
        "cross_entropy_sum": jnp.sum(ce),
        "num_tokens": jnp.sum(weights),
        "accuracy_sum": jnp.sum((jnp.argmax(logits, -1) == batch["decoder_target_tokens"]) * weights),
    }

  def score(self, params, batch: Batch):
    """Log-likelihood of each example's targets, [batch]."""
    logits, _, _ = self.logits(params, batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_ll = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    return jnp.sum(token_ll * self._weights(batch), axis=-1)

  @staticmethod
  def _weights(batch: Batch):
    if "decoder_loss_weights" in batch:
      return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)

  # -- decoding --------------------------------------------------------------------------------------
  def encode(self, params, encoder_input_tokens, encoder_segment_ids=None):
    return self.module.apply({"params": params}, encoder_input_tokens, encoder_segment_ids,
                             method=self.module.encode)

  def init_cache(self, params, encoded, encoded_segment_ids, batch_size: int, max_length: int):
    """The decoder's cache for decoding up to `max_length` tokens."""
    _, variables = self.module.apply(
        {"params": params}, encoded, encoded_segment_ids, jnp.zeros((batch_size, max_length), jnp.int32),
        decode=True, mutable=["cache"], method=self.module.decode)
    return variables["cache"]

  def decode_step(self, params, cache, encoded, encoded_segment_ids, tokens):
    """Log-probabilities [batch, vocab] for the next token after `tokens` [batch, 1], and the new cache."""
    logits, variables = self.module.apply(
        {"params": params, "cache": cache}, encoded, encoded_segment_ids, tokens, decode=True,
        mutable=["cache"], method=self.module.decode)
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1), variables["cache"]


def sown_metrics(collection) -> dict:
  """{'metrics/<path>': mean} for every array layers sowed into the `metrics` collection."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(collection)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[f"metrics/{name}"] = jnp.mean(jnp.asarray(value, jnp.float32))
  return out


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params))))

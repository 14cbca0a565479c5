"""Greedy and beam-search decoding over a model's incremental decode, for inference evaluation.

Both run on any `EncoderDecoderModel` (every architecture implements its contract): `encode` once,
`init_cache` for `max_length` target tokens, then `decode_step` one token at a time inside a
`jax.lax.while_loop`, so the whole decode is one jittable function. Decoding starts from id 0 (the
decoder's BOS, as in training's shifted targets) and a sequence ends at `eos_id` (1 in T5's vocabularies);
positions after its EOS are 0. Id 0 (padding, never a training target) and ids at or above `vocab_size`
(the embedding's padding rows) are never produced.

Beam search keeps `beam_size` live hypotheses per example and the `beam_size` best finished ones,
scored by log-probability divided by the GNMT length penalty ((5 + length) / 6) ** alpha; it stops when
no live hypothesis can still beat the worst finished one. Caches are reordered along each leaf's batch
axis, found by shape (a leaf whose shape does not depend on the batch, e.g. a position counter, is kept).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import gin
import jax
import jax.numpy as jnp

from scaling_arch import errors

NEG_INF = -1e30  # finite, so that -inf - -inf never makes a NaN


def _mask_vocab(log_probs, vocab_size: Optional[int]):
  """Log-probabilities with the ids decoding never produces (0, and >= vocab_size) at NEG_INF."""
  ids = jnp.arange(log_probs.shape[-1])
  allowed = (ids > 0) if vocab_size is None else (ids > 0) & (ids < vocab_size)
  return jnp.where(allowed, log_probs, NEG_INF)


def greedy(model, params, encoder_input_tokens, *, max_length: int, eos_id: int = 1,
           vocab_size: Optional[int] = None):
  """Greedy decoding: (tokens [batch, max_length], log-probability of each sequence [batch])."""
  batch = encoder_input_tokens.shape[0]
  encoded, segment_ids = model.encode(params, encoder_input_tokens)
  cache = model.init_cache(params, encoded, segment_ids, batch, max_length)

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < max_length) & ~jnp.all(done)

  def body(state):
    i, last, cache, done, out, score = state
    log_probs, cache = model.decode_step(params, cache, encoded, segment_ids, last[:, None])
    log_probs = _mask_vocab(log_probs, vocab_size)
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    score = score + jnp.where(done, 0.0, jnp.max(log_probs, axis=-1))
    token = jnp.where(done, 0, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    return i + 1, token, cache, done | (token == eos_id), out, score

  init = (jnp.int32(0), jnp.zeros((batch,), jnp.int32), cache, jnp.zeros((batch,), bool),
          jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), jnp.float32))
  _, _, _, _, tokens, score = jax.lax.while_loop(cond, body, init)
  return tokens, score


def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha; 1 when alpha is 0."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def cache_batch_axes(model, params, encoded, segment_ids, batch: int, max_length: int):
  """For each cache leaf, the axis that holds the batch (None for leaves that do not have one)."""
  def shapes(n):
    abstract = lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape[1:]), x.dtype)
    return jax.eval_shape(lambda p, e, s: model.init_cache(p, e, s, n, max_length),
                          jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                          jax.tree.map(abstract, encoded), jax.tree.map(abstract, segment_ids))

  def axis(a, b):
    changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return changed[0] if changed else None

  return jax.tree.map(axis, shapes(batch), shapes(batch + 1))


def beam_search(model, params, encoder_input_tokens, *, max_length: int, beam_size: int = 4,
                alpha: float = 0.6, eos_id: int = 1, vocab_size: Optional[int] = None,
                return_all: bool = False):
  """Beam search: (best tokens [batch, max_length], their length-penalized score [batch]).

  With return_all: the `beam_size` finished hypotheses, best first ([batch, beam, max_length] and
  [batch, beam]; slots no hypothesis reached hold zeros and a score <= NEG_INF / 2).
  """
  batch, k = encoder_input_tokens.shape[0], beam_size
  encoded, segment_ids = model.encode(params, encoder_input_tokens)
  encoded, segment_ids = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), (encoded, segment_ids))
  cache = model.init_cache(params, encoded, segment_ids, batch * k, max_length)
  axes = cache_batch_axes(model, params, encoded, segment_ids, batch * k, max_length)
  positions = jnp.arange(max_length)
  max_penalty = length_penalty(max_length, alpha)

  def take(x, index):  # x [batch, n, ...], index [batch, m] -> [batch, m, ...]
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(state):
    i, _, alive_lp, _, _, finished_scores, _ = state
    # Live log-probabilities only fall and the penalty is largest at max_length, so alive_lp / that
    # penalty bounds every score a live hypothesis can still reach.
    settled = finished_scores[:, -1] >= alive_lp[:, 0] / max_penalty
    return (i < max_length) & ~jnp.all(settled)

  def body(state):
    i, alive, alive_lp, last, cache, finished_scores, finished = state
    log_probs, cache = model.decode_step(params, cache, encoded, segment_ids, last.reshape(-1, 1))
    log_probs = _mask_vocab(log_probs, vocab_size)
    vocab = log_probs.shape[-1]
    candidates = (alive_lp[:, :, None] + log_probs.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    top_lp, top = jax.lax.top_k(candidates, 2 * k)                                  # [batch, 2k]
    source, token = top // vocab, (top % vocab).astype(jnp.int32)
    seqs = jnp.where(positions == i, token[:, :, None], take(alive, source))          # [batch, 2k, L]
    ended = token == eos_id
    # The k best candidates that did not end stay alive; their caches follow them.
    alive_lp, pick = jax.lax.top_k(jnp.where(ended, NEG_INF, top_lp), k)
    alive, last = take(seqs, pick), jnp.take_along_axis(token, pick, axis=1)
    rows = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(source, pick, axis=1)).reshape(-1)
    cache = jax.tree.map(lambda x, ax: x if ax is None else jnp.take(x, rows, axis=ax), cache, axes)
    # Candidates that ended join the finished ones; the k best are kept.
    scores = jnp.concatenate([finished_scores, jnp.where(ended, top_lp / length_penalty(i + 1, alpha),
                                                         NEG_INF)], axis=1)
    finished_scores, pick = jax.lax.top_k(scores, k)
    finished = take(jnp.concatenate([finished, seqs], axis=1), pick)
    return i + 1, alive, alive_lp, last, cache, finished_scores, finished

  init = (jnp.int32(0), jnp.zeros((batch, k, max_length), jnp.int32),
          jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1)),
          jnp.zeros((batch, k), jnp.int32), cache, jnp.full((batch, k), NEG_INF, jnp.float32),
          jnp.zeros((batch, k, max_length), jnp.int32))
  _, alive, alive_lp, _, _, finished_scores, finished = jax.lax.while_loop(cond, body, init)
  if return_all:
    return finished, finished_scores
  # An example with no finished hypothesis (none ended within max_length) returns its best live one.
  none_finished = finished_scores[:, 0] <= NEG_INF / 2
  tokens = jnp.where(none_finished[:, None], alive[:, 0], finished[:, 0])
  return tokens, jnp.where(none_finished, alive_lp[:, 0] / max_penalty, finished_scores[:, 0])


@gin.configurable
def decoder(method: str = "greedy", beam_size: int = 4, alpha: float = 0.6) -> Callable:
  """The decoding function inference evaluation uses: greedy (T5's default for GLUE/SuperGLUE/SQuAD)
  or beam search with `beam_size` and length-penalty exponent `alpha`.

  Returns fn(model, params, encoder_input_tokens, *, max_length, eos_id, vocab_size) -> (tokens, scores).
  """
  if method == "greedy":
    return greedy
  if method != "beam":
    raise errors.ConfigError(f"decoder.method must be 'greedy' or 'beam', got {method!r}.")
  if beam_size < 1:
    raise errors.ConfigError(f"decoder.beam_size must be at least 1, got {beam_size}.")
  return functools.partial(beam_search, beam_size=beam_size, alpha=alpha)

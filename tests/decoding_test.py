"""Decoding (scaling_arch/decoding.py): greedy and beam search over every architecture's cached decode.

- Every gin/models/*.gin at a tiny geometry: greedy decoding through the cache picks, at each position,
  the argmax of the teacher-forced log-probabilities of its own output (so the cache is consistent).
- Beam search on a small Markov "model" (known log-probabilities, a cache to reorder) finds the
  exhaustive optimum when the beam holds every prefix.
- Beam search on a real model: its score is the teacher-forced log-probability of what it returns.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling_arch import decoding, errors, models
from architectures_test import ARCHITECTURES, TINY, build, shift  # the model-building helpers

VOCAB, INPUT_LENGTH, MAX_LENGTH, EOS = 300, 16, 8, 1


def tiny_model(arch):
  """(model, params, jitted apply, inputs) at architectures_test's tiny geometry.

  The parameters are drawn with numpy from the shapes jax.eval_shape gives, roughly as T5 initializes
  them (embeddings N(0, 1), other matrices N(0, 1/fan_in), norm scales 1, other vectors N(0, 0.1)): no
  compiled initializer, and the cache must be consistent whatever the parameters are."""
  module = build(arch, bindings=TINY)
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(2, VOCAB, (2, INPUT_LENGTH)), jnp.int32)
  enc = enc.at[1, INPUT_LENGTH - 5:].set(0)  # the second example is padded
  tgt = jnp.ones((2, MAX_LENGTH), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), enc, shift(tgt), tgt)["params"])

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(x.shape, x.dtype)
    std = 1.0 if "embedding" in name else 0.1 if x.ndim <= 1 else x.shape[-2] ** -0.5
    return (std * rng.standard_normal(x.shape)).astype(x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  return models.EncoderDecoderModel(module), params, jax.jit(module.apply), enc


def teacher_forced_log_probs(apply, params, enc, tokens):
  """Log-probabilities of the full recompute on `tokens` as targets (one segment up to its EOS: a
  decoded 0 would be a token here, not padding)."""
  tokens = np.asarray(tokens)
  lengths = [real_length(row) for row in tokens]
  segments = np.asarray([[1] * n + [0] * (len(row) - n) for n, row in zip(lengths, tokens)], np.int32)
  logits = apply({"params": params}, enc, shift(jnp.asarray(tokens)), jnp.asarray(tokens),
                 (enc > 0).astype(jnp.int32), jnp.asarray(segments))
  return jax.nn.log_softmax(logits, -1)


def real_length(tokens):
  """Positions up to and including the first EOS (all positions if there is none)."""
  tokens = list(tokens)
  return tokens.index(EOS) + 1 if EOS in tokens else len(tokens)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_decoding_is_argmax_of_teacher_forcing(arch):
  model, params, apply, enc = tiny_model(arch)
  decode = jax.jit(lambda p, x: decoding.greedy(model, p, x, max_length=MAX_LENGTH, eos_id=EOS,
                                                vocab_size=VOCAB - 20))
  tokens, score = jax.device_get(decode(params, enc))
  assert tokens.shape == (2, MAX_LENGTH) and tokens.dtype == np.int32
  log_probs = np.asarray(teacher_forced_log_probs(apply, params, enc, tokens))
  for b in range(2):
    n = real_length(tokens[b])
    assert (tokens[b, n:] == 0).all()
    for t in range(n):
      chosen = log_probs[b, t, tokens[b, t]]
      assert 0 < tokens[b, t] < VOCAB - 20  # neither padding nor the padded vocabulary rows
      # The chosen token is the argmax of the full recompute (ties within tolerance allowed).
      assert chosen >= log_probs[b, t, 1:VOCAB - 20].max() - 1e-4, (arch, b, t)
    np.testing.assert_allclose(score[b], log_probs[b, np.arange(n), tokens[b, :n]].sum(), atol=1e-3)


class MarkovModel:
  """A stand-in model with known probabilities: log p(next | position, last token, running sum of the
  tokens mod V), a table given as the parameters. The running sum lives in the cache, so beam search
  must reorder the cache correctly."""

  def __init__(self, vocab: int):
    self.vocab = vocab

  @staticmethod
  def table(vocab: int, length: int, seed: int):
    return jax.nn.log_softmax(jax.random.normal(jax.random.key(seed), (length, vocab, vocab, vocab)) * 2.0, -1)

  def encode(self, params, tokens):
    del params
    return tokens.astype(jnp.float32)[..., None], (tokens > 0).astype(jnp.int32)

  def init_cache(self, params, encoded, segment_ids, batch, max_length):
    del params, encoded, segment_ids, max_length
    return {"index": jnp.zeros((), jnp.int32), "sum": jnp.zeros((batch,), jnp.int32)}

  def decode_step(self, params, cache, encoded, segment_ids, tokens):
    del encoded, segment_ids
    last = tokens[:, 0]
    total = (cache["sum"] + last) % self.vocab
    return params[cache["index"], last, total], {"index": cache["index"] + 1, "sum": total}

  def sequence_log_prob(self, table, tokens) -> float:
    last, total, lp = 0, 0, 0.0
    for i, t in enumerate(tokens):
      total = (total + last) % self.vocab
      lp += float(table[i, last, total, t])
      last = t
    return lp


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_finds_the_exhaustive_optimum(alpha):
  # Ids 2, 3, 4 and EOS (decoding never produces 0): at most 27 live prefixes, 108 candidates per step
  # and 40 finished sequences, so a beam of 54 (whose top 2 * 54 candidates are all of them) keeps
  # everything, and its finished hypotheses are the exhaustive ranking.
  vocab, length, k = 5, 4, 54
  model = MarkovModel(vocab)
  enc = jnp.ones((1, 3), jnp.int32)
  search = functools.partial(decoding.beam_search, model, max_length=length, alpha=alpha, eos_id=EOS)
  wide = jax.jit(lambda table, x: search(table, x, beam_size=k, return_all=True))
  best_of_wide = jax.jit(lambda table, x: search(table, x, beam_size=k))
  narrow = jax.jit(lambda table, x: search(table, x, beam_size=2))
  for seed in range(4):
    table = MarkovModel.table(vocab, length, seed)
    scored = []  # every sequence that ends with its first EOS
    for n in range(1, length + 1):
      for prefix in itertools.product(range(2, vocab), repeat=n - 1):
        seq = prefix + (EOS,)
        score = model.sequence_log_prob(table, seq) / float(decoding.length_penalty(n, alpha))
        scored.append((score, seq))
    scored.sort(reverse=True)
    assert len(scored) == 40
    tokens, scores = wide(table, enc)
    assert (np.asarray(scores[0, 40:]) <= decoding.NEG_INF / 2).all()
    for rank in range(40):
      score, seq = scored[rank]
      got = tuple(int(t) for t in tokens[0, rank])
      assert got == seq + (0,) * (length - len(seq)), (seed, rank, got, seq)
      np.testing.assert_allclose(float(scores[0, rank]), score, rtol=1e-5)
    best, best_score = best_of_wide(table, enc)
    assert tuple(int(t) for t in best[0]) == tuple(int(t) for t in tokens[0, 0])
    np.testing.assert_allclose(float(best_score[0]), scored[0][0], rtol=1e-5)
    # A narrow beam may miss the optimum, but never reports a better score than it.
    assert float(narrow(table, enc)[1][0]) <= scored[0][0] + 1e-5


class EosBonus:
  """A model with `bonus` nats added to EOS's log-probability (then renormalized), so that an untrained
  model's hypotheses do end."""

  def __init__(self, model, bonus: float):
    self.model, self.bonus = model, bonus

  def adjust(self, log_probs):
    return jax.nn.log_softmax(log_probs.at[..., EOS].add(self.bonus), axis=-1)

  def encode(self, *args):
    return self.model.encode(*args)

  def init_cache(self, *args):
    return self.model.init_cache(*args)

  def decode_step(self, *args):
    log_probs, cache = self.model.decode_step(*args)
    return self.adjust(log_probs), cache


def test_beam_search_on_a_real_model_scores_what_it_returns():
  """Every finished hypothesis's score is the teacher-forced log-probability of its tokens (over the
  length penalty): each hypothesis's cache followed it through the reordering."""
  model, params, apply, enc = tiny_model("vanilla")
  alpha, k = 0.6, 4
  boosted = EosBonus(model, bonus=2.0)
  tokens, scores = jax.device_get(jax.jit(lambda p, x: decoding.beam_search(
      boosted, p, x, max_length=MAX_LENGTH, beam_size=k, alpha=alpha, eos_id=EOS, vocab_size=VOCAB,
      return_all=True))(params, enc))
  checked = 0
  for rank in range(k):
    log_probs = np.asarray(boosted.adjust(teacher_forced_log_probs(apply, params, enc, tokens[:, rank])))
    for b in range(2):
      if scores[b, rank] <= decoding.NEG_INF / 2:
        continue
      n = real_length(tokens[b, rank])
      expected = log_probs[b, np.arange(n), tokens[b, rank, :n]].sum() / float(decoding.length_penalty(n, alpha))
      np.testing.assert_allclose(scores[b, rank], expected, atol=1e-3, err_msg=f"example {b}, rank {rank}")
      checked += 1
  assert checked >= 6, checked
  # With an EOS that is never produced (id 0), no hypothesis ends: the best live one after MAX_LENGTH
  # steps, whose lineage changed beams along the way, scores its full teacher-forced log-probability.
  tokens, scores = jax.device_get(jax.jit(lambda p, x: decoding.beam_search(
      model, p, x, max_length=MAX_LENGTH, beam_size=k, alpha=0.0, eos_id=0, vocab_size=VOCAB))(params, enc))
  assert (tokens > 0).all()
  log_probs = np.asarray(teacher_forced_log_probs(apply, params, enc, tokens))
  expected = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0].sum(-1)
  np.testing.assert_allclose(scores, expected, atol=1e-3)


def test_decoder_is_configurable():
  assert decoding.decoder() is decoding.greedy
  assert callable(decoding.decoder(method="beam", beam_size=2))
  with pytest.raises(errors.ConfigError, match="'greedy' or 'beam'"):
    decoding.decoder(method="sample")

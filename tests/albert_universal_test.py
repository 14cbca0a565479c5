"""Checks specific to the parameter-sharing architectures (ALBERT, Universal Transformer) and the Mixture
of Softmaxes head, beyond the shared contract in architectures_test.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling_arch import gin_utils, models
from scaling_arch.architectures.mixture_of_softmaxes import MixtureOfSoftmaxesHead, mix_log_probs

TINY = ["EMBED_DIM = 64", "MLP_DIM = 128", "NUM_HEADS = 4", "HEAD_DIM = 16"]
VOCAB = 300
INPUT_LENGTH, TARGET_LENGTH = 16, 8


def build(arch, bindings=(), vocab=VOCAB):
  gin_utils.parse([f"gin/models/{arch}.gin", "gin/sizes/tiny.gin", "gin/runs/pretrain_local.gin"],
                  ["MODEL_DIR = '/tmp/unused'", f"INPUT_LENGTH = {INPUT_LENGTH}",
                   f"TARGET_LENGTH = {TARGET_LENGTH}", *bindings])
  return gin_utils.configured_module(vocab_size=vocab)


def param_shapes(arch, bindings=()):
  module = build(arch, bindings)
  x = jnp.ones((1, INPUT_LENGTH), jnp.int32)
  y = jnp.ones((1, TARGET_LENGTH), jnp.int32)
  return jax.eval_shape(module.init, jax.random.key(0), x, y, y)["params"]


def depth(encoder, decoder):
  return [f"NUM_ENCODER_LAYERS = {encoder}", f"NUM_DECODER_LAYERS = {decoder}"]


def shift(targets):
  return jnp.concatenate([jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def example():
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(1, VOCAB, (2, INPUT_LENGTH)), jnp.int32)
  tgt = jnp.asarray(rng.randint(1, VOCAB, (2, TARGET_LENGTH)), jnp.int32)
  return enc, tgt


def test_albert_parameters_do_not_grow_with_depth():
  shallow = param_shapes("albert", TINY + depth(1, 1))
  deep = param_shapes("albert", TINY + depth(6, 5))
  assert models.count_params(shallow) == models.count_params(deep)
  shapes = lambda tree: jax.tree.map(lambda p: p.shape, nn.unbox(tree))
  assert shapes(shallow) == shapes(deep)  # and no `layers` axis: one set of layer weights


def test_albert_base_parameter_count():
  """Factorized embedding (V x 128 + 128 x d), one layer per stack, untied d x V output layer."""
  gin_bindings = ["EMBED_DIM = 768", "MLP_DIM = 3072", "NUM_HEADS = 12", "HEAD_DIM = 64"] + depth(12, 12)
  module = build("albert", gin_bindings, vocab=32128)
  x = jnp.ones((1, INPUT_LENGTH), jnp.int32)
  y = jnp.ones((1, TARGET_LENGTH), jnp.int32)
  count = models.count_params(jax.eval_shape(module.init, jax.random.key(0), x, y, y)["params"])
  d, f, v, h = 768, 3072, 32128, 12
  expected = (v * 128 + 128 * d + d * v               # embeddings and untied head
              + 4 * d * d + 2 * d * f + 2 * d           # encoder layer and its norms
              + 8 * d * d + 2 * d * f + 3 * d           # decoder layer and its norms
              + 2 * d + 2 * 32 * h)                     # final norms, relative position biases
  assert count == expected == 45_406_208


def test_universal_parameters_do_not_grow_with_steps_beyond_the_step_embedding():
  d = 64
  few = models.count_params(param_shapes("universal", TINY + depth(2, 2)))
  many = models.count_params(param_shapes("universal", TINY + depth(7, 5)))
  assert many - few == (5 + 3) * d  # only the [T, d] step embeddings grow
  # The mixing applications reuse the shared layer: no new parameters.
  mixing = [f"architectures.Universal{s}.num_mix_{w} = 2" for s in ("Encoder", "Decoder")
            for w in ("before", "after")]
  assert models.count_params(param_shapes("universal", TINY + depth(2, 2) + mixing)) == few
  # ACT adds one halting unit (d weights + 1 bias) per stack.
  act = ["architectures.UniversalEncoder.act = True", "architectures.UniversalDecoder.act = True"]
  assert models.count_params(param_shapes("universal", TINY + depth(2, 2) + act)) == few + 2 * (d + 1)


UT_OPTIONS = {
    "mixing": [f"architectures.Universal{s}.num_mix_{w} = 2" for s in ("Encoder", "Decoder")
               for w in ("before", "after")],
    "act": ["architectures.UniversalEncoder.act = True", "architectures.UniversalDecoder.act = True"],
}


@pytest.mark.parametrize("option", sorted(UT_OPTIONS))
def test_universal_options_are_causal_and_decode_incrementally(option):
  module = build("universal", TINY + depth(2, 2) + UT_OPTIONS[option])
  enc, tgt = example()
  variables = jax.jit(module.init)(jax.random.key(0), enc, shift(tgt), tgt)
  params = variables["params"]
  apply = jax.jit(module.apply)
  full = apply({"params": params}, enc, shift(tgt), tgt)
  t = 3
  changed = tgt.at[:, t:].set((tgt[:, t:] + 7) % (VOCAB - 1) + 1)
  out = apply({"params": params}, enc, shift(changed), changed)
  np.testing.assert_allclose(out[:, :t + 1], full[:, :t + 1], atol=1e-5)
  assert float(jnp.abs(out[:, t + 1:] - full[:, t + 1:]).max()) > 1e-4

  model = models.EncoderDecoderModel(module)
  log_probs_full = jax.nn.log_softmax(full, axis=-1)
  encoded, seg = jax.jit(model.encode)(params, enc)
  cache = model.init_cache(params, encoded, seg, batch_size=2, max_length=TARGET_LENGTH)
  step = jax.jit(model.decode_step)
  inputs = shift(tgt)
  for i in range(TARGET_LENGTH):
    log_probs, cache = step(params, cache, encoded, seg, inputs[:, i:i + 1])
    np.testing.assert_allclose(log_probs, log_probs_full[:, i], atol=1e-4, err_msg=f"position {i}")


def test_universal_act_logs_ponder_time():
  module = build("universal", TINY + depth(3, 3) + UT_OPTIONS["act"])
  enc, tgt = example()
  params = jax.jit(module.init)(jax.random.key(0), enc, shift(tgt), tgt)["params"]
  _, aux, metrics = models.EncoderDecoderModel(module).logits(params, {
      "encoder_input_tokens": enc, "decoder_input_tokens": shift(tgt), "decoder_target_tokens": tgt})
  ponder = {k: float(v) for k, v in metrics.items() if "ponder_time" in k}
  assert len(ponder) == 2, metrics
  assert all(1.0 <= v <= 3.0 for v in ponder.values()), ponder
  assert float(aux) == 0.0  # like MTF, no ponder-cost loss


@pytest.mark.parametrize("arch", ["albert", "universal"])
def test_unrolled_stack_equals_scanned_stack(arch):
  """SCAN_LAYERS = False unrolls the applications: same parameter tree, same outputs."""
  enc, tgt = example()
  scanned = build(arch, TINY + depth(3, 2))
  variables = jax.jit(scanned.init)(jax.random.key(0), enc, shift(tgt), tgt)
  a = jax.jit(scanned.apply)(variables, enc, shift(tgt), tgt)
  unrolled = build(arch, TINY + depth(3, 2) + ["SCAN_LAYERS = False"])
  b = jax.jit(unrolled.apply)(variables, enc, shift(tgt), tgt)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_albert_tied_head_through_the_factorization():
  module = build("albert", TINY + depth(2, 2) + ["layers.EncoderDecoder.head_factory = @layers.TiedHead"])
  enc, tgt = example()
  params = jax.jit(module.init)(jax.random.key(0), enc, shift(tgt), tgt)["params"]
  assert "head" not in params
  logits = jax.jit(module.apply)({"params": params}, enc, shift(tgt), tgt)
  assert logits.shape == (2, TARGET_LENGTH, VOCAB)
  assert np.isfinite(np.asarray(logits)).all()


def test_mos_returns_normalized_log_probabilities():
  module = build("mos", TINY + depth(2, 2))
  enc, tgt = example()
  params = jax.jit(module.init)(jax.random.key(0), enc, shift(tgt), tgt)["params"]
  assert params["head"]["context_weights"].value.shape == (15, 64, 64)
  out = jax.jit(module.apply)({"params": params}, enc, shift(tgt), tgt)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.logsumexp(out, axis=-1), 0.0, atol=1e-5)
  assert float(out.max()) <= 1e-6
  # Close to uniform at initialization (as the baseline), so the initial loss is ~log V.
  assert abs(float(-out.mean()) - np.log(VOCAB)) < 1.0
  assert MixtureOfSoftmaxesHead.returns_log_probs is True


@pytest.mark.parametrize("scale", [0.3, 5.0, 40.0])
def test_mos_mixture_equals_logsumexp_of_log_softmaxes(scale):
  """The probability-space mixture is the log-space definition, values and gradients, from near-uniform
  components to nearly one-hot ones (logit spreads of hundreds of nats)."""
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  prior_logits = 3.0 * jax.random.normal(k1, (2, 5, 7))
  logits = scale * jax.random.normal(k2, (2, 5, 7, 300))
  weights = jax.random.normal(k3, (2, 5, 300))

  def reference(p, l):
    return jax.nn.logsumexp(jax.nn.log_softmax(p)[..., None] + jax.nn.log_softmax(l), axis=-2)

  def fast(p, l):
    return mix_log_probs(jax.nn.log_softmax(p), l)

  a, b = reference(prior_logits, logits), fast(prior_logits, logits)
  # Compare where the reference is above the documented floor (87 nats under the leading component).
  kept = np.asarray(a) > np.asarray(a.max(axis=-1, keepdims=True)) - 80
  assert kept.mean() > 0.5
  np.testing.assert_allclose(np.asarray(b)[kept], np.asarray(a)[kept], rtol=1e-5, atol=1e-4)
  assert np.isfinite(np.asarray(b)).all()
  loss = lambda f: lambda p, l: -jnp.sum(jnp.where(kept, f(p, l), 0.0) * jax.nn.softmax(weights))
  for ga, gb in zip(jax.grad(loss(reference), argnums=(0, 1))(prior_logits, logits),
                    jax.grad(loss(fast), argnums=(0, 1))(prior_logits, logits)):
    np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-4, atol=1e-5)

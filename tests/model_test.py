"""The vanilla T5 baseline: parameter counts, causality, padding/packing invariance, cached decoding,
and sharded == unsharded training."""

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling_arch import gin_utils, models, optimizers, partitioning, registry, trainer  # noqa: F401

SIZES = {  # size: (layers, d_model, d_ff, heads, d_kv, table's parameter count or None)
    "tiny": (4, 256, 1024, 4, 64, 15.6e6), "mini": (4, 384, 1536, 8, 64, 31.2e6),
    "small": (6, 512, 2048, 8, 64, 60.5e6), "base": (12, 768, 3072, 12, 64, 222.9e6),
    "large": (24, 1024, 4096, 16, 64, 737.7e6), "xl": (24, 1024, 16384, 32, 128, 2.85e9),
    "xxl": (24, 1024, 65536, 128, 128, 11.3e9),
}
EXACT = {"small": 60_506_624, "base": 222_903_552, "large": 737_668_096, "xl": 2_851_598_336,
         "xxl": 11_307_321_344}


def analytic_params(layers, d, dff, heads, dkv, vocab=32128):
  """T5 v1.0, tied embeddings: the architectures spec's section 12 formula."""
  enc = layers * (4 * d * heads * dkv + 2 * d * dff + 2 * d)
  dec = layers * (8 * d * heads * dkv + 2 * d * dff + 3 * d)
  return vocab * d + enc + dec + 2 * d + 2 * 32 * heads


def build(size="tiny", vocab=32128, bindings=()):
  gin_utils.parse(["gin/models/vanilla.gin", f"gin/sizes/{size}.gin", "gin/runs/pretrain_local.gin"],
                  ["MODEL_DIR = '/tmp/unused'", *bindings])
  return gin_utils.configured_module(vocab_size=vocab)


@pytest.mark.parametrize("size", list(SIZES))
def test_vanilla_parameter_count_matches_the_formula_and_the_table(size):
  module = build(size)
  x = jnp.ones((1, 8), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x, x, x)
  count = models.count_params(shapes["params"])
  *geometry, table = SIZES[size]
  assert count == analytic_params(*geometry)
  assert abs(count - table) / table < 0.005
  if size in EXACT:
    assert count == EXACT[size]


@pytest.fixture(scope="module")
def tiny():
  module = build("tiny", vocab=300, bindings=["NUM_ENCODER_LAYERS = 2", "NUM_DECODER_LAYERS = 2",
                                              "EMBED_DIM = 64", "MLP_DIM = 128", "NUM_HEADS = 4",
                                              "HEAD_DIM = 16"])
  gin.clear_config()
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(1, 300, (2, 12)), jnp.int32)
  tgt = jnp.asarray(rng.randint(1, 300, (2, 10)), jnp.int32)
  variables = module.init(jax.random.key(0), enc, shift(tgt), tgt)
  return module, variables, enc, tgt


def shift(targets):
  return jnp.concatenate([jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def test_decoder_is_causal(tiny):
  module, variables, enc, tgt = tiny
  full = module.apply(variables, enc, shift(tgt), tgt)
  for t in (1, 4, 9):
    changed = tgt.at[:, t:].set((tgt[:, t:] + 7) % 299 + 1)
    out = module.apply(variables, enc, shift(changed), changed)
    # Output at position p reads inputs up to p, i.e. targets up to p - 1.
    np.testing.assert_allclose(out[:, :t + 1], full[:, :t + 1], atol=1e-5)
    assert float(jnp.abs(out[:, t + 1:] - full[:, t + 1:]).max()) > 1e-3 if t + 1 < tgt.shape[1] else True


def test_encoder_padding_does_not_change_real_positions(tiny):
  module, variables, enc, tgt = tiny
  padded = jnp.concatenate([enc, jnp.zeros((2, 6), jnp.int32)], axis=1)
  a = module.apply(variables, enc, shift(tgt), tgt)
  b = module.apply(variables, padded, shift(tgt), tgt)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_packed_examples_do_not_see_each_other(tiny):
  module, variables, enc, tgt = tiny
  # Row 0 packs example A (enc[0, :6] -> tgt[0, :5]) and example B (enc[1, :6] -> tgt[1, :5]).
  packed_enc = jnp.concatenate([enc[0, :6], enc[1, :6]])[None]
  packed_tgt = jnp.concatenate([tgt[0, :5], tgt[1, :5]])[None]
  packed_in = jnp.concatenate([shift(tgt[:1, :5]), shift(tgt[1:2, :5])], axis=1)
  seg_e = jnp.asarray([[1] * 6 + [2] * 6])
  seg_d = jnp.asarray([[1] * 5 + [2] * 5])
  packed = module.apply(variables, packed_enc, packed_in, packed_tgt, seg_e, seg_d)
  for i in range(2):
    alone = module.apply(variables, enc[i:i + 1, :6], shift(tgt[i:i + 1, :5]), tgt[i:i + 1, :5])
    np.testing.assert_allclose(packed[:, 5 * i:5 * i + 5], alone, atol=1e-4)


def test_incremental_decoding_equals_teacher_forcing(tiny):
  module, variables, enc, tgt = tiny
  model = models.EncoderDecoderModel(module)
  params = variables["params"]
  full = jax.nn.log_softmax(module.apply(variables, enc, shift(tgt), tgt), axis=-1)
  encoded, seg = model.encode(params, enc)
  cache = model.init_cache(params, encoded, seg, batch_size=2, max_length=tgt.shape[1])
  inputs = shift(tgt)
  for t in range(tgt.shape[1]):
    log_probs, cache = model.decode_step(params, cache, encoded, seg, inputs[:, t:t + 1])
    np.testing.assert_allclose(log_probs, full[:, t], atol=1e-4)


def test_one_train_step_sharded_4x4_equals_one_device():
  module = build("tiny", vocab=256, bindings=["NUM_ENCODER_LAYERS = 2", "NUM_DECODER_LAYERS = 2",
                                              "EMBED_DIM = 64", "MLP_DIM = 128", "NUM_HEADS = 4",
                                              "HEAD_DIM = 16"])
  shapes = {"encoder_input_tokens": (16, 24), "decoder_input_tokens": (16, 8), "decoder_target_tokens": (16, 8)}
  rng = np.random.RandomState(1)
  batch = {"encoder_input_tokens": rng.randint(1, 256, (16, 24)).astype(np.int32),
           "decoder_target_tokens": rng.randint(1, 256, (16, 8)).astype(np.int32)}
  batch["decoder_input_tokens"] = np.asarray(shift(jnp.asarray(batch["decoder_target_tokens"])))
  results = {}
  for name, shape, devices in [("4x4", (4, 4), None), ("1", (1, 1), jax.devices()[:1])]:
    part = partitioning.Partitioner(shape, ("data", "model"), devices=devices)
    lr = optimizers.rsqrt_schedule()
    tr = trainer.Trainer(models.EncoderDecoderModel(module), part, optimizer=optimizers.adafactor(lr),
                         learning_rate_fn=lr, batch_shapes=shapes)
    state, metrics = tr.train_step(tr.init_state(), part.put_batch(batch))
    results[name] = (float(metrics["loss"]), jax.device_get(state.params))
  assert abs(results["4x4"][0] - results["1"][0]) < 1e-5
  for a, b in zip(jax.tree.leaves(results["4x4"][1]), jax.tree.leaves(results["1"][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_every_parameter_maps_through_the_axis_rules():
  module = build("base")
  x = jnp.ones((1, 8), jnp.int32)
  boxed = jax.eval_shape(module.init, jax.random.key(0), x, x, x)["params"]
  assert partitioning.unknown_axis_names(boxed) == set()
  leaves = jax.tree.leaves(boxed, is_leaf=lambda l: hasattr(l, "names"))
  assert all(hasattr(l, "names") and len(l.names) == len(l.value.shape) for l in leaves)

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


def shift(targets):
  return jnp.concatenate([jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


# Causality, padding and packing invariance and cached decoding are tested for every architecture,
# the baseline included, in architectures_test.py.


def test_one_train_step_sharded_4x4_equals_one_device():
  """Same loss and updated parameters on a 4x4 mesh as on one device.

  Plain SGD here: Adafactor's first step is sign(gradient) for small parameters, so a gradient within
  float rounding of zero may legitimately flip between the two layouts.
  """
  import optax
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
    tr = trainer.Trainer(models.EncoderDecoderModel(module), part, optimizer=optax.sgd(1.0),
                         learning_rate_fn=lambda step: 1.0, batch_shapes=shapes)
    state, metrics = tr.train_step(tr.init_state(), part.put_batch(batch))
    results[name] = (float(metrics["loss"]), jax.device_get(state.params))
  assert abs(results["4x4"][0] - results["1"][0]) < 1e-5 * results["1"][0]
  for a, b in zip(jax.tree.leaves(results["4x4"][1]), jax.tree.leaves(results["1"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_every_parameter_maps_through_the_axis_rules():
  module = build("base")
  x = jnp.ones((1, 8), jnp.int32)
  boxed = jax.eval_shape(module.init, jax.random.key(0), x, x, x)["params"]
  assert partitioning.unknown_axis_names(boxed) == set()
  leaves = jax.tree.leaves(boxed, is_leaf=lambda l: hasattr(l, "names"))
  assert all(hasattr(l, "names") and len(l.names) == len(l.value.shape) for l in leaves)

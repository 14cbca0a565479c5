"""Every gin file parses and finalizes; every model gin at tiny size initializes and trains a step on a
4x4 mesh."""

import glob
import os

import gin
import jax
import numpy as np
import pytest

from scaling_arch import errors, gin_utils, models, optimizers, partitioning, registry, train, trainer  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gin_files(kind):
  return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gin", kind, "*.gin")))


TINY_RUN = ["MODEL_DIR = '/tmp/unused'", "BATCH_SIZE = 16"]


@pytest.mark.parametrize("path", gin_files("sizes") + gin_files("meshes") + gin_files("runs") +
                         gin_files("models") + gin_files("grids"))
def test_every_gin_file_parses_and_starts_with_a_header(path):
  with open(os.path.join(ROOT, path)) as f:
    first = f.readline()
  assert first.startswith("#"), f"{path} must start with a comment saying what it is"
  files = [path]
  if "/models/" in path:  # a model file needs the size and run macros
    files += ["gin/sizes/tiny.gin", "gin/runs/pretrain_local.gin"]
  gin_utils.parse(files, ["MODEL_DIR = '/tmp/unused'", "TFDS_DATA_DIR = '/tmp/unused'"])
  assert gin.config_is_locked()


@pytest.mark.parametrize("path", gin_files("sizes"))
def test_size_files_compose_with_the_baseline(path):
  gin_utils.parse(["gin/models/vanilla.gin", path, "gin/runs/pretrain_local.gin"], TINY_RUN)
  module = gin_utils.configured_module(vocab_size=32128)
  assert module.embed_dim == gin.query_parameter("%EMBED_DIM")


def training_run_files():
  return [p for p in gin_files("runs") if "train.task_name" in open(os.path.join(ROOT, p)).read()]


@pytest.mark.parametrize("path", training_run_files())
def test_run_files_bind_a_complete_train_call(path):
  gin_utils.parse(["gin/models/vanilla.gin", "gin/sizes/tiny.gin", path],
                  TINY_RUN + ["TFDS_DATA_DIR = '/tmp/unused'"])
  for name in ("train.task_name", "train.feature_lengths", "train.batch_size", "train.train_steps"):
    assert gin.query_parameter(name) is not None


def test_mesh_files_are_validated_against_the_devices():
  gin_utils.parse(["gin/meshes/cpu.gin"], [])
  assert partitioning.Partitioner().mesh.shape == {"data": 16, "model": 1}
  gin_utils.parse(["gin/meshes/tpu_v3_16.gin"], [])
  with pytest.raises(errors.MeshError, match="needs 32 devices but JAX sees 16"):
    partitioning.Partitioner()


def test_unknown_binding_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="No configurable matching|Unknown"):
    gin_utils.parse(["gin/models/vanilla.gin"], ["layers.NoSuchLayer.width = 3"])


@pytest.mark.parametrize("path", gin_files("models"))
def test_model_gin_initializes_and_trains_a_step_on_a_4x4_mesh(path):
  gin_utils.parse([path, "gin/sizes/tiny.gin", "gin/runs/pretrain_local.gin"],
                  TINY_RUN + ["MESH_SHAPE = (4, 4)", "NUM_ENCODER_LAYERS = 2", "NUM_DECODER_LAYERS = 2"])
  module = gin_utils.configured_module(vocab_size=512)
  part = partitioning.Partitioner()
  assert part.mesh.shape == {"data": 4, "model": 4}
  lr = optimizers.rsqrt_schedule()
  shapes = {"encoder_input_tokens": (16, 32), "decoder_input_tokens": (16, 8),
            "decoder_target_tokens": (16, 8)}
  tr = trainer.Trainer(models.EncoderDecoderModel(module), part, optimizer=optimizers.adafactor(lr),
                       learning_rate_fn=lr, batch_shapes=shapes)
  state = tr.init_state()
  rng = np.random.RandomState(0)
  batch = {k: rng.randint(1, 512, shapes[k]).astype(np.int32)
           for k in ("encoder_input_tokens", "decoder_target_tokens")}
  batch["decoder_input_tokens"] = np.concatenate(
      [np.zeros((16, 1), np.int32), batch["decoder_target_tokens"][:, :-1]], axis=1)
  params = jax.device_get(state.params)
  state, metrics = tr.train_step(state, part.put_batch(batch))
  loss = float(metrics["loss"])
  assert np.isfinite(loss) and abs(loss - np.log(512)) < 5.0, loss  # N(0,1) tied embeddings start high
  assert int(state.step) == 1
  # The same loss computed on one device, unsharded, with the step's RNG (dropout is 0, but training draws
  # other randomness: the Performer's random features, the Switch router's jitter).
  one_device = jax.device_put(params, jax.devices()[0])
  step_rng = jax.random.fold_in(tr.rng, 0)
  single, _ = jax.jit(lambda p, b: tr.model.loss_fn(p, b, step_rng, enable_dropout=True))(one_device, batch)
  assert abs(float(single) - loss) < 1e-4, (float(single), loss)

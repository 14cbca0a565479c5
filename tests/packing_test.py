"""A packed row trains the same model as its examples alone, for every architecture (gin/models/*.gin).

The rows are built by the project's own pipeline (`tasks.data.to_features`: the gin-configured input
alignment, then seqio's `EncDecFeatureConverter(pack=True)`) from many short examples, and each example's
logits in the packed row are compared with the same example alone in its row (float32, no dropout):
teacher-forced, and decoded incrementally with a cache against the packed encoder output.

Why these layouts are the hard ones (the older packing tests passed while three bugs were there):
  - Many examples per row (24 here): a mixer that handles a bounded number of examples per row (the
    Mixer's encoder mixed only the first 8) is only caught with more examples than its bound.
  - Examples of 1-3 tokens at unaligned offsets: two equal halves start at aligned positions, so pooling
    windows (Funnel) never straddle two examples and a 1-token example never vanishes; here they do
    unless the pipeline aligns them (the Funnel's gin file turns on `tasks.input_alignment`).
  - An example with no encoder tokens: its decoder queries see no key in cross-attention. A softmax over
    nothing but masked scores is uniform over the whole row, so it read the other examples' encoder
    states; the test changes every other example's tokens and requires its logits not to move. (seqio
    also numbers segments per feature, so empty inputs would shift the encoder's ids against the
    decoder's; the pipeline keeps them in step.)
  - One long example next to the short ones, so lengths and positions within examples differ widely.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from architectures_test import ARCHITECTURES, TINY, VOCAB, build
from scaling_arch import models
from tasks import data

INPUT_LENGTH, TARGET_LENGTH = 160, 64
# (inputs length, targets length) of the examples, in packing order: all of them fit one row (also with
# the Funnel's alignment to 4); example EMPTY has no inputs.
LAYOUT = [(3, 2), (1, 1), (2, 3), (0, 2), (5, 1), (1, 4), (37, 9), (2, 1), (3, 2), (1, 3), (7, 1),
          (2, 2), (1, 1), (3, 1), (2, 2), (1, 3), (9, 1), (1, 2), (2, 1), (3, 2), (1, 3), (2, 1),
          (1, 2), (6, 1)]
EMPTY = 3
TOLERANCE = 1e-5


def _examples(seed: int, keep=()):
  """Random tokens in the LAYOUT; examples in `keep` get the same tokens whatever the seed."""
  out = []
  for i, (n_in, n_tgt) in enumerate(LAYOUT):
    rng = np.random.RandomState(1000 + i if i in keep else seed * 100 + i)
    out.append({"inputs": rng.randint(2, VOCAB, n_in).astype(np.int32),
                "targets": rng.randint(2, VOCAB, n_tgt).astype(np.int32)})
  return out


def _features(examples, pack: bool):
  """The pipeline's rows for these examples, stacked: one row if packed, one per example if not."""
  spec = {k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")}
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)
  rows = list(data.to_features(ds, {"inputs": INPUT_LENGTH, "targets": TARGET_LENGTH},
                               pack=pack).as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@functools.lru_cache(maxsize=None)
def _run(arch):
  """Per architecture, once: the rows, the teacher-forced logits of [row, other, alone...] in one call, and
  the log-probabilities decoded with a cache from the packed encoder outputs of row and other.

  row packs the LAYOUT's examples; other packs the same layout with every example but EMPTY changed; alone
  holds each example in its own row. Decoding row i (and n + i) of the decoding batch reads example i's
  part of row's (other's) encoder output only and is fed example i's decoder inputs.
  """
  bindings = TINY + [f"INPUT_LENGTH = {INPUT_LENGTH}", f"TARGET_LENGTH = {TARGET_LENGTH}"]
  model = models.EncoderDecoderModel(build(arch, bindings=bindings))
  row = _features(_examples(1, keep=(EMPTY,)), pack=True)
  other = _features(_examples(2, keep=(EMPTY,)), pack=True)
  alone = _features(_examples(1, keep=(EMPTY,)), pack=False)
  assert row["decoder_segment_ids"].shape[0] == 1 and other["decoder_segment_ids"].shape[0] == 1
  assert row["decoder_segment_ids"].max() == len(LAYOUT) >= 20
  batch = {k: jnp.asarray(np.concatenate([row[k], other[k], alone[k]])) for k in row}
  n, steps = len(LAYOUT), max(t for _, t in LAYOUT)

  @jax.jit  # one compilation for initialization and the logits, one for the encoder and the cache
  def init_and_logits(key, batch):
    params = model.init(key, batch)["params"]
    return params, model.logits(params, batch)[0]

  @jax.jit
  def encode_packed(params, tokens, segment_ids):
    encoded, enc_seg = model.encode(params, tokens, segment_ids)
    encoded, enc_seg = jnp.repeat(encoded, n, axis=0), jnp.repeat(enc_seg, n, axis=0)
    seg = jnp.where(enc_seg == jnp.tile(jnp.arange(1, n + 1), 2)[:, None], 1, 0).astype(jnp.int32)
    return encoded, seg, model.init_cache(params, encoded, seg, 2 * n, steps)

  params, logits = init_and_logits(jax.random.key(0), batch)
  logits = np.asarray(logits)
  encoded, seg, cache = encode_packed(params, batch["encoder_input_tokens"][:2],
                                      batch["encoder_segment_ids"][:2])
  tokens = np.concatenate([alone["decoder_input_tokens"]] * 2)
  step = jax.jit(model.decode_step)
  decoded = []
  for t in range(steps):
    log_probs, cache = step(params, cache, encoded, seg, jnp.asarray(tokens[:, t:t + 1]))
    decoded.append(np.asarray(log_probs).reshape(2 * n, -1))
  return row, other, logits, np.stack(decoded, axis=1)


@pytest.fixture(params=ARCHITECTURES)
def packed(request):
  arch = request.param
  # Modules read their gin bindings when traced: parse the architecture's configuration for every test.
  build(arch, bindings=TINY + [f"INPUT_LENGTH = {INPUT_LENGTH}", f"TARGET_LENGTH = {TARGET_LENGTH}"])
  return (arch,) + _run(arch)


def _segment(values, segment_ids, i):
  return values[segment_ids == i + 1]


def test_teacher_forced_logits_packed_equal_alone(packed):
  arch, row, other, logits, _ = packed
  seg = row["decoder_segment_ids"][0]
  for i, (_, n_tgt) in enumerate(LAYOUT):
    np.testing.assert_allclose(_segment(logits[0], seg, i), logits[2 + i, :n_tgt], atol=TOLERANCE, rtol=0,
                               err_msg=f"{arch}: example {i}")
  # The example without inputs reads nothing of the rest of its row.
  changed = np.abs(logits[0] - logits[1]).max(axis=-1)
  assert changed[(seg > 0) & (seg != EMPTY + 1)].min() > 1e-3, arch  # every other example did change
  np.testing.assert_allclose(_segment(logits[1], other["decoder_segment_ids"][0], EMPTY),
                             _segment(logits[0], seg, EMPTY), atol=TOLERANCE, rtol=0, err_msg=arch)


def test_cached_decoding_from_the_packed_encoder_equals_alone(packed):
  arch, _, _, logits, decoded = packed
  n = len(LAYOUT)
  want = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[2:]), axis=-1))
  for i, (_, n_tgt) in enumerate(LAYOUT):
    np.testing.assert_allclose(decoded[i, :n_tgt], want[i, :n_tgt], atol=TOLERANCE, rtol=0,
                               err_msg=f"{arch}: example {i}")
  # The example without inputs, decoded next to other neighbours' encoder states.
  np.testing.assert_allclose(decoded[n + EMPTY], decoded[EMPTY], atol=TOLERANCE, rtol=0, err_msg=arch)


@pytest.mark.parametrize("multiple", [1, 4])
def test_pipeline_keeps_segments_in_step_and_aligns_inputs(multiple):
  """seqio numbers each feature's segments by the examples that have tokens in it; the pipeline keeps an
  example without inputs numbered (no encoder tokens, segment ids in step) and aligns every example's
  inputs to `tasks.input_alignment.multiple` (the Funnel's pooling factor), filling with padding."""
  import gin
  gin.bind_parameter("tasks.input_alignment.multiple", multiple)
  examples = _examples(1)
  row = _features(examples, pack=True)
  tokens, seg = row["encoder_input_tokens"][0], row["encoder_segment_ids"][0]
  assert row["decoder_segment_ids"].shape[0] == 1
  for i, example in enumerate(examples):
    np.testing.assert_array_equal(tokens[seg == i + 1], example["inputs"], err_msg=f"example {i}")
    np.testing.assert_array_equal(row["decoder_target_tokens"][0][row["decoder_segment_ids"][0] == i + 1],
                                  example["targets"], err_msg=f"example {i}")
    if len(example["inputs"]):
      assert np.flatnonzero(seg == i + 1)[0] % multiple == 0, (i, multiple)
  assert EMPTY + 1 not in seg
  assert (tokens[seg == 0] == 0).all()

r"""Parameter counts of every architecture at every size, from `jax.eval_shape` (nothing is allocated).

  python -m scaling_arch.param_counts                      # markdown rows: tiny, small, base
  python -m scaling_arch.param_counts --sizes=tiny,base,xl --architectures=vanilla,switch

The README's architecture table is this module's output (a test keeps them equal). Counts use the
32,128-row vocabulary and the study's lengths (inputs 512, targets 114), which only MLP-Mixer's
position-specific token mixing depends on.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
from absl import app, flags

from scaling_arch import gin_utils, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_VOCAB_SIZE = 32128
STUDY_LENGTHS = (512, 114)
DEFAULT_SIZES = ("tiny", "small", "base")


def architectures() -> list[str]:
  """Every architecture with a gin file in gin/models/, sorted by name."""
  return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "gin", "models", "*.gin")))


def count(architecture: str, size: str, *, vocab_size: int = STUDY_VOCAB_SIZE,
          input_length: int = STUDY_LENGTHS[0], target_length: int = STUDY_LENGTHS[1]) -> int:
  """Parameters of `architecture` at `size` (gin/models/<arch>.gin + gin/sizes/<size>.gin)."""
  gin.clear_config()
  try:
    gin_utils.parse([os.path.join(ROOT, "gin", "models", f"{architecture}.gin"),
                     os.path.join(ROOT, "gin", "sizes", f"{size}.gin"),
                     os.path.join(ROOT, "gin", "runs", "pretrain_local.gin")],
                    ["MODEL_DIR = '/unused'", f"INPUT_LENGTH = {input_length}",
                     f"TARGET_LENGTH = {target_length}"])
    module = gin_utils.configured_module(vocab_size=vocab_size)
    x = jnp.ones((1, input_length), jnp.int32)
    y = jnp.ones((1, target_length), jnp.int32)
    return models.count_params(jax.eval_shape(module.init, jax.random.key(0), x, y, y)["params"])
  finally:
    gin.clear_config()


def millions(n: int) -> str:
  return f"{n / 1e6:,.1f}M"


def table_rows(archs: Sequence[str], sizes: Sequence[str]) -> list[str]:
  """Markdown rows `| arch | count | count | ... |` in the order given."""
  return ["| " + " | ".join([f"`{a}`"] + [millions(count(a, s)) for s in sizes]) + " |" for a in archs]


FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", list(DEFAULT_SIZES), "Sizes (gin/sizes/<size>.gin).")
flags.DEFINE_list("architectures", None, "Architectures (gin/models/<name>.gin); all by default.")


def main(argv):
  del argv
  sizes = FLAGS.sizes
  print("| architecture | " + " | ".join(sizes) + " |")
  print("|" + "---|" * (len(sizes) + 1))
  for row in table_rows(FLAGS.architectures or architectures(), sizes):
    print(row, flush=True)


if __name__ == "__main__":
  from scaling_arch import train  # noqa: F401  (registers `train`, which the model files bind)
  app.run(main, argv=sys.argv)

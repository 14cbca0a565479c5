"""The GLU Transformer's feed-forward (architectures spec section 2, decision 2): `layers.MlpBlock` whose
scaled width is rounded to a multiple, so that the gated unit's 2/3-width hidden layer stays shardable.

A gated unit has three d x d_ff kernels instead of two, so its width is 2/3 of the size's ReLU width to
keep parameters and FLOPs equal. 2/3 of a power of two is not an integer (tiny: 1024 -> 682.7), and a
width such as 683 cannot be split over the `model` mesh axis (`mlp` -> `model`). This block rounds
`intermediate_dim * intermediate_dim_scale` to the nearest multiple of `width_multiple` (64: tiny 704,
small 1344, base 2048 exactly as T5.1.1, large 2752): the model stays within 1% of the baseline's
parameters at every size. Parameter names and logical axes are those of `layers.MlpBlock` (wi_0, wi_1, wo).
"""

import flax.linen as nn
import gin

from scaling_arch.layers import initializers
from scaling_arch.layers.dense import Dense
from scaling_arch.layers.mlp import ACTIVATIONS, MlpBlock


def rounded_width(intermediate_dim: int, scale: float, multiple: int) -> int:
  """intermediate_dim * scale rounded to the nearest positive multiple of `multiple`."""
  return max(multiple, multiple * int(round(intermediate_dim * scale / multiple)))


@gin.configurable(module="architectures")
class GluMlpBlock(MlpBlock):
  """`layers.MlpBlock` (gated when several activations are given) with a shardable rounded width."""
  width_multiple: int = 64

  @nn.compact
  def __call__(self, x, *, deterministic: bool, segment_ids=None):
    del segment_ids  # position-wise
    unknown = [a for a in self.activations if a not in ACTIVATIONS]
    if unknown:
      raise ValueError(f"Unknown activation(s) {unknown}; known: {sorted(ACTIVATIONS)}")
    init = initializers.fan_in_normal(self.kernel_init_scale)
    width = rounded_width(self.intermediate_dim, self.intermediate_dim_scale, self.width_multiple)
    h = None
    for i, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      y = ACTIVATIONS[act](Dense(width, ("embed", "mlp"), init, dtype=self.dtype, name=name)(x))
      h = y if h is None else h * y
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
    return Dense(x.shape[-1], ("mlp", "embed"), init, dtype=self.dtype, name="wo")(h)

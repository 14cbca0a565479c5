"""Position-wise feed-forward blocks: T5's ReLU MLP and the gated (GLU-family) variants."""

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from scaling_arch.layers import initializers
from scaling_arch.layers.dense import Dense

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # tanh form, as mtf.gelu
    "swish": jax.nn.swish,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


@gin.configurable(module="layers")
class MlpBlock(nn.Module):
  """y = Dropout(prod_i act_i(x W_i)) W_o. One activation: the T5 ReLU MLP (kernels wi, wo); several:
  a gated unit (kernels wi_0, wi_1, ..., wo), e.g. ('gelu', 'linear') for GeGLU."""
  intermediate_dim: int
  activations: Sequence[str] = ("relu",)
  # Multiplies intermediate_dim (rounded): e.g. 2/3 so a gated unit matches the ReLU MLP's parameters.
  intermediate_dim_scale: float = 1.0
  intermediate_dropout_rate: float = 0.0
  kernel_init_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool, segment_ids=None):
    del segment_ids  # position-wise: packing does not matter (a mixture of experts' router uses them)
    unknown = [a for a in self.activations if a not in ACTIVATIONS]
    if unknown:
      raise ValueError(f"Unknown activation(s) {unknown}; known: {sorted(ACTIVATIONS)}")
    init = initializers.fan_in_normal(self.kernel_init_scale)
    width = int(round(self.intermediate_dim * self.intermediate_dim_scale))
    h = None
    for i, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      y = ACTIVATIONS[act](Dense(width, ("embed", "mlp"), init, dtype=self.dtype,
                                 name=name)(x))
      h = y if h is None else h * y
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
    return Dense(x.shape[-1], ("mlp", "embed"), init, dtype=self.dtype, name="wo")(h)

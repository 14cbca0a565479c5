"""A dense projection whose kernel carries logical axis names."""

from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from scaling_arch.layers import initializers

Initializer = Callable[..., Any]


class Dense(nn.Module):
  """y = x W (+ b) on the last dimension; W of shape [in, features] with logical axes `kernel_axes`."""
  features: int
  kernel_axes: Sequence[str] = ("embed", "mlp")
  kernel_init: Initializer = initializers.fan_in_normal()
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
                        (x.shape[-1], self.features), jnp.float32)
    y = jnp.einsum("...d,df->...f", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.kernel_axes[-1],)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y

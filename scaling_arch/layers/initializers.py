"""Initializers of the T5 v1.0 recipe (Mesh TensorFlow), as functions of fan-in."""

import jax
import jax.numpy as jnp
from flax import linen as nn


def fan_in_normal(scale: float = 1.0, truncated: bool = True):
  """Normal with std sqrt(scale / fan_in), fan_in = first dimension (MTF VarianceScaling fan_in)."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal" if truncated else "normal",
                                          in_axis=-2, out_axis=-1)


def normal_std(std: float):
  return nn.initializers.normal(stddev=std)


def glorot_uniform_2d():
  return nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1)


def ones():
  return nn.initializers.ones


def zeros():
  return nn.initializers.zeros

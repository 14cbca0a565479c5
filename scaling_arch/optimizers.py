"""Adafactor with T5's settings and the learning-rate schedules the study uses (optax)."""

from typing import Callable, Optional

import gin
import jax.numpy as jnp
import optax


@gin.configurable
def rsqrt_schedule(base: float = 1.0, warmup_steps: int = 10_000) -> Callable:
  """T5's inverse square root: base / sqrt(max(step, warmup_steps)) (constant 0.01 for 10k steps)."""
  def schedule(step):
    return base / jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32), warmup_steps))
  return schedule


@gin.configurable
def constant_schedule(value: float = 1e-3) -> Callable:
  """The T5 fine-tuning default."""
  def schedule(step):
    del step
    return jnp.asarray(value, jnp.float32)
  return schedule


@gin.configurable
def adafactor(learning_rate: Optional[Callable] = None, decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0, multiply_by_parameter_scale: bool = True,
              min_dim_size_to_factor: int = 128, momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None) -> optax.GradientTransformation:
  """T5's Adafactor: factored second moments (dims >= 128), beta2_t = 1 - (t+1)^-0.8, update clipping
  1.0, updates scaled by the parameter's RMS, no momentum.

  Deliberate difference from T5X: parameters stacked on a `layers` axis (scanned layers) are factored
  over their two largest dimensions like any other, and their parameter scale is the RMS over all
  layers, not per layer. At initialization all layers share one distribution, so the scale is the same.
  """
  if learning_rate is None:
    learning_rate = rsqrt_schedule()
  return optax.adafactor(learning_rate=learning_rate, decay_rate=decay_rate,
                         clipping_threshold=clipping_threshold,
                         multiply_by_parameter_scale=multiply_by_parameter_scale,
                         min_dim_size_to_factor=min_dim_size_to_factor, momentum=momentum,
                         weight_decay_rate=weight_decay_rate)

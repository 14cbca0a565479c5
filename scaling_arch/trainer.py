"""TrainState, the jitted train and eval steps, and their shardings.

The state is born sharded: `jax.eval_shape` gives its shapes, the partitioner its shardings, and a jitted
initializer with `out_shardings` creates each shard on its device, so a large model never materializes
on one host. The train step is one `jax.jit` with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from scaling_arch import models as models_lib
from scaling_arch import partitioning
from scaling_arch.layers import transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _path_keys(path) -> tuple:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def optimizer_state_shardings(abstract_opt_state, param_specs, param_shapes, partitioner):
  """Shards each optimizer-state leaf like the parameter it belongs to.

  A leaf belongs to the parameter whose tree path is a suffix of the leaf's path. Leaves of the
  parameter's shape take its sharding; factored statistics (one dimension fewer) drop the reduced
  dimension's axis; anything else (counts, placeholders) is replicated.
  """
  flat_specs = {_path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}
  flat_shapes = {_path_keys(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(param_shapes)[0]}

  def leaf_sharding(path, leaf):
    keys = _path_keys(path)
    for n in range(len(keys)):
      suffix = keys[n:]
      if suffix in flat_specs:
        spec, shape = tuple(flat_specs[suffix]), flat_shapes[suffix]
        spec = spec + (None,) * (len(shape) - len(spec))
        if tuple(leaf.shape) == tuple(shape):
          return partitioner.logical_sharding(spec)
        if len(leaf.shape) == len(shape) - 1:
          for i in range(len(shape)):
            if tuple(shape[:i]) + tuple(shape[i + 1:]) == tuple(leaf.shape):
              return partitioner.logical_sharding(spec[:i] + spec[i + 1:])
        return partitioner.replicated
    return partitioner.replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


@gin.configurable
class Trainer:
  """Builds the sharded train state and the jitted steps for one model, optimizer and mesh.

  Attributes:
    num_microbatches: the global batch is split into this many pieces whose gradients are accumulated
      (a `lax.scan`), for batches that do not fit in memory at once.
    enable_dropout: dropout in training (its rate is set on the layers; 0 in pretraining).
  """

  def __init__(self, model: models_lib.EncoderDecoderModel, partitioner: partitioning.Partitioner, *,
               optimizer: optax.GradientTransformation, learning_rate_fn: Callable,
               batch_shapes: Mapping[str, tuple[int, ...]], num_microbatches: int = 1, seed: int = 0,
               enable_dropout: bool = True):
    self.model = model
    self.partitioner = partitioner
    self.optimizer = optimizer
    self.learning_rate_fn = learning_rate_fn
    self.batch_shapes = dict(batch_shapes)
    self.num_microbatches = num_microbatches
    self.enable_dropout = enable_dropout
    self.rng = jax.random.key(seed)
    global_batch = next(iter(self.batch_shapes.values()))[0]
    if global_batch % num_microbatches:
      raise ValueError(f"Batch size {global_batch} is not divisible by num_microbatches={num_microbatches}.")
    if global_batch % partitioner.data_parallel_size:
      from scaling_arch import errors
      raise errors.MeshError(
          f"Global batch size {global_batch} is not divisible by the {partitioner.data_parallel_size} "
          "data-parallel devices of the mesh; change BATCH_SIZE or MESH_SHAPE.")

    dummy = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in self.batch_shapes.items()}
    with self.mesh_context():
      boxed = jax.eval_shape(lambda r: model.init(r, {k: jnp.ones(v.shape, v.dtype) for k, v in dummy.items()}),
                             self.rng)
    self.boxed_params = boxed["params"]
    unknown = partitioning.unknown_axis_names(self.boxed_params)
    if unknown:
      raise ValueError(f"Parameters use logical axes {sorted(unknown)} that partitioning.py does not map.")
    self.param_specs = nn.get_partition_spec(self.boxed_params)
    self.param_shapes = nn.unbox(self.boxed_params)
    self.position_dims = partitioning.position_dims(self.param_specs)
    self.param_shardings = nn.logical_to_mesh_sharding(self.param_specs, partitioner.mesh, partitioner.rules)
    abstract_state = jax.eval_shape(self._init_state, self.rng)
    opt_shardings = optimizer_state_shardings(abstract_state.opt_state, self.param_specs, self.param_shapes,
                                              partitioner)
    self.state_shardings = TrainState(step=partitioner.replicated, params=self.param_shardings,
                                      opt_state=opt_shardings)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_shardings)
    self.batch_shardings = {k: partitioner.batch_sharding for k in self.batch_shapes}
    self._train_step = jax.jit(self._train_step_impl,
                               in_shardings=(self.state_shardings, self.batch_shardings),
                               out_shardings=(self.state_shardings, partitioner.replicated),
                               donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval_step_impl,
                              in_shardings=(self.param_shardings, self.batch_shardings),
                              out_shardings=partitioner.replicated)
    self._compiled_train_step = None

  # -- contexts and state ------------------------------------------------------------------------------
  def mesh_context(self):
    """Mesh and axis rules for tracing (activation sharding constraints resolve against them)."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.partitioner.mesh))
    stack.enter_context(self.partitioner.axis_rules())
    return stack

  def _init_state(self, rng):
    dummy = {k: jnp.ones(v, jnp.int32) for k, v in self.batch_shapes.items()}
    params = nn.unbox(self.model.init(rng, dummy)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

  def init_state(self) -> TrainState:
    """A fresh, sharded train state: each device computes only its own shards."""
    with self.mesh_context():
      return jax.jit(self._init_state, out_shardings=self.state_shardings)(self.rng)

  def state_from_params(self, params) -> TrainState:
    """A train state with the given parameters and a fresh optimizer state (for fine-tuning)."""
    def make(p):
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.optimizer.init(p))
    with self.mesh_context():
      return jax.jit(make, in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)(params)

  @property
  def num_params(self) -> int:
    return models_lib.count_params(self.param_shapes)

  # -- steps -------------------------------------------------------------------------------------------
  def _grads(self, params, batch, rng):
    weights = models_lib.EncoderDecoderModel._weights(batch)
    num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
    m = self.num_microbatches

    def micro_loss(p, micro, r):
      loss, stats = self.model.loss_fn(p, micro, r, enable_dropout=self.enable_dropout)
      # Re-normalize by the whole batch's token count so microbatching does not change the loss.
      scaled = (stats["cross_entropy_sum"] + stats["z_loss_sum"]) / num_tokens + stats["aux_loss"] / m
      return scaled, stats

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if m == 1:
      (loss, stats), grads = grad_fn(params, batch, rng)
      return loss, stats, grads
    micro = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)

    def body(carry, xs):
      i, mb = xs
      (loss, stats), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
      acc = jax.tree.map(jnp.add, carry, (loss, stats, grads))
      return acc, None

    zero_stats = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero_stats[0][0], zero_stats[0][1], zero_stats[1]))
    (loss, stats, grads), _ = jax.lax.scan(body, init, (jnp.arange(m), micro),
                                           unroll=transformer.scan_unroll())
    return loss, stats, grads

  def _train_step_impl(self, state: TrainState, batch):
    rng = jax.random.fold_in(self.rng, state.step)
    loss, stats, grads = self._grads(state.params, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    num_tokens = jnp.maximum(stats["num_tokens"], 1.0)
    metrics = {
        "loss": loss,
        "cross_entropy": stats["cross_entropy_sum"] / num_tokens,
        "z_loss": stats["z_loss_sum"] / num_tokens,
        "aux_loss": stats["aux_loss"] / self.num_microbatches,
        "accuracy": stats["accuracy_sum"] / num_tokens,
        "num_tokens": stats["num_tokens"],
        "learning_rate": self.learning_rate_fn(state.step),
        "grad_norm": optax.tree.norm(grads),
        # Layer metrics (summed over microbatches) as their mean.
        **{k: v / self.num_microbatches for k, v in stats.items() if k.startswith("metrics/")},
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval_step_impl(self, params, batch):
    return self.model.eval_stats(params, batch)

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One optimizer step; the state passed in is donated (do not use it afterwards)."""
    return self.compiled_train_step()(state, batch)

  def eval_step(self, params, batch) -> dict:
    with self.mesh_context():
      return self._eval_step(params, batch)

  def compiled_train_step(self):
    """The compiled train step (for XLA's cost analysis and memory stats)."""
    if self._compiled_train_step is None:
      batch = {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=self.batch_shardings[k])
               for k, v in self.batch_shapes.items()}
      with self.mesh_context():
        self._compiled_train_step = self._train_step.lower(self.abstract_state, batch).compile()
    return self._compiled_train_step

  def lowered_unrolled_train_step(self):
    """The train step lowered (not compiled) with layer and microbatch scans unrolled, for cost analysis."""
    batch = {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=self.batch_shardings[k])
             for k, v in self.batch_shapes.items()}
    with self.mesh_context(), transformer.unrolled_scans():
      # A fresh function, so no trace cached outside the context is reused.
      return jax.jit(lambda s, b: self._train_step_impl(s, b)).lower(self.abstract_state, batch)

  def flops_per_step(self) -> float:
    """FLOPs of one train step over all devices, from XLA's cost analysis of the step.

    The analysis runs on the step as lowered for the whole mesh (before partitioning, so it is the
    global count) with layer and microbatch scans unrolled, because XLA counts a loop body only once.
    """
    analysis = self.lowered_unrolled_train_step().cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))

"""The device mesh, THE logical-axis rules table, and shardings for the train state and batches.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and key activations
are constrained with `nn.with_logical_constraint`; this module is the one place that maps those names to
mesh axes. Architectures that need a new logical axis add it to `LOGICAL_AXIS_RULES` here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from scaling_arch import errors

# Mesh axes. `data` splits the batch, `model` splits heads / mlp / vocab, `expert` splits experts (and,
# when present, the batch as well, so expert parallelism does not idle devices).
MESH_AXES = ("data", "model", "expert")

# Logical axis -> mesh axis (None: replicated). The vocabulary every module uses.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "expert")),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("vocab", "model"),
    ("relpos_buckets", None),
    ("layers", None),
    ("expert", "expert"),
    ("expert_group", ("data", "expert")),
    ("expert_mlp", "model"),
    ("unmodeled", None),
    ("hidden_length", None),
)

# Parameters indexed by sequence position along these logical axes (the Mixer's token-mixing weights:
# "length", and the causal Mixer's position-indexed hidden: "hidden_length"). A checkpoint whose extent
# along them is longer initializes a model of shorter lengths with its prefix (checkpoints.restore_params),
# which is exactly the longer model on padded inputs (architectures/mixer.py).
POSITION_AXES = ("length", "hidden_length")


def position_dims(param_specs) -> dict[str, tuple[int, ...]]:
  """{parameter name (jax.tree_util.keystr of its path): its dimensions along POSITION_AXES}, for the
  parameters that have any, from the parameters' logical PartitionSpecs."""
  flat = jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  out = {}
  for path, spec in flat:
    dims = tuple(i for i, axis in enumerate(spec) if axis in POSITION_AXES)
    if dims:
      out[jax.tree_util.keystr(path)] = dims
  return out

# Alternative rule sets, each the table above with a few rows changed (so there is still one table),
# selected with `partitioning.Partitioner.rules` (e.g. gin/meshes/fully_sharded.gin). A set names the
# logical axes it changes and, for each, the mesh axes to try in order; those rows move to the end of the
# table, so every other row claims its mesh axes first (flax gives a dimension the first row whose mesh
# axes the array has not used yet, and leaves it whole when none is free).
# - 'default': parameters and optimizer state are replicated over `data` (split over `model` / `expert`).
# - 'fully_sharded': as T5X's and MaxText's fsdp rules, parameters (and so their gradients and optimizer
#   state) also split their `embed` dimension over the batch axes, `data` and `expert` (an expert
#   weight, whose `expert` dimension holds that mesh axis, falls back to `data`); XLA gathers each
#   layer's weights just before use. Activations keep their sharding: their `batch` (or `expert_group`)
#   row comes first and takes those mesh axes, so their embed dimension stays whole. Costs an all-gather
#   of the weights per step (and a reduce-scatter of the gradients instead of an all-reduce); saves HBM
#   at xl.
RULE_SETS: dict[str, dict[str, tuple[Any, ...]]] = {
    "default": {},
    "fully_sharded": {"embed": (("data", "expert"), "data")},
}


def logical_axis_rules(rule_set: str = "default") -> tuple[tuple[str, Any], ...]:
  """The table with the rows of the named rule set moved to its end, with their new mesh axes."""
  if rule_set not in RULE_SETS:
    raise errors.MeshError(f"partitioning.Partitioner.rules = {rule_set!r}; use one of "
                           f"{', '.join(map(repr, RULE_SETS))}.")
  changes = RULE_SETS[rule_set]
  kept = tuple((name, physical) for name, physical in LOGICAL_AXIS_RULES if name not in changes)
  return kept + tuple((name, physical) for name, choices in changes.items() for physical in choices)


# Logical axes that stack copies of a parameter (scanned layers, experts): Adafactor treats them as
# batch dimensions, never as one of the two factored dimensions.
STACKED_AXES = ("layers", "expert")


def known_logical_axes() -> frozenset[str]:
  return frozenset(name for name, _ in LOGICAL_AXIS_RULES)


def rules_for_mesh(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
  """The rules with mesh axes this mesh does not have (or has with size 1) dropped."""
  present = {name for name, size in mesh.shape.items()}
  out = []
  for logical, physical in rules:
    if physical is None:
      out.append((logical, None))
      continue
    axes = (physical,) if isinstance(physical, str) else tuple(physical)
    axes = tuple(a for a in axes if a in present)
    if not axes:
      out.append((logical, None))
    elif len(axes) == 1:
      out.append((logical, axes[0]))
    else:
      out.append((logical, axes))
  return tuple(out)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry so the product equals the device count; raises MeshError if it cannot."""
  shape = [int(s) for s in mesh_shape]
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
    raise errors.MeshError(
        f"Mesh shape {tuple(mesh_shape)} is invalid: use positive sizes and at most one -1 "
        "(meaning 'all remaining devices').")
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise errors.MeshError(
          f"Mesh shape {tuple(mesh_shape)} does not fit {num_devices} devices: {num_devices} is not "
          f"divisible by {known}. Pick sizes whose product divides the device count, or use a mesh "
          "file from gin/meshes/ that matches this machine.")
    shape[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise errors.MeshError(
        f"Mesh shape {tuple(mesh_shape)} needs {known} devices but JAX sees {num_devices} "
        f"({jax.devices()[0].platform}). Use a mesh file that matches this machine (gin/meshes/cpu.gin "
        "uses every device it finds), or set --gin.MESH_SHAPE with a product of "
        f"{num_devices}.")
  return tuple(shape)


@gin.configurable
class Partitioner:
  """Owns the mesh and maps logical axes to it.

  Attributes:
    mesh_shape: sizes of the mesh axes, in the order of `axis_names`; one entry may be -1.
    axis_names: names of the mesh axes, a subset of MESH_AXES.
    rules: the rule set of the logical-axis table ('default' or 'fully_sharded'; see RULE_SETS).
    devices: the devices of the mesh (default: jax.devices()); e.g. a TPU topology's compile-only
      devices for planning on a machine without TPUs (launch/plan.py).
  """

  def __init__(self, mesh_shape: Sequence[int] = (-1, 1), axis_names: Sequence[str] = ("data", "model"),
               devices: Sequence[Any] | None = None, rules: str = "default"):
    axis_names = tuple(axis_names)
    unknown = [a for a in axis_names if a not in MESH_AXES]
    if unknown or len(axis_names) != len(mesh_shape):
      raise errors.MeshError(
          f"Mesh axis names {axis_names} with shape {tuple(mesh_shape)}: names must be drawn from "
          f"{MESH_AXES} and there must be one size per name.")
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    if devices == jax.devices():
      self.mesh = jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape))
    else:
      # jax.make_mesh lays the axes out along the devices' physical topology (TPU slices too).
      self.mesh = jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)
    self.rule_set = rules
    self.rules = rules_for_mesh(self.mesh, logical_axis_rules(rules))

  # -- shardings ---------------------------------------------------------------------------------------
  def logical_sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)
    return NamedSharding(self.mesh, spec)

  def shardings_of(self, boxed_tree) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (replicated otherwise)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def batch_sharding(self) -> NamedSharding:
    """Sharding of a [batch, length] input array: batch split over the data-parallel axes."""
    return self.logical_sharding(("batch", None))

  @property
  def data_parallel_size(self) -> int:
    spec = self.batch_sharding.spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(self.mesh.shape[a] for a in axes)

  def axis_rules(self):
    """Context in which `nn.with_logical_constraint` resolves through this table."""
    return nn.logical_axis_rules(self.rules)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this process's rows of the global batch onto the mesh (multi-host safe)."""
    sharding = self.batch_sharding
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def unknown_axis_names(boxed_tree) -> set[str]:
  """Logical names used in a boxed parameter tree that the rules table does not know."""
  names: set[str] = set()

  def visit(x):
    if isinstance(x, nn.LogicallyPartitioned):
      names.update(n for n in x.names if n is not None)
    return x

  jax.tree.map(visit, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return names - known_logical_axes()

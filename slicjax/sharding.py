"""The device mesh and the logical-to-physical sharding rules: the one place that knows both.

Modules name their parameter and activation axes logically (``("embed", "mlp")``) with
``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``. This module owns the physical
mesh (axes ``data``, ``fsdp``, ``tensor``) and the rules table that maps logical names onto it.

Logical names (parameters):
  vocab, embed, mlp, heads, kv_heads, head_dim, layers, ssm_state, rel_buckets, classes
Logical names (activations):
  activation_batch, activation_length, activation_embed, activation_mlp, activation_heads,
  activation_kv, activation_vocab
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # parameters
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("layers", None),
  ("length", None),
  ("ssm_state", None),
  ("rel_buckets", None),
  ("classes", None),
  # activations
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_mlp", "tensor"),
  ("activation_heads", "tensor"),
  ("activation_kv", None),
  ("activation_vocab", "tensor"),
)


def make_mesh(
  shape: Sequence[int] | None = None,
  axis_names: Sequence[str] = MESH_AXES,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a mesh over all (global) devices.

  Args:
    shape: mesh shape, one entry per axis; ``-1`` in one position takes the remaining devices.
      ``None`` puts every device on ``data``.
    axis_names: mesh axis names.
    devices: defaults to ``jax.devices()`` (all processes' devices in a multi-process run).

  Raises:
    ValueError: if the shape does not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape is None:
    shape = [n] + [1] * (len(axis_names) - 1)
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(
      f"mesh shape {shape} has {len(shape)} entries but axis_names {tuple(axis_names)} has "
      f"{len(axis_names)}; give one size per axis."
    )
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1; give the other axes explicit sizes.")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if n % known:
      raise ValueError(f"mesh shape {shape} cannot be filled with {n} devices.")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(
      f"mesh shape {shape} needs {math.prod(shape)} devices but {n} are available; "
      f"set mesh_shape so its product is {n} (e.g. [{n}, 1, 1]), or use -1 for one axis."
    )
  try:
    from jax.experimental import mesh_utils

    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - CPU / odd topologies: plain row-major layout.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, tuple(axis_names))


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
  """Turns logical axis names into a ``PartitionSpec`` with the rules table."""
  if logical_axes is None:
    return PartitionSpec()
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def logical_sharding(mesh: Mesh, logical_axes, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def tree_shardings(mesh: Mesh, abstract_tree, rules=DEFAULT_RULES):
  """``NamedSharding`` for each leaf of a tree of (possibly ``nn.Partitioned``) abstract values.

  Leaves carrying logical names (``nn.LogicallyPartitioned``) are sharded by the rules; plain
  leaves are replicated. The result has the structure of ``nn.unbox(abstract_tree)``.
  """
  logical = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec if spec is not None else PartitionSpec()),
    mesh_specs,
    is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None,
  )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch-leading arrays: the first axis over ``data`` and ``fsdp``, the rest replicated."""
  batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
  """How many shards the batch axis is split into: global batch sizes must be a multiple."""
  return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
  """Activates the mesh and the logical rules, so ``nn.with_logical_constraint`` applies."""
  with mesh, nn.logical_axis_rules(rules):
    yield mesh


def shard_batch(batch, mesh: Mesh):
  """Places a host-local numpy batch (a pytree of batch-leading arrays) on the mesh.

  In a multi-process run each process passes its own slice of the global batch; the result is a
  global array made from the process-local pieces.
  """

  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)

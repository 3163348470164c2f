"""Mesh construction and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer state
sharded), `tensor` (Megatron-style tensor parallelism over heads / MLP / vocab).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    # decoder / resampler parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    # ViT parameters
    ("vit_embed", "fsdp"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    # small tables and the stacked layer axis: replicated
    ("queries", None),
    ("pos", None),
    ("patch_t", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("contrastive", None),  # the contrastive stage's shared embedding width
    ("layers", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types; one size may be -1 (= all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis size may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def parse_mesh(text: str, devices=None) -> Mesh:
  """'DATA,FSDP,TENSOR' (e.g. '1,1,8'; one size may be -1) -> make_mesh(...), with one-line errors."""
  try:
    sizes = [int(v) for v in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise ValueError(f"mesh {text!r}: expected three sizes DATA,FSDP,TENSOR such as 1,1,8")
  return make_mesh(*sizes, devices=devices)


def logical_to_sharding(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """Tree of boxed (logically partitioned) values or ShapeDtypeStructs -> tree of NamedSharding.

  A dimension the mesh axes do not divide is replicated instead (e.g. 2 key/value heads on tensor=8, or 12 query
  heads on tensor=8): the same rules then serve every model on every mesh, at the cost of duplicating that tensor.
  """
  logical_specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
  shapes = nn.meta.unbox(boxed_tree)
  return jax.tree.map(lambda sh, x: divisible(sh, x.shape), shardings, shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def divisible(sharding: NamedSharding, shape) -> NamedSharding:
  """`sharding` with every dimension that its mesh axes do not divide evenly replicated."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for d, axes in enumerate(spec):
    if axes is None:
      continue
    size = int(np.prod([sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
    if shape[d] % size:
      spec[d] = None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_sharded(x: np.ndarray, sharding) -> jax.Array:
  """A host array placed into the shards of this process's devices (no device holds more than its shard)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index], dtype=x.dtype)


def on_first_local_device(tree):
  """A SingleDeviceSharding on this process's first device for every leaf of `tree` (jax.devices()[0] is process
  0's in a multi-process run)."""
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda _: dev, tree)


def put_tree_sharded(tree, shardings):
  """Every leaf (host or this process's device arrays holding the whole value, as on every process) into its
  shards. Unlike `jax.device_put`, this works when a sharding spans other processes' devices too."""
  return jax.tree.map(lambda x, s: put_sharded(np.asarray(x), s), tree, shardings)

"""Inference memory plan: per-device bytes of parameters and KV cache for a model on a TPU slice, from shapes and
the sharding rules alone (`jax.eval_shape` + an abstract mesh: nothing is allocated, no device is needed).

    python -m qwenvl_jax.infer --plan --model qwen_vl_7b --devices v5e-1 --dtype int8 --batch 1 --context 2048

The mesh is (data 1, fsdp 1, tensor = the slice's devices) unless --mesh says otherwise; a dimension the tensor
axis does not divide (e.g. 4 key/value heads on tensor=8) is replicated, as the loader does. int8 counts every
linear kernel (`.../kernel`, the LM head included) as int8 plus one bfloat16 scale per output channel (weight-only
per-channel quantization, reduced over the kernel's first input axis); embeddings, norms and biases stay bfloat16,
and the KV cache is bfloat16.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax.traverse_util import flatten_dict
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from qwenvl_jax.models import registry
from qwenvl_jax.sharding import MESH_AXES, logical_to_sharding


@dataclasses.dataclass(frozen=True)
class Device:
  devices: int        # JAX devices of the slice (TensorCores on v2/v3; chips on v4/v5e/v5p/v6e)
  hbm: int            # bytes of HBM per JAX device
  source: str


GIB = 1 << 30
_DOCS = "cloud.google.com/tpu/docs/"
# HBM per device of each TPU generation (Google Cloud TPU system architecture pages).
DEVICES = {
    "v2-8": Device(8, 8 * GIB, _DOCS + "v2: 4 chips x 2 TensorCores, 8 GiB HBM per TensorCore"),
    "v3-8": Device(8, 16 * GIB, _DOCS + "v3: 4 chips x 2 TensorCores, 16 GiB HBM per TensorCore"),
    "v4-8": Device(4, 32 * GIB, _DOCS + "v4: 4 chips (megacore), 32 GiB HBM per chip"),
    "v5e-1": Device(1, 16 * GIB, _DOCS + "v5e: 16 GiB HBM per chip"),
    "v5e-4": Device(4, 16 * GIB, _DOCS + "v5e: 16 GiB HBM per chip"),
    "v5e-8": Device(8, 16 * GIB, _DOCS + "v5e: 16 GiB HBM per chip"),
    "v5p-8": Device(4, 95 * GIB, _DOCS + "v5p: 4 chips, 95 GiB HBM per chip"),
    "v6e-1": Device(1, 32 * GIB, _DOCS + "v6e: 32 GiB HBM per chip"),
    "v6e-8": Device(8, 32 * GIB, _DOCS + "v6e: 32 GiB HBM per chip"),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
RESERVE = 0.1   # HBM kept free for activations, the XLA workspace and fragmentation


def abstract_mesh(sizes) -> AbstractMesh:
  return AbstractMesh(tuple(int(s) for s in sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _shard_elems(shape, sharding: NamedSharding) -> int:
  return int(np.prod(sharding.shard_shape(tuple(shape)))) if shape else 1


def param_bytes(cfg, mesh, dtype: str) -> tuple[int, int]:
  """-> (bytes on the most loaded device, total bytes) of the parameters in `dtype` ('int8': see module doc)."""
  fam = registry.family_of(cfg)
  boxed = fam.abstract_params(cfg, boxed=True)
  shardings = flatten_dict(logical_to_sharding(boxed, mesh))
  shapes = {p: x.shape for p, x in flatten_dict(fam.abstract_params(cfg)).items()}
  per_device = total = 0
  for path, shape in shapes.items():
    sh = shardings[path]
    if dtype == "int8" and path[-1] == "kernel" and len(shape) >= 2:
      # int8 values + one bf16 scale per output channel: the kernel reduced over its (first) input axis, which
      # comes after the stacked layer axis of scanned layers
      axis = 1 if "layers" in path else 0
      local = sh.shard_shape(tuple(shape))
      per_device += _shard_elems(shape, sh) + 2 * _shard_elems(shape, sh) // local[axis]
      total += int(np.prod(shape)) + 2 * int(np.prod(shape)) // shape[axis]
    else:
      width = 2 if dtype == "int8" else DTYPE_BYTES[dtype]
      per_device += _shard_elems(shape, sh) * width
      total += int(np.prod(shape)) * width
  return per_device, total


def kv_cache_bytes(cfg, mesh, batch: int, context: int, dtype: str) -> tuple[int, int]:
  """-> (per-device, total) bytes of the KV cache: 2 x layers x batch x kv_heads x context x head_dim."""
  spec = cfg.decoder
  width = 2 if dtype == "int8" else DTYPE_BYTES[dtype]
  total = 2 * spec.num_layers * batch * spec.kv_heads * context * spec.head_dim * width
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  split = (rows if batch % rows == 0 else 1) * (mesh.shape["tensor"] if spec.kv_heads % mesh.shape["tensor"] == 0
                                                else 1)
  return total // split, total


def plan(model: str, devices: str, dtype: str = "bfloat16", batch: int = 1, context: int = 2048,
         mesh: tuple[int, int, int] | None = None) -> dict:
  """The memory plan of a named model on a named TPU slice (see the module doc)."""
  if devices not in DEVICES:
    raise ValueError(f"unknown devices {devices!r}; known: {sorted(DEVICES)}")
  if dtype not in DTYPE_BYTES:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
  if batch < 1 or context < 1:
    raise ValueError(f"batch and context must be positive; got batch={batch}, context={context}")
  dev = DEVICES[devices]
  sizes = mesh or (1, 1, dev.devices)
  if int(np.prod(sizes)) != dev.devices:
    raise ValueError(f"mesh {tuple(sizes)} needs {int(np.prod(sizes))} devices; {devices} has {dev.devices}")
  cfg = registry.get_config(model, param_dtype="float32", dtype="float32")
  m = abstract_mesh(sizes)
  p_dev, p_total = param_bytes(cfg, m, dtype)
  kv_dev, kv_total = kv_cache_bytes(cfg, m, batch, context, dtype)
  used = p_dev + kv_dev
  return {"model": model, "devices": devices, "dtype": dtype, "batch": batch, "context": context,
          "mesh": dict(zip(MESH_AXES, sizes)), "params_per_device": p_dev, "params_total": p_total,
          "kv_cache_per_device": kv_dev, "kv_cache_total": kv_total, "hbm_per_device": dev.hbm,
          "fits": used <= (1 - RESERVE) * dev.hbm, "hbm_source": dev.source}


def describe(r: dict) -> str:
  g, kv = GIB, (r["kv_cache_per_device"] / GIB, r["kv_cache_total"] / GIB)
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  verdict = "fits" if r["fits"] else "does NOT fit"
  return (f"{r['model']} on {r['devices']} ({mesh}), {r['dtype']}, batch {r['batch']}, context {r['context']}:\n"
          f"  parameters  {r['params_per_device'] / g:8.2f} GiB per device ({r['params_total'] / g:.2f} GiB in all)\n"
          f"  KV cache    {kv[0]:8.2f} GiB per device ({kv[1]:.2f} GiB in all)\n"
          f"  HBM         {r['hbm_per_device'] / g:8.2f} GiB per device ({r['hbm_source']})\n"
          f"  -> {verdict} (with {RESERVE:.0%} of HBM kept for activations and workspace)")


__all__ = ["DEVICES", "plan", "describe", "param_bytes", "kv_cache_bytes", "abstract_mesh"]

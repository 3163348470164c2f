"""Inference memory plan: per-device bytes of parameters and KV cache for a model on a TPU slice, from shapes and
the sharding rules alone (`jax.eval_shape` + an abstract mesh: nothing is allocated, no device is needed).

    python -m qwenvl_jax.infer --plan --model qwen_vl_7b --devices v5e-1 --dtype int8 --batch 1 --context 2048

The mesh is (data 1, fsdp 1, tensor = the slice's devices) unless --mesh says otherwise; a dimension the tensor
axis does not divide (e.g. 4 key/value heads on tensor=8) is replicated, as the loader does. int8 counts the very
tree `qv.load(path, quantize="int8")` places (`models/quantize.py`: every linear kernel, the LM head included, as
int8 plus one bfloat16 scale per output channel; embeddings, norms and biases bfloat16), with the same shardings;
the KV cache is bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from qwenvl_jax.models import quantize as quantization
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


def param_bytes(cfg, mesh, dtype: str, int8_base: str = "bfloat16") -> tuple[int, int]:
  """-> (bytes on the most loaded device, total bytes) of the parameters in `dtype`. 'int8' counts the tree that
  `qv.load(..., quantize='int8', dtype=int8_base)` builds (Qwix's int8 kernels + scales; the rest in int8_base)."""
  boxed = _abstract_params(cfg, dtype, int8_base)
  shardings = jax.tree.leaves(logical_to_sharding(boxed, mesh), is_leaf=lambda x: isinstance(x, NamedSharding))
  arrays = jax.tree.leaves(nn.meta.unbox(boxed))
  per_device = sum(_shard_elems(x.shape, sh) * x.dtype.itemsize for x, sh in zip(arrays, shardings))
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in arrays)
  return per_device, total


@functools.lru_cache(maxsize=32)
def _abstract_params(cfg, dtype: str, int8_base: str):
  """The boxed abstract parameter tree (shapes, dtypes, logical axes), traced once per config (a plan over several
  slices or dtypes reuses it)."""
  if dtype == "int8":
    cfg = cfg.replace(scan_layers=False, param_dtype=int8_base, dtype=int8_base)
    return quantization.abstract_quantized(cfg, quantization.quantized_module(cfg, "int8"), boxed=True)
  cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
  return registry.family_of(cfg).abstract_params(cfg, boxed=True)


def kv_cache_bytes(cfg, mesh, batch: int, context: int, dtype: str) -> tuple[int, int]:
  """-> (per-device, total) bytes of the KV cache: 2 x layers x batch x kv_heads x context x head_dim."""
  spec = cfg.decoder
  width = 2 if dtype == "int8" else DTYPE_BYTES[dtype]
  total = 2 * spec.num_layers * batch * spec.kv_heads * context * spec.head_dim * width
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  split = (rows if batch % rows == 0 else 1) * (mesh.shape["tensor"] if spec.kv_heads % mesh.shape["tensor"] == 0
                                                else 1)
  return total // split, total


def plan(model, devices: str, dtype: str = "bfloat16", batch: int = 1, context: int = 2048,
         mesh: tuple[int, int, int] | None = None) -> dict:
  """The memory plan of a model (a named config or a config object) on a named TPU slice (see the module doc)."""
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
  name = model if isinstance(model, str) else type(model).__name__
  return {"model": name, "devices": devices, "dtype": dtype, "batch": batch, "context": context,
          "mesh": dict(zip(MESH_AXES, sizes)), "params_per_device": p_dev, "params_total": p_total,
          "kv_cache_per_device": kv_dev, "kv_cache_total": kv_total, "hbm_per_device": dev.hbm,
          "fits": used <= (1 - RESERVE) * dev.hbm, "hbm_source": dev.source}


def choose(model, devices: str, batch: int = 1, context: int = 2048, mesh=None) -> dict:
  """The plan of the first of bfloat16, int8 that fits (the int8 plan, `fits` False, when neither does)."""
  for dtype in ("bfloat16", "int8"):
    r = plan(model, devices, dtype, batch, context, mesh)
    if r["fits"]:
      break
  return r


# jax device_kind prefix -> (DEVICES name prefix, JAX devices per counted unit: v2/v3 names count TensorCores, v4/v5p
# names count TensorCores too but JAX sees one megacore device per chip, v5e/v6e names count chips)
_KINDS = (("TPU v2", "v2", 1), ("TPU v3", "v3", 1), ("TPU v4", "v4", 2), ("TPU v5 lite", "v5e", 1),
          ("TPU v5e", "v5e", 1), ("TPU v5p", "v5p", 2), ("TPU v6 lite", "v6e", 1), ("TPU v6e", "v6e", 1))


def slice_name(devices) -> str | None:
  """The DEVICES name of the TPU slice `devices` form (e.g. 'v5e-1', 'v2-8'); None off TPU or for a slice the table
  does not list."""
  if not devices or devices[0].platform != "tpu":
    return None
  kind = devices[0].device_kind
  for prefix, name, per_device in _KINDS:
    if kind.startswith(prefix):
      candidate = f"{name}-{len(devices) * per_device}"
      return candidate if candidate in DEVICES else None
  return None


def device_memory(devices) -> int | None:
  """The smallest memory limit (bytes) of `devices` as the runtime reports it; None where it reports none (CPU)."""
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise their own errors
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def check_fits(cfg, mesh, quantize: str | None, what: str, limit: int | None = None) -> None:
  """Before loading: raise a one-line ValueError when the parameters alone exceed a device's memory on `mesh` (None:
  one device). `limit`: bytes per device (default: what the runtime reports; no check where it reports none)."""
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
  limit = device_memory(devices) if limit is None else limit
  if limit is None:
    return
  sizes = tuple(mesh.shape[a] for a in MESH_AXES) if mesh is not None else (1, 1, 1)
  base = jax.numpy.dtype(cfg.param_dtype).name
  dtype = "int8" if quantize else base
  need, _ = param_bytes(cfg, abstract_mesh(sizes), dtype, int8_base=base)
  if need > limit:
    raise ValueError(f"{what}: the {dtype} parameters need {need / GIB:.2f} GiB per device on mesh "
                     f"{'x'.join(map(str, sizes))} but a device has {limit / GIB:.2f} GiB; use more devices (mesh), "
                     f"quantize='int8', or see `python -m qwenvl_jax.infer --plan`")


def describe(r: dict) -> str:
  g, kv = GIB, (r["kv_cache_per_device"] / GIB, r["kv_cache_total"] / GIB)
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  verdict = "fits" if r["fits"] else "does NOT fit"
  return (f"{r['model']} on {r['devices']} ({mesh}), {r['dtype']}, batch {r['batch']}, context {r['context']}:\n"
          f"  parameters  {r['params_per_device'] / g:8.2f} GiB per device ({r['params_total'] / g:.2f} GiB in all)\n"
          f"  KV cache    {kv[0]:8.2f} GiB per device ({kv[1]:.2f} GiB in all)\n"
          f"  HBM         {r['hbm_per_device'] / g:8.2f} GiB per device ({r['hbm_source']})\n"
          f"  -> {verdict} (with {RESERVE:.0%} of HBM kept for activations and workspace)")


__all__ = ["DEVICES", "plan", "choose", "slice_name", "describe", "param_bytes", "kv_cache_bytes", "abstract_mesh",
           "check_fits", "device_memory"]

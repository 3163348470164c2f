"""Streaming import/export between parameter trees and Hugging Face checkpoint folders, for every family (each
family's `params.py` gives the name map; `models/rules.py` its vocabulary).

Import reads one HF tensor at a time, converts it and writes it into a preallocated buffer of the
target dtype (stacked layers are filled slice by slice), so peak memory is the converted model plus one
tensor. Export walks the same rules backwards and writes shard by shard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict as flatten
from flax.traverse_util import unflatten_dict as unflatten
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.convert.tensor_io import (
  WEIGHT_FILE,
  CheckpointError,
  checkpoint_keys,
  iter_checkpoint,
  write_sharded_safetensors,
)
from qwenvl_jax.models import registry
from qwenvl_jax.models.rules import Slot, param_location
from qwenvl_jax.sharding import put_sharded

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
  """np.empty whose data pointer is `alignment`-byte aligned, so that jax on CPU can alias it, not copy it."""
  dtype = np.dtype(dtype)
  n = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(n + alignment, np.uint8)
  start = -raw.ctypes.data % alignment
  return raw[start:start + n].view(dtype).reshape(shape)


def _short_list(names, n=8) -> str:
  names = sorted(names)
  more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def check_keys(folder: str, cfg) -> dict[str, Slot]:
  """Compare a checkpoint's tensor names with what `cfg` needs; raise naming missing/unexpected keys.
  Returns {name as stored in the folder: Slot}."""
  fam = registry.family_of(cfg)
  slots = fam.hf_slots(cfg)
  stored = {fam.hf_key_alias(k): k for k in checkpoint_keys(folder) if not fam.ignored_hf_keys.search(k)}
  keys = set(stored)
  missing, unexpected = set(slots) - keys, keys - set(slots)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
      parts.append(f"unexpected keys: {_short_list(unexpected)}")
    raise CheckpointError(f"{folder}: checkpoint does not match its config.json; " + "; ".join(parts))
  return {stored[k]: slot for k, slot in slots.items()}


def _converted(folder: str, cfg, shapes: dict):
  """Read an HF folder tensor by tensor; yield (tree path, index on the stacked layer axis or None, array in our
  layout) for every parameter piece, checking names, shapes and completeness on the way."""
  slots = check_keys(folder, cfg)
  filled: set = set()
  for name, arr in iter_checkpoint(folder):
    slot = slots.get(name)
    if slot is None:  # an ignored buffer
      continue
    try:
      outs = slot.rule.to_ours(arr)
    except ValueError:
      outs = None
    for k, path in enumerate(slot.rule.ours):
      tree_path, idx = param_location(path, slot.layer, cfg.scan_layers)
      if tree_path not in shapes:
        raise CheckpointError(f"{name}: no parameter {'/'.join(tree_path)} in the model built from the config")
      full = shapes[tree_path]
      want = full[1:] if idx is not None else full
      if outs is None or tuple(outs[k].shape) != want:
        raise CheckpointError(f"{name}: shape {tuple(arr.shape)} does not fit the config "
                              f"({'/'.join(tree_path)} expects {want})")
      filled.add((tree_path, idx))
      yield tree_path, idx, outs[k], arr.nbytes if k == len(slot.rule.ours) - 1 else 0
    del arr, outs
  expected = {param_location(p, s.layer, cfg.scan_layers) for s in slots.values() for p in s.rule.ours}
  if expected - filled:
    unfilled = _short_list(str(e) for e in expected - filled)
    raise CheckpointError(f"{folder}: some parameters were not filled: {unfilled}")
  missing = set(shapes) - {p for p, _ in filled}
  if missing:
    raise CheckpointError(f"{folder}: model parameters with no checkpoint tensor: "
                          f"{_short_list('/'.join(p) for p in missing)}")


def import_hf_params(folder: str, cfg, abstract: dict, dtype: str = "float32",
                     progress: Callable[[int], None] | None = None, shardings=None,
                     place: Callable[[tuple, np.ndarray], object] | None = None) -> dict:
  """Read an HF checkpoint folder into a nested dict of arrays shaped like `abstract`.

  abstract: tree of ShapeDtypeStruct (the family's `abstract_params(cfg)`); dtype: target dtype; progress(n_bytes)
  is called after each tensor. Without `shardings`: host numpy arrays (peak memory: the converted model plus one
  tensor). With `shardings` (a matching tree of NamedSharding): every tensor goes into its device shards as soon as
  it is read, so no host holds more than one tensor; stacked layers are placed slice by slice and stacked on the
  devices once complete. Each process places only its own devices' shards. With `place(tree path, host array) ->
  leaf` (unrolled layers only, e.g. quantize and place): each parameter's leaf is what `place` makes of it.
  """
  shapes = {p: tuple(x.shape) for p, x in flatten(abstract).items()}
  np_dtype = NP_DTYPES[dtype]
  pieces = _converted(folder, cfg, shapes)
  if shardings is None and place is None:
    buffers: dict[tuple, np.ndarray] = {}
    for tree_path, idx, x, nbytes in pieces:
      buf = buffers.get(tree_path)
      if buf is None:
        buf = buffers[tree_path] = aligned_empty(shapes[tree_path], np_dtype)
      buf[... if idx is None else idx] = x
      if progress is not None and nbytes:
        progress(nbytes)
    return unflatten(buffers)
  flat_sh = flatten(shardings) if shardings is not None else {}
  placed: dict[tuple, object] = {}
  layers: dict[tuple, dict[int, jax.Array]] = {}
  for tree_path, idx, x, nbytes in pieces:
    x = np.asarray(x).astype(np_dtype)
    if idx is None:
      placed[tree_path] = place(tree_path, x) if place is not None else put_sharded(x, flat_sh[tree_path])
    elif place is not None:
      raise ValueError("per-parameter placement needs unrolled layers (scan_layers=False)")
    else:  # one layer of a stacked parameter: its slice's sharding is the parameter's without the layer axis
      sharding = flat_sh[tree_path]
      part = layers.setdefault(tree_path, {})
      part[idx] = put_sharded(x, NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:])))
      if len(part) == shapes[tree_path][0]:
        placed[tree_path] = _stack(tuple(part[i] for i in range(len(part))), sharding)
        del layers[tree_path]
    if progress is not None and nbytes:
      progress(nbytes)
    del x
  return unflatten(placed)


def _stack(slices: tuple, sharding) -> jax.Array:
  return jax.jit(lambda xs: jnp.stack(xs), out_shardings=sharding)(slices)


def _host(a, idx):
  """A (possibly device-resident, stacked) parameter slice as a host numpy array."""
  if isinstance(a, jax.Array):
    return np.asarray(jax.device_get(a if idx is None else a[idx]))
  return np.asarray(a if idx is None else a[idx])


def hf_tensors(params: dict, cfg, dtype: str) -> tuple[Iterator[tuple[str, np.ndarray]], dict[str, int]]:
  """-> (lazy iterator of (HF name, array in `dtype`), HF name -> byte size)."""
  flat = flatten(params)
  fam = registry.family_of(cfg)
  cfg = fam.hf_export_config(cfg)
  slots = fam.hf_slots(cfg)
  np_dtype = np.dtype(NP_DTYPES[dtype])

  def sources(slot):
    return [param_location(p, slot.layer, cfg.scan_layers) for p in slot.rule.ours]

  sizes = {}
  for name, slot in slots.items():
    n = 0
    for tree_path, idx in sources(slot):
      shape = flat[tree_path].shape
      n += int(np.prod(shape[1:] if idx is not None else shape))
    sizes[name] = n * np_dtype.itemsize

  def gen():
    for name, slot in slots.items():
      ins = [_host(flat[p], idx) for p, idx in sources(slot)]
      yield name, np.asarray(slot.rule.to_hf(*ins)).astype(np_dtype)

  return gen(), sizes


def parse_size(size: int | str) -> int:
  """'5GB' | '500MB' | 1234 -> bytes (decimal units, as Hugging Face)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.I)
  if not m:
    raise ValueError(f"cannot parse shard size {size!r}; use e.g. '5GB' or '500MB'")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
  return int(float(m.group(1)) * mult)


def export_hf_folder(params: dict, cfg, out_dir: str, dtype: str = "bfloat16",
                     max_shard_size: int | str = "5GB", assets_dir: str | None = None,
                     progress: Callable[[int], None] | None = None) -> list[str]:
  """Write an HF folder in the family's official layout: safetensors shard(s) (+ index), config.json, and the
  non-weight files of `assets_dir` (tokenizer, processor and remote-code files) if given. Returns the weight file
  names."""
  if dtype not in NP_DTYPES:
    raise ValueError(f"unknown export dtype {dtype!r}; expected one of {sorted(NP_DTYPES)}")
  os.makedirs(out_dir, exist_ok=True)
  if assets_dir and os.path.isdir(assets_dir):
    for name in sorted(os.listdir(assets_dir)):
      src = os.path.join(assets_dir, name)
      if os.path.isfile(src) and not WEIGHT_FILE.match(name) and name != "config.json":
        shutil.copy2(src, os.path.join(out_dir, name))
  tensors, sizes = hf_tensors(params, cfg, dtype)

  def counted():
    for name, arr in tensors:
      yield name, arr
      if progress is not None:
        progress(arr.nbytes)

  files = write_sharded_safetensors(counted(), sizes, out_dir, parse_size(max_shard_size))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(registry.family_of(cfg).to_hf_dict(cfg, torch_dtype=dtype), f, indent=2)
  return files

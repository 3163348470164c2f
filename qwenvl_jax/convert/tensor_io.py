"""Streaming reads of HF checkpoints and sharded safetensors writes.

Reading is tensor by tensor with plain file reads (no mmap), so the bytes already converted are the only
thing that stays resident: a 20 GB checkpoint does not pull 20 GB of page-cache mappings into the
process RSS. Writing uses the `safetensors` library one shard at a time.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# Files of an HF folder that hold weights (not copied along as assets).
WEIGHT_FILE = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin)(\.index\.json)?$")


class CheckpointError(ValueError):
  """A checkpoint folder or file that cannot be read as asked (message names the file and the problem)."""


def read_safetensors_header(path: str) -> tuple[dict, int]:
  """-> ({name: {dtype, shape, data_offsets}}, byte offset where the data starts)."""
  try:
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise CheckpointError(f"{path}: truncated safetensors file (no header)")
      (n,) = struct.unpack("<Q", raw)
      if n > 100_000_000:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
      header = json.loads(f.read(n))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + n


def iter_safetensors(path: str, names: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (name, array) one at a time, in file order."""
  header, start = read_safetensors_header(path)
  size = os.path.getsize(path)
  items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
  with open(path, "rb") as f:
    for name, info in items:
      if names is not None and name not in names:
        continue
      if info["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
      dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
      begin, end = info["data_offsets"]
      expected = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
      if end - begin != expected or start + end > size:
        raise CheckpointError(f"{path}: tensor {name} is truncated or has inconsistent offsets")
      buf = np.empty(expected, np.uint8)
      f.seek(start + begin)
      if f.readinto(memoryview(buf)) != expected:
        raise CheckpointError(f"{path}: tensor {name} is truncated")
      yield name, buf.view(dtype).reshape(info["shape"])


def _load_torch_bin(path: str):
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: reading pytorch_model*.bin needs torch (pip install torch==2.13.0), "
                          "or convert the checkpoint to safetensors") from None
  try:
    return torch, torch.load(path, map_location="cpu", mmap=True, weights_only=True)
  except Exception as e:  # torch raises many types for a bad file
    raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _iter_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
  torch, state = _load_torch_bin(path)
  for name in list(state):
    t = state.pop(name)
    if t.dtype == torch.bfloat16:
      arr = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    else:
      arr = t.numpy().copy()
    del t
    yield name, arr


def checkpoint_files(folder: str) -> tuple[str, list[str], dict[str, str] | None]:
  """-> (format 'safetensors' | 'bin', weight files, weight_map from the index or None)."""
  if not os.path.isdir(folder):
    raise CheckpointError(f"checkpoint folder {folder} does not exist")
  for fmt, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                             ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
    index_path = os.path.join(folder, index)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
      files = sorted(set(weight_map.values()))
      missing = [p for p in files if not os.path.isfile(os.path.join(folder, p))]
      if missing:
        raise CheckpointError(f"{index_path} names missing shard files: {missing}")
      return fmt, [os.path.join(folder, p) for p in files], weight_map
    if os.path.isfile(os.path.join(folder, single)):
      return fmt, [os.path.join(folder, single)], None
  raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                        "or pytorch_model.bin.index.json")


def checkpoint_keys(folder: str) -> list[str]:
  """Tensor names of a checkpoint, read from headers / the index (no tensor data is read)."""
  fmt, files, weight_map = checkpoint_files(folder)
  if weight_map is not None:
    return list(weight_map)
  if fmt == "safetensors":
    return list(read_safetensors_header(files[0])[0])
  return list(_load_torch_bin(files[0])[1])


def iter_checkpoint(folder: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yield every (name, array) of an HF checkpoint folder, one tensor at a time."""
  fmt, files, _ = checkpoint_files(folder)
  for path in files:
    yield from (iter_safetensors(path) if fmt == "safetensors" else _iter_torch_bin(path))


def write_sharded_safetensors(tensors: Iterator[tuple[str, np.ndarray]], sizes: dict[str, int], out_dir: str,
                              max_shard_bytes: int) -> list[str]:
  """Write tensors (yielded in `sizes` order) to `model.safetensors` or `model-XXXXX-of-YYYYY.safetensors`
  shards plus `model.safetensors.index.json`. `sizes` (name -> bytes) fixes the shard plan up front, so at
  most one shard is held in memory. Returns the written file names."""
  from safetensors.numpy import save_file

  plan: list[list[str]] = [[]]
  used = 0
  for name, nbytes in sizes.items():
    if plan[-1] and used + nbytes > max_shard_bytes:
      plan.append([])
      used = 0
    plan[-1].append(name)
    used += nbytes
  n = len(plan)
  file_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  os.makedirs(out_dir, exist_ok=True)
  it = iter(tensors)
  weight_map = {}
  for shard_names, file_name in zip(plan, file_names):
    shard = {}
    for expected in shard_names:
      name, arr = next(it)
      assert name == expected, (name, expected)
      shard[name] = np.ascontiguousarray(arr)
      weight_map[name] = file_name
    save_file(shard, os.path.join(out_dir, file_name), metadata={"format": "pt"})
    del shard
  if n > 1:
    index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  return file_names

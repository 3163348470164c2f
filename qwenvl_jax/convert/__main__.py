"""Convert weights (any family) between a Hugging Face folder and this project's Orbax checkpoint.

    python -m qwenvl_jax.convert hf-to-orbax  HF_DIR  CKPT_DIR  [--dtype bfloat16]
    python -m qwenvl_jax.convert orbax-to-hf  CKPT_DIR  HF_DIR  [--dtype bfloat16] [--max-shard-size 5GB]

Conversion streams tensor by tensor (peak memory is about the converted model plus one tensor).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _total_bytes(folder: str) -> int:
  from qwenvl_jax.convert.tensor_io import checkpoint_files
  return sum(os.path.getsize(p) for p in checkpoint_files(folder)[1])


def hf_to_orbax(src: str, dst: str, dtype: str, overwrite: bool) -> None:
  from tqdm import tqdm

  from qwenvl_jax.convert import checkpoint, loader

  if os.path.exists(dst) and os.listdir(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite)")
  if not os.path.isfile(os.path.join(src, "config.json")) or checkpoint.is_checkpoint(src):
    raise FileNotFoundError(f"{src} is not a Hugging Face folder (config.json + model weights)")
  with tqdm(total=_total_bytes(src), unit="B", unit_scale=True, desc="read HF tensors") as bar:
    got = loader.load(src, dtype=dtype, progress=bar.update)
  print(f"writing Orbax checkpoint to {dst} ...", file=sys.stderr)
  checkpoint.save(dst, got.params, got.config, assets_from=src, overwrite=overwrite)


def orbax_to_hf(src: str, dst: str, dtype: str, max_shard_size: str) -> None:
  import jax
  import numpy as np
  from tqdm import tqdm

  from qwenvl_jax.convert import checkpoint
  from qwenvl_jax.convert.hf import NP_DTYPES, export_hf_folder
  from qwenvl_jax.models import registry

  if not checkpoint.is_checkpoint(src):
    raise FileNotFoundError(f"{src} is not a qwenvl_jax checkpoint ({checkpoint.CONFIG_FILE} + params/)")
  cfg = checkpoint.load_config(src)
  params = checkpoint.load(src, registry.family_of(cfg).abstract_params(cfg))
  total = sum(x.size for x in jax.tree.leaves(params)) * np.dtype(NP_DTYPES[dtype]).itemsize
  with tqdm(total=total, unit="B", unit_scale=True, desc="write HF shards") as bar:
    export_hf_folder(params, cfg, dst, dtype=dtype, max_shard_size=max_shard_size,
                     assets_dir=checkpoint.assets_dir(src), progress=bar.update)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m qwenvl_jax.convert", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-orbax", help="HF folder (Qwen-VL, Qwen2-VL) -> qwenvl_jax checkpoint")
  a.add_argument("src")
  a.add_argument("dst")
  a.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  a.add_argument("--overwrite", action="store_true")
  b = sub.add_parser("orbax-to-hf", help="qwenvl_jax checkpoint -> HF folder in the family's official layout")
  b.add_argument("src")
  b.add_argument("dst")
  b.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
  b.add_argument("--max-shard-size", default="5GB")
  args = parser.parse_args(argv)
  t0 = time.time()
  try:
    if args.command == "hf-to-orbax":
      hf_to_orbax(args.src, args.dst, args.dtype, args.overwrite)
    else:
      orbax_to_hf(args.src, args.dst, args.dtype, args.max_shard_size)
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError; FileNotFoundError an OSError
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"done in {time.time() - t0:.1f}s: {args.dst}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

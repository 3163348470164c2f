"""Peak memory of HF -> Orbax conversion on a synthetic multi-GB Qwen-VL-layout checkpoint.

    python bench/convert_rss.py [--hidden 2560 --layers 20 --vit-width 1280 --vit-layers 24 --shard 2GB]

Writes a random bf16 checkpoint in the official layout (sharded safetensors + index + config.json) to a
temporary folder, runs `python -m qwenvl_jax.convert hf-to-orbax` on it in a child process and reports the
child's peak RSS against the checkpoint size. The import streams one tensor at a time into preallocated
buffers, so the peak is about the converted model plus one tensor plus the runtime (jax, orbax).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenvl_jax.convert.hf import flatten, parse_size  # noqa: E402
from qwenvl_jax.convert.tensor_io import write_sharded_safetensors  # noqa: E402
from qwenvl_jax.models.qwen_vl.config import QWEN_VL_7B, to_hf_dict  # noqa: E402
from qwenvl_jax.models.qwen_vl.model import abstract_params  # noqa: E402
from qwenvl_jax.models.qwen_vl.params import hf_slots  # noqa: E402
from qwenvl_jax.models.rules import param_location  # noqa: E402


def synthetic_checkpoint(cfg, out_dir: str, shard: str) -> int:
  """Random bf16 tensors in the official layout, generated tensor by tensor. Returns total bytes."""
  shapes = {p: x.shape for p, x in flatten(abstract_params(cfg)).items()}
  slots = hf_slots(cfg)
  rng = np.random.default_rng(0)

  def src_shapes(slot):
    out = []
    for p in slot.rule.ours:
      tree_path, idx = param_location(p, slot.layer, cfg.scan_layers)
      out.append(shapes[tree_path][1:] if idx is not None else shapes[tree_path])
    return out

  sizes = {k: 2 * sum(int(np.prod(s)) for s in src_shapes(slot)) for k, slot in slots.items()}

  def tensors():
    for k, slot in slots.items():
      parts = [rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16) for s in src_shapes(slot)]
      yield k, np.asarray(slot.rule.to_hf(*parts))

  write_sharded_safetensors(tensors(), sizes, out_dir, parse_size(shard))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(to_hf_dict(cfg), f)
  return sum(sizes.values())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=2560)
  ap.add_argument("--layers", type=int, default=20)
  ap.add_argument("--vit-width", type=int, default=1280)
  ap.add_argument("--vit-layers", type=int, default=24)
  ap.add_argument("--shard", default="2GB")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--workdir", default=None)
  args = ap.parse_args()
  cfg = QWEN_VL_7B.replace(hidden_size=args.hidden, num_attention_heads=args.hidden // 128,
                           num_hidden_layers=args.layers, intermediate_size=int(args.hidden * 5.375) // 2 * 2,
                           visual=dict(width=args.vit_width, layers=args.vit_layers, heads=args.vit_width // 80,
                                       output_dim=args.hidden))
  work = tempfile.mkdtemp(dir=args.workdir)
  try:
    hf, ck = os.path.join(work, "hf"), os.path.join(work, "ck")
    t0 = time.time()
    total = synthetic_checkpoint(cfg, hf, args.shard)
    n_files = len([f for f in os.listdir(hf) if f.endswith(".safetensors")])
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB in {n_files} shards ({time.time() - t0:.0f}s)")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "qwenvl_jax.convert", "hf-to-orbax", hf, ck, "--dtype", args.dtype],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
      sys.exit(proc.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    out_bytes = total * (2 if args.dtype == "float32" else 1)
    print(f"hf-to-orbax ({args.dtype}): {time.time() - t0:.0f}s, peak RSS {peak / 1e9:.2f} GB = "
          f"{peak / total:.2f}x the checkpoint ({peak / out_bytes:.2f}x the converted params)")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()

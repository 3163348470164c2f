"""Packing efficiency and input-pipeline throughput on the synthetic stage-2 mix.

    python bench/packing.py [--records 2000 --seq-len 2048 --image-size 448 --bins 64 --max-images 8]

Efficiency = non-padding fraction of the packed rows, against padding-only batching (one sample per row).
Throughput = packed samples per second through the whole Grain pipeline (draw, decode, resize, tokenise, pack)
on this machine. Uses the real Qwen tokenizer (from the `dashscope` wheel) and its 256-slot image spans.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenvl_jax.data.pipeline import DataConfig, DataPipeline  # noqa: E402
from qwenvl_jax.data.shapes import ShapesSource  # noqa: E402
from qwenvl_jax.data.tokenizer import default_qwen_vocab, load_tokenizer  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--records", type=int, default=2000)
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--image-size", type=int, default=448)
  ap.add_argument("--bins", type=int, default=64, help="first_fit: open bins")
  ap.add_argument("--window", type=int, default=512, help="window: samples packed together")
  ap.add_argument("--max-images", type=int, default=8)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--packer", default="window", choices=["window", "first_fit"])
  args = ap.parse_args()
  logging.getLogger("qwenvl_jax.data").setLevel(logging.ERROR)
  tok = load_tokenizer(default_qwen_vocab())
  source = ShapesSource("train", args.records, seed=0, image_size=args.image_size)
  cfg = DataConfig(seq_len=args.seq_len, max_images=args.max_images, image_size=args.image_size, batch_size=1,
                   packing_bins=args.bins, packing_window=args.window, num_threads=args.threads,
                   packer=args.packer)
  pipe = DataPipeline(source, tok, cfg, seed=0, process_index=0, process_count=1)
  t0 = time.time()
  used = total = samples = 0
  for batch in pipe:
    seg = np.asarray(batch["segment_ids"])
    used += int((seg > 0).sum())
    total += seg.size
    samples += int(seg.max(axis=1).sum())
  dt = time.time() - t0
  padding_only = used / (samples * args.seq_len)
  print(f"{samples} samples -> {total // args.seq_len} rows of {args.seq_len} tokens "
        f"(image {args.image_size}px, {args.packer}, <= {args.max_images} images/row)")
  print(f"packing efficiency {used / total:.2%} vs padding-only {padding_only:.2%} "
        f"({used / total / padding_only:.1f}x fewer rows)")
  print(f"throughput {samples / dt:.1f} samples/s, {used / dt:.0f} tokens/s ({args.threads} threads, {dt:.1f}s)")


if __name__ == "__main__":
  main()

"""Packing efficiency and input-pipeline throughput on the synthetic stage-2 mix.

    python bench/packing.py [--records 2000 --seq-len 2048 --image-size 448 --bins 64 --max-images 8]
    python bench/packing.py --family qwen2_vl [--records 4000 --seq-len 1024 --batch 4 --sides 56,224
                                               --window 1024 --patch-budget 0 --model qwen2_vl_demo --mix '']

Qwen2-VL (any resolution): every image keeps its own size (a side drawn per record in --sides, then smart_resize),
so samples carry different numbers of patches; rows are packed on tokens and on ViT patches (`data/patch_packing.py`).
Text is tokenised by the shapes tokenizer.json (`shapes.train_tokenizer_json`, the ids of `--model`). Reported:
token fill (non-padding fraction of the rows) and patch fill (real patches / (rows x --patch-budget); 0 = the per-row
budget that matches the mix: its patches per token x seq_len, from the first 1000 samples), samples/s through the
whole pipeline (draw, resize, patchify, tokenise, positions, pack), and what the train step of `--model` consumes:
the real jitted step timed on the pipeline's first batches (after the pipeline run, so the two do not share the
cores), samples per batch / median step time, and the ratio of the two rates.

Efficiency = non-padding fraction of the packed rows, against padding-only batching (one sample per row).
Throughput = packed samples per second through the whole Grain pipeline (draw, decode, resize, tokenise, pack)
on this machine. Uses the real Qwen tokenizer (from the `dashscope` wheel) and its 256-slot image spans.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/train_throughput.py

from qwenvl_jax.data.pipeline import DataConfig, DataPipeline  # noqa: E402
from qwenvl_jax.data.shapes import ShapesSource  # noqa: E402
from qwenvl_jax.data.tokenizer import default_qwen_vocab, load_tokenizer  # noqa: E402


def qwen2_vl(args):
  from qwenvl_jax.data.patch_packing import budget_for
  from qwenvl_jax.data.pipeline import build_patch_dataset
  from qwenvl_jax.data.shapes import train_tokenizer_json
  from qwenvl_jax.models import registry
  from qwenvl_jax.models.qwen2_vl.processor import Qwen2VLProcessor
  from qwenvl_jax.models.qwen2_vl.samples import Qwen2VLSampleEncoder
  from qwenvl_jax.train.config import parse_mix

  cfg = registry.get_config(args.model)  # its vision ids are those of the shapes tokenizer.json
  tok = train_tokenizer_json(os.path.join(tempfile.mkdtemp(), "tokenizer.json"), vocab_size=cfg.vocab_size)
  lo, hi = (int(x) for x in args.sides.split(","))
  proc = Qwen2VLProcessor.for_config(cfg, min_pixels=lo * lo, max_pixels=hi * hi)
  source = ShapesSource("train", args.records, seed=0, image_size=(lo, hi), mix=parse_mix(args.mix))
  dc = DataConfig(seq_len=args.seq_len, batch_size=args.batch, packing_window=args.window, num_threads=args.threads)
  budget = args.patch_budget
  if not budget:
    probe = Qwen2VLSampleEncoder(tok, cfg, proc, dc, patch_budget=1 << 30)
    probed = [probe(source[i]) for i in range(min(1000, len(source)))]
    budget = budget_for(probed, args.seq_len, proc.merge_size)
  enc = Qwen2VLSampleEncoder(tok, cfg, proc, dc, patch_budget=budget)
  ds = build_patch_dataset(source, enc, dc, patch_budget=budget, patch_dim=proc.patch_dim, merge=proc.merge_size,
                           seed=0, process_index=0, process_count=1)
  t0 = time.time()
  tokens = patches = samples = batches = 0
  kept = []  # the first batches, for the train step
  for b in ds:
    tokens += int((b["segment_ids"] > 0).sum())
    patches += int((b["vision_segments"] > 0).sum())
    samples += int(b["segment_ids"].max(axis=1).sum())
    batches += 1
    if len(kept) < args.step_warmup + args.step_steps:
      kept.append(b)
  dt = time.time() - t0
  print(f"{samples} samples -> {batches} batches of {args.batch} x {args.seq_len} tokens and {budget} patches per row "
        f"(images {lo}-{hi} px sides, mix {args.mix or 'default'}, window {args.window}; {enc.summary()})")
  token_fill, patch_fill = tokens / (batches * args.batch * args.seq_len), patches / (batches * args.batch * budget)
  print(f"token fill {token_fill:.2%}, patch fill {patch_fill:.2%}")
  produced = samples / dt
  print(f"pipeline throughput {produced:.1f} samples/s, {batches / dt:.2f} batches/s ({args.threads} threads, "
        f"{dt:.1f}s)")
  if args.step_steps:
    step_s, per_batch = train_step_time(cfg, kept, args)
    consumed = per_batch / step_s
    print(f"train step of {args.model} on these batches: {step_s * 1e3:.0f} ms (median of {args.step_steps}), "
          f"{per_batch:.1f} samples per batch -> consumes {consumed:.1f} samples/s; pipeline / consumption "
          f"{produced / consumed:.1f}x")


def train_step_time(cfg, host_batches, args) -> tuple[float, float]:
  """Median seconds of the real jitted train step (as bench/train_throughput.py builds it) over the given batches,
  after `--step-warmup` steps, and their mean samples per batch."""
  import jax
  from flax import linen as nn
  from train_throughput import jax_setup

  from qwenvl_jax.models.qwen2_vl.config import STAGE_FREEZE
  from qwenvl_jax.sharding import LOGICAL_RULES
  setup = argparse.Namespace(data=1, fsdp=-1, tensor=1, grad_accum=1, loss_chunk=min(512, args.seq_len))
  mesh, state, step_fn, sharding = jax_setup(cfg, setup, STAGE_FREEZE["stage2"])
  times = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    for i, b in enumerate(host_batches):
      t = time.perf_counter()
      state, m = step_fn(state, jax.device_put(b, sharding))
      jax.block_until_ready((state, m))
      if i >= args.step_warmup:
        times.append(time.perf_counter() - t)
  timed = host_batches[args.step_warmup:]
  return float(np.median(times)), float(np.mean([b["segment_ids"].max(axis=1).sum() for b in timed]))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--family", default="qwen_vl", choices=["qwen_vl", "qwen2_vl"])
  ap.add_argument("--batch", type=int, default=4, help="qwen2_vl: rows per batch")
  ap.add_argument("--sides", default="56,224", help="qwen2_vl: image side range (px)")
  ap.add_argument("--patch-budget", type=int, default=0, help="qwen2_vl: ViT patches per row (0: matched to the mix)")
  ap.add_argument("--model", default="qwen2_vl_demo", help="qwen2_vl: the model whose train step consumes the data")
  ap.add_argument("--mix", default="", help="qwen2_vl: shapes task weights, e.g. 'caption=1,video_motion=0.1'")
  ap.add_argument("--step-warmup", type=int, default=2, help="qwen2_vl: untimed train steps (compilation)")
  ap.add_argument("--step-steps", type=int, default=5, help="qwen2_vl: timed train steps (0: pipeline only)")
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
  if args.family == "qwen2_vl":
    return qwen2_vl(args)
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

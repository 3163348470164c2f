"""Train-step throughput and MFU of a small config on this machine.

    python bench/train_throughput.py [--model qwen_vl_demo --seq-len 512 --batch 8 --image-size 112 --max-images 2
                                      --warmup 3 --steps 10 --dtype float32 --remat none --data 1 --fsdp -1 --tensor 1]

Runs the real jitted `train_step` (sharded state from `create_state`, in/out shardings and donation as in
`qwenvl_jax/train/loop.py`) on synthetic packed batches of the pipeline's shapes (rows of samples with one image
each, ~5% padding at the row ends), `--warmup` steps then `--steps` timed steps, each waited for.

Reported: tokens/s (non-padding tokens), step time (mean, median, min), achieved GFLOP/s = `flops_per_step` (3 x
forward matmul FLOPs, padding image slots included) / mean step time, and MFU = achieved / (matmul peak of device 0
x devices). The peak is `measure_matmul_peak` (an n x n float32 matmul, best of `--peak-trials`), so on a CPU it is
the practical roofline of this machine's BLAS, not a datasheet number. On a shared machine, compare the fastest
step's MFU too: other processes slow both the steps and the peak measurement.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.models.qwen_vl.config import STAGE_FREEZE, get_config, param_groups
from qwenvl_jax.models.qwen_vl.model import QwenVL, count_params
from qwenvl_jax.models.qwen_vl.processor import QwenVLProcessor
from qwenvl_jax.sharding import LOGICAL_RULES, make_mesh
from qwenvl_jax.train.loop import measure_matmul_peak
from qwenvl_jax.train.optimizer import make_optimizer
from qwenvl_jax.train.state import create_state, state_shardings
from qwenvl_jax.train.step import StepOptions, flops_per_step, train_step


def synthetic_batch(cfg, rng, batch: int, seq_len: int, max_images: int, num_tasks: int = 1) -> dict:
  """A packed batch: each row holds up to `max_images` samples (one image span each) filling ~95% of the row."""
  v = cfg.visual
  q, size = v.n_queries, v.image_size
  special = {v.image_start_id, v.image_end_id, v.image_pad_id}
  text = np.array([i for i in range(4, cfg.vocab_size) if i not in special], np.int32)
  b = {k: np.zeros((batch, seq_len), np.int32) for k in ("input_ids", "segment_ids", "positions", "loss_mask",
                                                          "task_ids")}
  b["pixel_values"] = rng.standard_normal((batch, max_images, 3, size, size)).astype(np.float32)
  b["image_mask"] = np.ones((batch, max_images), bool)
  fill = int(0.95 * seq_len)
  for r in range(batch):
    lengths = np.floor(rng.dirichlet(np.full(max_images, 4.0)) * fill).astype(int)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for k, (s, e) in enumerate(itertools.pairwise(bounds)):
      n = int(e - s)
      prefix = 1 if n >= q + 4 else None  # too short for an image span: a text-only sample
      b["image_mask"][r, k] = prefix is not None
      ids = rng.choice(text, n)
      if prefix is not None:
        ids[prefix], ids[prefix + 1 + q] = v.image_start_id, v.image_end_id
        ids[prefix + 1:prefix + 1 + q] = v.image_pad_id
      b["input_ids"][r, s:e] = ids
      b["segment_ids"][r, s:e] = k + 1
      b["positions"][r, s:e] = np.arange(n)
      b["loss_mask"][r, s + (q + 3 if prefix is not None else 0):e] = 1
      b["task_ids"][r, s:e] = 1 + k % num_tasks
  return b


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="qwen_vl_demo")
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--image-size", type=int, default=112)
  ap.add_argument("--max-images", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--dtype", default="float32", help="compute dtype (parameters stay float32)")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--grad-accum", type=int, default=1)
  ap.add_argument("--loss-chunk", type=int, default=512)
  ap.add_argument("--data", type=int, default=1)
  ap.add_argument("--fsdp", type=int, default=-1)
  ap.add_argument("--tensor", type=int, default=1)
  ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak measurement")
  ap.add_argument("--peak-trials", type=int, default=3, help="peak = best of this many measurements")
  args = ap.parse_args()

  cfg = get_config(args.model, dtype=args.dtype, remat_policy=args.remat)
  if args.image_size != cfg.visual.image_size:
    cfg = cfg.replace(visual={"image_size": args.image_size})
  mesh = make_mesh(args.data, args.fsdp, args.tensor)
  tx, sched = make_optimizer(lr=1e-4, min_lr=1e-5, warmup_steps=0, total_steps=10_000, groups=param_groups(cfg),
                             layer_decay=0.95, freeze=STAGE_FREEZE["stage2"])
  opts = StepOptions(grad_accum=args.grad_accum, loss_chunk=args.loss_chunk, num_tasks=1)
  _, shardings = state_shardings(cfg, tx, mesh)
  state = create_state(cfg, tx, mesh, seed=0)
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  model = QwenVL(cfg)
  step_fn = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, schedule=sched, opts=opts),
                    in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)

  rng = np.random.default_rng(0)
  host = [synthetic_batch(cfg, rng, args.batch, args.seq_len, args.max_images) for _ in range(4)]
  batches = [jax.device_put(b, batch_sharding) for b in host]
  tokens = [int((b["segment_ids"] > 0).sum()) for b in host]
  flops = flops_per_step(cfg, args.batch, args.seq_len, args.batch * args.max_images, QwenVLProcessor.for_config(cfg))

  peak = max(measure_matmul_peak(args.peak_n, jnp.float32) for _ in range(args.peak_trials))
  n_dev = jax.device_count()
  print(f"device: {jax.devices()[0].device_kind} x {n_dev} ({jax.default_backend()}), mesh {dict(mesh.shape)}")
  print(f"model {args.model}: {count_params(cfg) / 1e6:.1f}M parameters, dtype {args.dtype}, remat {args.remat}; "
        f"batch {args.batch} x seq {args.seq_len}, {args.max_images} x {args.image_size}px image slots per row, "
        f"{np.mean(tokens) / (args.batch * args.seq_len):.1%} non-padding tokens")
  print(f"matmul peak (float32 {args.peak_n}^3, device 0, best of {args.peak_trials}): {peak / 1e9:.1f} GFLOP/s")

  times, losses = [], []
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    t = time.perf_counter()
    state, m = step_fn(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    for i in range(1, args.warmup + args.steps):
      t = time.perf_counter()
      state, m = step_fn(state, batches[i % len(batches)])
      jax.block_until_ready((state, m))
      if i >= args.warmup:
        times.append(time.perf_counter() - t)
        losses.append(float(m["loss"]))
  step_s = statistics.mean(times)
  tok = statistics.mean(tokens[i % len(batches)] for i in range(args.warmup, args.warmup + args.steps))
  achieved = flops / step_s
  print(f"first step (compile + run): {compile_s:.1f} s; {args.steps} timed steps after {args.warmup} warm-up; "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  print(f"step time: mean {step_s * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms, "
        f"min {min(times) * 1e3:.1f} ms")
  print(f"tokens/s (non-padding): {tok / step_s:,.0f}")
  print(f"FLOPs per step: {flops / 1e9:.1f} GFLOP; achieved {achieved / 1e9:.1f} GFLOP/s")
  print(f"MFU: {achieved / (peak * n_dev):.1%} of {peak * n_dev / 1e9:.1f} GFLOP/s (fastest step: "
        f"{flops / min(times) / (peak * n_dev):.1%})")


if __name__ == "__main__":
  main()

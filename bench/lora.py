"""LoRA train steps: against full fine-tuning (step time, memory) and against peft + torch, side by side in one run.

    OMP_NUM_THREADS=2 python bench/lora.py [--rank 16 --seq-len 512 --batch 4 --samples-per-row 4 --grids 8x12,16x16
                                            --torch-threads 2 --warmup 2 --steps 6]

Model: `qwen2_vl_bench` (bench/train_throughput.py: qwen2_vl_tiny widened to a small but not trivial model; a
transformers-native family, so peft applies to it), unrolled layers, float32, on synthetic packed batches of the
pipeline's format (the same batches as train_throughput.py's Qwen2-VL benchmark).

Three steps, each jitted / built as train.py builds it and timed alternately:
- JAX full fine-tuning: every parameter trained (AdamW, clipping), the state as `create_state` makes it;
- JAX LoRA: adapters of `--rank` (alpha 2 x rank) on the decoder's q/k/v/o and gate/up/down (the family's default
  targets), the base frozen and passed to the step (`train/lora.py`), AdamW on the adapters;
- torch LoRA: transformers' Qwen2VLForConditionalGeneration with the same weights (eager attention, float32) and
  peft's LoraConfig on the same modules, rank and alpha, AdamW over the adapters; every sample of a packed batch as
  its own unpadded row (as bench/train_throughput.py --vs-transformers; JAX computes its row and patch padding too).

Memory: XLA's compiled memory analysis of each JAX step (arguments + temporaries + outputs not aliased to a donated
argument: what the step needs at its peak); torch: the parameters, adapter gradients and AdamW state by count (its
activations are not measured). Reported: step times (median), the ratios LoRA / full and torch / JAX.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from train_throughput import (  # noqa: E402
  BENCH_QWEN2_VL,
  hf_inputs,
  model_config,
  parse_grids,
  patch_budget_of,
  qwen2_vl_rows,
)

from qwenvl_jax.data.patch_packing import assemble_batch  # noqa: E402
from qwenvl_jax.models import lora, registry  # noqa: E402
from qwenvl_jax.sharding import LOGICAL_RULES, make_mesh  # noqa: E402
from qwenvl_jax.train.lora import LoraPlan, nbytes  # noqa: E402
from qwenvl_jax.train.optimizer import make_optimizer  # noqa: E402
from qwenvl_jax.train.state import create_state, state_shardings  # noqa: E402
from qwenvl_jax.train.step import StepOptions, train_step  # noqa: E402


def jax_step(cfg, mesh, plan=None):
  """-> (state, frozen, jitted step, its memory in bytes) for full fine-tuning (plan None) or LoRA."""
  fam = registry.family_of(cfg)
  tx, sched = make_optimizer(lr=1e-4, min_lr=1e-5, warmup_steps=0, total_steps=10_000, groups=fam.param_groups(cfg))
  opts = StepOptions(num_tasks=1)
  _, shardings = state_shardings(cfg, tx, mesh, plan=plan)
  base = jax.jit(lambda key: fam.init_params(cfg, key))(jax.random.key(0))
  if plan is None:
    state, frozen, frozen_sh, model = create_state(cfg, tx, mesh, 0, params=base), {}, {}, fam.module(cfg)
  else:
    state = create_state(cfg, tx, mesh, 0, params=plan.initial_trained(base, jax.random.key(1)), plan=plan)
    frozen, frozen_sh, model = plan.frozen(base), plan.frozen_abstract()[1], plan.train_module
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  step = jax.jit(lambda s, b, f: train_step(s, b, f, model=model, tx=tx, schedule=sched, opts=opts),
                 in_shardings=(shardings, batch_sharding, frozen_sh), out_shardings=(shardings, None),
                 donate_argnums=0)
  return state, frozen, step, base


def memory_bytes(step, state, batch, frozen) -> int:
  m = step.lower(state, batch, frozen).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def torch_lora(cfg, params, rank: int, threads: int):
  """transformers' Qwen2-VL with `params`, peft LoRA on the same modules -> (model, step of the HF inputs)."""
  os.environ["OMP_NUM_THREADS"] = str(threads)
  import tempfile

  import torch
  import transformers
  from peft import LoraConfig, get_peft_model

  from qwenvl_jax.convert.hf import export_hf_folder
  torch.set_num_threads(threads)
  hf_cfg = transformers.Qwen2VLConfig(**registry.family_of(cfg).to_hf_dict(cfg, "float32"))
  with tempfile.TemporaryDirectory() as folder:
    export_hf_folder(params, cfg, folder, dtype="float32")
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        folder, config=hf_cfg, dtype=torch.float32, attn_implementation="eager")
  targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))
  model.train()
  trained = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)

  def step(inputs: dict) -> float:
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  n_all = sum(p.numel() for p in model.parameters())
  n_trained = sum(p.numel() for p in trained)
  return step, (n_all + 3 * n_trained) * 4, n_trained  # weights + (grads + 2 AdamW moments) of the adapters


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--samples-per-row", type=int, default=4)
  ap.add_argument("--grids", default="8x12,16x16")
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--steps", type=int, default=6)
  args = ap.parse_args()

  cfg = model_config(BENCH_QWEN2_VL, "float32", "none").replace(scan_layers=False)
  mesh = make_mesh(1, -1, 1)
  spec = lora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank)
  rng = np.random.default_rng(0)
  grids = parse_grids(args.grids)
  rows = [qwen2_vl_rows(cfg, rng, args.batch, args.seq_len, args.samples_per_row, grids) for _ in range(3)]
  budget = patch_budget_of(rows, cfg.vision.spatial_merge_size)
  host = [assemble_batch(r, args.seq_len, budget, cfg.vision.patch_dim, cfg.vision.spatial_merge_size) for r in rows]
  batches = [jax.device_put(b, NamedSharding(mesh, PartitionSpec(("data", "fsdp")))) for b in host]
  hf = [hf_inputs(cfg, r) for r in rows]

  full_state, _, full_step, base = jax_step(cfg, mesh)
  plan = LoraPlan(cfg, spec, mesh)
  lora_state, frozen, lora_step, _ = jax_step(cfg, mesh, plan)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    mem_full = memory_bytes(full_step, full_state, batches[0], {})
    mem_lora = memory_bytes(lora_step, lora_state, batches[0], frozen)
  torch_step, torch_bytes, n_torch = torch_lora(cfg, base, args.rank, args.torch_threads)
  n_all = sum(int(x.size) for x in jax.tree.leaves(base))
  n_lora = sum(int(x.size) for x in jax.tree.leaves(lora_state.params))
  assert n_lora == n_torch, f"adapters: JAX {n_lora} vs peft {n_torch} parameters"
  print(f"model {BENCH_QWEN2_VL}: {n_all / 1e6:.1f}M parameters; LoRA rank {args.rank}: {n_lora / 1e6:.2f}M trained "
        f"({n_lora / n_all:.2%}); batch {args.batch} x {args.seq_len} tokens, {args.samples_per_row} samples per row; "
        f"torch {args.torch_threads} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

  times = {"full": [], "lora": [], "torch": []}
  losses = {"full": [], "lora": [], "torch": []}
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    for i in range(args.warmup + args.steps):
      k = i % len(batches)
      for name in ("lora", "torch", "full"):  # alternating: the machine's load hits all three alike
        t = time.perf_counter()
        if name == "full":
          full_state, m = full_step(full_state, batches[k], {})
          jax.block_until_ready((full_state, m))
          loss = float(m["loss"])
        elif name == "lora":
          lora_state, m = lora_step(lora_state, batches[k], frozen)
          jax.block_until_ready((lora_state, m))
          loss = float(m["loss"])
        else:
          loss = torch_step(hf[k])
        if i >= args.warmup:
          times[name].append(time.perf_counter() - t)
        losses[name].append(loss)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"first-step losses (same weights, same batch, B = 0): full {losses['full'][0]:.4f}, LoRA "
        f"{losses['lora'][0]:.4f}, peft {losses['torch'][0]:.4f}")
  for name, label in (("full", "JAX full fine-tuning"), ("lora", "JAX LoRA"), ("torch", "torch + peft LoRA")):
    print(f"{label}: median step {med[name] * 1e3:.0f} ms (min {min(times[name]) * 1e3:.0f}); loss "
          f"{losses[name][0]:.3f} -> {losses[name][-1]:.3f}")
  mib = 2 ** 20
  print(f"step memory (XLA): full {mem_full / mib:.1f} MiB, LoRA {mem_lora / mib:.1f} MiB "
        f"(LoRA / full {mem_lora / mem_full:.2f}); params + optimizer: full "
        f"{nbytes(full_state.params) * 3 / mib:.1f} MiB, LoRA "
        f"{(nbytes(lora_state.params) * 3 + nbytes(frozen)) / mib:.1f} MiB; torch weights + adapter grads + AdamW "
        f"{torch_bytes / mib:.1f} MiB")
  print(f"LoRA / full step time: {med['lora'] / med['full']:.2f}; JAX LoRA speedup over torch + peft (torch / JAX "
        f"median step time): {med['torch'] / med['lora']:.2f}x")


if __name__ == "__main__":
  main()

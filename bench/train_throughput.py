"""Train-step throughput and MFU of a small config on this machine; optionally side by side with transformers.

    python bench/train_throughput.py [--model qwen_vl_demo --seq-len 512 --batch 8 --image-size 112 --max-images 2
                                      --warmup 3 --steps 10 --dtype float32 --remat none --data 1 --fsdp -1 --tensor 1]
    python bench/train_throughput.py --model qwen2_vl_bench [--seq-len 512 --batch 4 --samples-per-row 4
                                      --grids 8x12,16x16 --vs-transformers --torch-threads 2 --warmup 2 --steps 6]

Runs the real jitted `train_step` (sharded state from `create_state`, in/out shardings and donation as in
`qwenvl_jax/train/loop.py`), `--warmup` steps then `--steps` timed steps, each waited for. The model family is
that of the config (`registry.family_of`):

- Qwen-VL (fixed image spans): synthetic packed batches of the pipeline's shapes (rows of samples with one image
  each, ~5% padding at the row ends). FLOPs per step = `flops_per_step` (3 x forward matmul FLOPs, padding image
  slots included).
- Qwen2-VL (any resolution): synthetic batches as `data/patch_packing.py` emits them (`assemble_batch` itself):
  each row holds `--samples-per-row` samples of seq_len // samples-per-row tokens (the rest of the row is padding),
  each sample one image whose patch grid is drawn from `--grids` (`<|vision_start|>`, grid_h*grid_w/4
  `<|image_pad|>`, `<|vision_end|>` after one text token, random text after it, loss on the text after the image),
  its M-RoPE ids from `positions.rope_index` and its patches' rows/columns/segments from `positions.patch_positions`;
  the row's patch budget P is the largest row's patches over the benchmark's batches. FLOPs per step = `fed_flops`
  of the batch (3 x forward FLOPs of its real tokens and patches: padding is computed but not counted).
  `qwen2_vl_bench` is `qwen2_vl_tiny` widened to a small but not trivial model (see `BENCH_QWEN2_VL`); any
  registry name (e.g. `qwen2_vl_tiny`, `qwen2_vl_2b`) works too.

`--vs-transformers` (Qwen2-VL): the same config, converted with `to_hf_dict` + `transformers.Qwen2VLConfig`, as
transformers' `Qwen2VLForConditionalGeneration` (torch, eager attention, float32) starting from the same weights
(our initial parameters exported as an HF folder and loaded with `from_pretrained`), trained with `torch.optim.AdamW`
(after `clip_grad_norm_(1.0)`, as our optimizer clips) on the same batches, JAX and torch steps alternating (both
warmed up first), torch on `--torch-threads` threads (`torch.set_num_threads` and OMP_NUM_THREADS). Fairness:
transformers packs nothing, so torch gets every sample of the packed batch as its own row, [B * samples-per-row,
seq_len // samples-per-row]: since all samples have the same length there is no padding at all, positions are the
samples' own M-RoPE ids (`position_ids`, the ones `get_rope_index` computes; precomputed on the host as our pipeline
does), pixel_values [sum of patches, 1176] with `image_grid_thw`, labels = the token where the loss mask is set, else
-100. So both sides see exactly the same real tokens and patches with the same attention structure (causal within
each sample, within each image in the ViT), which makes the first step's losses equal (printed as a check); torch is
favoured, since JAX also computes its row padding, its patch padding up to P and the masked-out parts of a dense
[L, L] causal attention per row and [P, P] per row in the ViT. Reported: both sides' step times, tokens/s and MFU,
and the JAX speedup = torch step time / JAX step time (mean and median).

Reported: tokens/s (non-padding tokens), step time (mean, median, min), achieved GFLOP/s = FLOPs per step / mean
step time, and MFU = achieved / (matmul peak of device 0 x devices). The peak is `measure_matmul_peak` (an n x n
float32 matmul, best of `--peak-trials`), so on a CPU it is the practical roofline of this machine's BLAS, not a
datasheet number. On a shared machine, compare the fastest step's MFU too: other processes slow both the steps and
the peak measurement.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.data.patch_packing import assemble_batch
from qwenvl_jax.models import registry
from qwenvl_jax.models.qwen2_vl.positions import patch_positions, rope_index, tokens_of
from qwenvl_jax.models.qwen_vl.config import STAGE_FREEZE
from qwenvl_jax.models.qwen_vl.processor import QwenVLProcessor
from qwenvl_jax.sharding import LOGICAL_RULES, make_mesh
from qwenvl_jax.train.loop import measure_matmul_peak
from qwenvl_jax.train.optimizer import make_optimizer
from qwenvl_jax.train.state import create_state, state_shardings
from qwenvl_jax.train.step import StepOptions, fed_flops, flops_per_step, train_step

# `qwen2_vl_tiny` widened: decoder 384 wide (6 heads of 64, 2 key/value heads), 3 layers, vocabulary 2048; ViT 192
# wide (3 heads), 3 blocks. mrope_section sums to head_dim / 2 = 32.
BENCH_QWEN2_VL = "qwen2_vl_bench"
BENCH_QWEN2_VL_OVERRIDES = dict(
    vocab_size=2048, hidden_size=384, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, mrope_section=(8, 12, 12),
    vision=dict(depth=3, embed_dim=192, num_heads=3, mlp_ratio=4.0, hidden_size=384))


def model_config(name: str, dtype: str, remat: str):
  """A registry config by name, or the benchmark's own Qwen2-VL config, with the compute dtype and remat policy."""
  if name == BENCH_QWEN2_VL:
    return registry.get_config("qwen2_vl_tiny").replace(**BENCH_QWEN2_VL_OVERRIDES, dtype=dtype, remat_policy=remat)
  return registry.get_config(name, dtype=dtype, remat_policy=remat)


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


def parse_grids(text: str) -> list[tuple[int, int, int]]:
  """"8x12,16x16" -> [(1, 8, 12), (1, 16, 16)] (image patch grids: t = 1)."""
  return [(1, *(int(x) for x in g.lower().split("x"))) for g in text.split(",") if g]


def qwen2_vl_sample(cfg, rng, n: int, grid, text_ids: np.ndarray) -> dict:
  """One sample of `n` tokens (the sample encoder's format, `data/patch_packing.py`): a text token,
  `<|vision_start|>`, the image's `<|image_pad|>` run, `<|vision_end|>`, random text; loss on the text after the
  image; random patches of the image's grid."""
  v = cfg.vision
  m = v.spatial_merge_size
  q = tokens_of(grid, m)
  if n < q + 4:
    raise ValueError(f"a sample of {n} tokens cannot hold an image of grid {grid} ({q} tokens + 3)")
  ids = rng.choice(text_ids, n).astype(np.int32)
  ids[1], ids[2 + q] = cfg.vision_start_token_id, cfg.vision_end_token_id
  ids[2:2 + q] = cfg.image_token_id
  loss_mask = np.zeros(n, np.int32)
  loss_mask[q + 3:] = 1
  grids = np.asarray([grid], np.int64)
  positions, _ = rope_index(ids[None], np.ones((1, n), np.int32), grids, None, image_token_id=cfg.image_token_id,
                            video_token_id=cfg.video_token_id, merge=m, rule=cfg.position_rule)
  rows_cols, segments = patch_positions(grids, m)
  none_rc, none_seg = patch_positions(np.zeros((0, 3), np.int64), m)
  return {"ids": ids, "loss_mask": loss_mask, "task": np.ones(n, np.int32), "positions": positions[:, 0],
          "image_patches": rng.standard_normal((int(np.prod(grid)), v.patch_dim)).astype(np.float32),
          "image_rows_cols": rows_cols, "image_segments": segments, "image_grid_thw": grids,
          "video_patches": np.zeros((0, v.patch_dim), np.float32), "video_rows_cols": none_rc,
          "video_segments": none_seg, "video_grid_thw": np.zeros((0, 3), np.int64)}


def qwen2_vl_rows(cfg, rng, batch: int, seq_len: int, per_row: int, grids) -> list[list[dict]]:
  """`batch` rows of `per_row` samples of seq_len // per_row tokens each, every sample one image of a random grid."""
  special = {cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id}
  text = np.array([i for i in range(cfg.vocab_size) if i not in special], np.int32)
  n = seq_len // per_row
  return [[qwen2_vl_sample(cfg, rng, n, grids[rng.integers(len(grids))], text) for _ in range(per_row)]
          for _ in range(batch)]


def patch_budget_of(rows_list, merge: int) -> int:
  """The largest row's patches over all batches, rounded up to whole merge windows."""
  most = max(sum(len(s["image_patches"]) for s in row) for rows in rows_list for row in rows)
  return -(-most // merge ** 2) * merge ** 2


def hf_inputs(cfg, rows: list[list[dict]]) -> dict:
  """transformers' training inputs for the samples of `rows`: one sample per row (all of one length: no padding),
  labels -100 where the loss mask is not set, the samples' M-RoPE ids as position_ids [3, N, n]."""
  import torch
  samples = [s for row in rows for s in row]
  ids = np.stack([s["ids"] for s in samples]).astype(np.int64)
  labels = np.where(np.stack([s["loss_mask"] for s in samples]) > 0, ids, -100)
  return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
          "position_ids": torch.from_numpy(np.stack([s["positions"] for s in samples], axis=1).astype(np.int64)),
          "mm_token_type_ids": torch.from_numpy((ids == cfg.image_token_id).astype(np.int64)),
          "pixel_values": torch.from_numpy(np.concatenate([s["image_patches"] for s in samples])),
          "image_grid_thw": torch.from_numpy(np.concatenate([s["image_grid_thw"] for s in samples]))}


def torch_trainer(cfg, params, threads: int):
  """transformers' Qwen2-VL with our `params` (exported as an HF folder, loaded with `from_pretrained`), eager
  attention, float32, AdamW -> (model, step function of the HF inputs returning the loss)."""
  os.environ["OMP_NUM_THREADS"] = str(threads)
  import torch
  import transformers

  from qwenvl_jax.convert.hf import export_hf_folder
  torch.set_num_threads(threads)
  hf_cfg = transformers.Qwen2VLConfig(**registry.family_of(cfg).to_hf_dict(cfg, "float32"))
  t, vis = hf_cfg.text_config, hf_cfg.vision_config
  got = (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
         t.vocab_size, list(t.rope_parameters["mrope_section"]), vis.depth, vis.embed_dim, vis.num_heads)
  want = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
          cfg.intermediate_size, cfg.vocab_size, list(cfg.mrope_section), cfg.vision.depth, cfg.vision.embed_dim,
          cfg.vision.num_heads)
  if got != want:
    raise RuntimeError(f"transformers read the converted config as {got}, expected {want}")
  with tempfile.TemporaryDirectory() as folder:
    export_hf_folder(params, cfg, folder, dtype="float32")
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        folder, config=hf_cfg, dtype=torch.float32, attn_implementation="eager")
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)

  def step(inputs: dict) -> float:
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return model, step


def summary(name: str, times: list[float], tokens: float, flops: float, peak: float) -> None:
  """Step times, tokens/s and MFU of one side."""
  step_s = statistics.mean(times)
  print(f"{name} step time: mean {step_s * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms, "
        f"min {min(times) * 1e3:.1f} ms; tokens/s (non-padding): {tokens / step_s:,.0f}")
  print(f"{name} achieved {flops / step_s / 1e9:.1f} GFLOP/s; MFU {flops / step_s / peak:.1%} of "
        f"{peak / 1e9:.1f} GFLOP/s (fastest step: {flops / min(times) / peak:.1%})")


def jax_setup(cfg, args, freeze):
  """-> (mesh, state, jitted step, batch sharding) as the training loop builds them."""
  fam = registry.family_of(cfg)
  mesh = make_mesh(args.data, args.fsdp, args.tensor)
  tx, sched = make_optimizer(lr=1e-4, min_lr=1e-5, warmup_steps=0, total_steps=10_000, groups=fam.param_groups(cfg),
                             layer_decay=0.95, freeze=freeze)
  opts = StepOptions(grad_accum=args.grad_accum, loss_chunk=args.loss_chunk, num_tasks=1)
  _, shardings = state_shardings(cfg, tx, mesh)
  state = create_state(cfg, tx, mesh, seed=0)
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  model = fam.module(cfg)
  step_fn = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, schedule=sched, opts=opts),
                    in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)
  return mesh, state, step_fn, batch_sharding


def count_params(cfg) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(registry.family_of(cfg).abstract_params(cfg)))


def matmul_peak(args) -> float:
  return max(measure_matmul_peak(args.peak_n, jnp.float32) for _ in range(args.peak_trials))


def run_qwen_vl(cfg, args) -> None:
  """Fixed-span family: the pipeline's packed rows, FLOPs from the static shapes."""
  if args.vs_transformers:
    raise SystemExit("--vs-transformers compares the Qwen2-VL family only")
  if args.image_size != cfg.visual.image_size:
    cfg = cfg.replace(visual={"image_size": args.image_size})
  mesh, state, step_fn, batch_sharding = jax_setup(cfg, args, STAGE_FREEZE["stage2"])

  rng = np.random.default_rng(0)
  host = [synthetic_batch(cfg, rng, args.batch, args.seq_len, args.max_images) for _ in range(4)]
  batches = [jax.device_put(b, batch_sharding) for b in host]
  tokens = [int((b["segment_ids"] > 0).sum()) for b in host]
  flops = flops_per_step(cfg, args.batch, args.seq_len, args.batch * args.max_images, QwenVLProcessor.for_config(cfg))

  peak = matmul_peak(args)
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


def run_qwen2_vl(cfg, args) -> None:
  """Any-resolution family: packed rows with their own patches, FLOPs fed per batch; optionally vs transformers."""
  from qwenvl_jax.models.qwen2_vl.config import STAGE_FREEZE as QWEN2_FREEZE
  mesh, state, step_fn, batch_sharding = jax_setup(cfg, args, QWEN2_FREEZE["stage2"])
  merge = cfg.vision.spatial_merge_size
  grids = parse_grids(args.grids)
  rng = np.random.default_rng(0)
  rows = [qwen2_vl_rows(cfg, rng, args.batch, args.seq_len, args.samples_per_row, grids) for _ in range(4)]
  budget = patch_budget_of(rows, merge)
  host = [assemble_batch(r, args.seq_len, budget, cfg.vision.patch_dim, merge) for r in rows]
  batches = [jax.device_put(b, batch_sharding) for b in host]
  tokens = [int((b["segment_ids"] > 0).sum()) for b in host]
  patches = [int((b["vision_segments"] > 0).sum()) for b in host]
  flops = [fed_flops(cfg, b) for b in host]

  torch_step = None
  if args.vs_transformers:
    _, torch_step = torch_trainer(cfg, state.params, args.torch_threads)
    hf = [hf_inputs(cfg, r) for r in rows]
    for h, n_tok, n_patch in zip(hf, tokens, patches):
      assert h["input_ids"].numel() == n_tok and h["pixel_values"].shape[0] == n_patch, "unequal work"

  peak = matmul_peak(args) * jax.device_count()
  n = args.seq_len // args.samples_per_row
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}), "
        f"mesh {dict(mesh.shape)}")
  print(f"model {args.model} (Qwen2-VL): {count_params(cfg) / 1e6:.1f}M parameters, dtype {args.dtype}, remat "
        f"{args.remat}; batch {args.batch} x seq {args.seq_len}, {args.samples_per_row} samples of {n} tokens per row "
        f"({np.mean(tokens) / (args.batch * args.seq_len):.1%} non-padding), one image each of grid "
        f"{' or '.join('x'.join(map(str, g[1:])) for g in grids)}; patch budget {budget} per row "
        f"({np.mean(patches) / (args.batch * budget):.1%} real patches)")
  print(f"matmul peak (float32 {args.peak_n}^3, device 0, best of {args.peak_trials}): {peak / 1e9:.1f} GFLOP/s")
  if torch_step is not None:
    import torch
    print(f"transformers {__import__('transformers').__version__} / torch {torch.__version__}: eager attention, "
          f"float32, AdamW, {torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); "
          f"{args.batch * args.samples_per_row} rows of one sample each ({n} tokens, no padding)")

  jax_times, torch_times, jax_losses, torch_losses = [], [], [], []
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    for i in range(args.warmup + args.steps):
      k = i % len(batches)
      t = time.perf_counter()
      state, m = step_fn(state, batches[k])
      jax.block_until_ready((state, m))
      dt = time.perf_counter() - t
      jax_losses.append(float(m["loss"]))
      if i == 0:
        compile_s = dt
      if i >= args.warmup:
        jax_times.append(dt)
      if torch_step is not None:
        t = time.perf_counter()
        torch_losses.append(torch_step(hf[k]))
        if i >= args.warmup:
          torch_times.append(time.perf_counter() - t)
  timed = range(args.warmup, args.warmup + args.steps)
  tok = statistics.mean(tokens[i % len(batches)] for i in timed)
  step_flops = statistics.mean(flops[i % len(batches)] for i in timed)
  print(f"JAX first step (compile + run): {compile_s:.1f} s; {args.steps} timed steps after {args.warmup} warm-up; "
        f"loss {jax_losses[0]:.4f} -> {jax_losses[-1]:.4f}")
  print(f"FLOPs per step (fed_flops, real tokens and patches): {step_flops / 1e9:.1f} GFLOP; "
        f"{tok:,.0f} tokens, {statistics.mean(patches):,.0f} patches")
  summary("JAX", jax_times, tok, step_flops, peak)
  if torch_step is None:
    return
  print(f"torch loss {torch_losses[0]:.4f} -> {torch_losses[-1]:.4f} (first step, same weights and batch: JAX "
        f"{jax_losses[0]:.4f}, |diff| {abs(jax_losses[0] - torch_losses[0]):.1e})")
  summary("torch", torch_times, tok, step_flops, peak)
  print(f"JAX speedup (torch / JAX step time): mean {statistics.mean(torch_times) / statistics.mean(jax_times):.2f}x, "
        f"median {statistics.median(torch_times) / statistics.median(jax_times):.2f}x")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="qwen_vl_demo", help=f"a registry config or {BENCH_QWEN2_VL}")
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--batch", type=int, default=None, help="rows per batch (default 8; Qwen2-VL 4)")
  ap.add_argument("--image-size", type=int, default=112, help="Qwen-VL: image resolution")
  ap.add_argument("--max-images", type=int, default=2, help="Qwen-VL: image slots per row")
  ap.add_argument("--samples-per-row", type=int, default=4, help="Qwen2-VL: samples (one image each) per row")
  ap.add_argument("--grids", default="8x12,16x16", help="Qwen2-VL: image patch grids (h x w) samples draw from")
  ap.add_argument("--vs-transformers", action="store_true",
                  help="Qwen2-VL: train transformers' model on the same batches, steps alternating")
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=None, help="default 3 (with --vs-transformers 2)")
  ap.add_argument("--steps", type=int, default=None, help="default 10 (with --vs-transformers 6)")
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

  cfg = model_config(args.model, args.dtype, args.remat)
  qwen2 = registry.family_of(cfg).sample_encoder is not None  # any-resolution: packed on tokens and patches
  args.batch = args.batch or (4 if qwen2 else 8)
  args.warmup = args.warmup if args.warmup is not None else (2 if args.vs_transformers else 3)
  args.steps = args.steps or (6 if args.vs_transformers else 10)
  if args.warmup < 1:
    raise SystemExit("--warmup must be at least 1 (the first step compiles)")
  (run_qwen2_vl if qwen2 else run_qwen_vl)(cfg, args)


if __name__ == "__main__":
  main()

"""The training loop of one stage: data, sharded state (fresh, imported or resumed), jitted steps, logging,
checkpoints, SIGTERM and NaN handling. `train.py` is the command-line entry point."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.convert import loader
from qwenvl_jax.convert.loader import model_config
from qwenvl_jax.data.pipeline import DataConfig, DataPipeline, build_patch_dataset
from qwenvl_jax.data.tokenizer import load_tokenizer
from qwenvl_jax.models import registry
from qwenvl_jax.sharding import LOGICAL_RULES, make_mesh
from qwenvl_jax.train.checkpointing import TrainCheckpointer
from qwenvl_jax.train.config import spec_of
from qwenvl_jax.train.contrastive import ContrastiveHead
from qwenvl_jax.train.lora import plan_of as lora_plan_of
from qwenvl_jax.train.lora import spec_of as lora_spec_of
from qwenvl_jax.train.optimizer import make_optimizer
from qwenvl_jax.train.sigterm import Interrupted, SigtermGuard
from qwenvl_jax.train.state import create_state, state_shardings
from qwenvl_jax.train.step import (
  StepOptions,
  contrastive_flops,
  contrastive_step,
  fed_flops,
  flops_per_step,
  train_step,
)

log = logging.getLogger("qwenvl_jax.train")


class NonFiniteLoss(RuntimeError):
  """Training stopped on a NaN/Inf loss or gradient (the last checkpoint is the last good state)."""


__all__ = ["model_config", "run", "run_stage", "NonFiniteLoss"]


def optimizer(c, cfg):
  """-> (optax transformation, schedule). A LoRA run's state holds only what trains: nothing to freeze there."""
  o = c.optim
  warmup = math.ceil(o.warmup_ratio * o.total_steps) if o.warmup_ratio else o.warmup_steps
  return make_optimizer(lr=o.lr, min_lr=o.min_lr, warmup_steps=warmup, total_steps=o.total_steps, b1=o.b1,
                        b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                        groups=registry.family_of(cfg).param_groups(cfg), layer_decay=o.layer_decay,
                        vision_lr_scale=o.vision_lr_scale, freeze=() if lora_spec_of(c) else tuple(o.freeze))


def any_resolution(cfg) -> bool:
  """Whether the family's images keep their own size (packed on tokens and patches) rather than fixed spans."""
  return registry.family_of(cfg).sample_encoder is not None


def processor_for(c, cfg):
  """The family's processor at the stage's resolution (e.g. 224 px in stage 1; any-resolution families: the pixel
  range): the one home of image size and image tokens per image for the tokenizer, the data and the FLOP count."""
  fam = registry.family_of(cfg)
  if any_resolution(cfg) and c.get("mode") == "contrastive":  # one size: data.image_size squared
    return fam.processor(cfg, min_pixels=c.data.image_size ** 2, max_pixels=c.data.image_size ** 2)
  if any_resolution(cfg):
    return fam.processor(cfg, **{k: v for k, v in (("min_pixels", c.data.min_pixels),
                                                   ("max_pixels", c.data.max_pixels)) if v})
  return fam.processor(cfg, image_size=c.data.image_size)


def contrastive_head(c) -> ContrastiveHead | None:
  """The projections and temperature a contrastive stage trains with the model (None in generative mode)."""
  return ContrastiveHead(spec_of(c)) if c.get("mode") == "contrastive" else None


def mesh_from(c, devices=None):
  return make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)


def tokenizer_for(c, cfg, workdir: str):
  """The configured tokenizer; 'shapes' trains the demo tokenizer once and keeps it with the run (a SentencePiece
  model for fixed image spans, a tokenizer.json for families whose images are placeholder blocks)."""
  if registry.family_of(cfg).processor(cfg).fixed_image_tokens is None:
    # placeholder blocks (Qwen2-VL, InternVL): the family checks the tokenizer's ids
    if c.data.tokenizer != "shapes":
      tok = load_tokenizer(c.data.tokenizer)
    else:
      from qwenvl_jax.data.shapes import train_tokenizer_json
      path = os.path.join(workdir, "tokenizer.json")
      if not os.path.isfile(path):
        if jax.process_index() == 0:
          train_tokenizer_json(path, vocab_size=cfg.vocab_size)
        _sync("tokenizer")
      tok = load_tokenizer(path)
    registry.family_of(cfg).inputs.check_tokenizer(cfg, tok)
    return tok
  span = processor_for(c, cfg).fixed_image_tokens
  if c.data.tokenizer == "shapes":
    from qwenvl_jax.data.shapes import train_tokenizer
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.isfile(path):
      if jax.process_index() == 0:
        train_tokenizer(os.path.join(workdir, "tokenizer"), vocab_size=cfg.vocab_size, image_span=span)
      _sync("tokenizer")
    tok = load_tokenizer(path, image_span=span)
  else:
    tok = load_tokenizer(c.data.tokenizer, image_span=span)
  if tok.vocab_size > cfg.vocab_size or tok.img_start_id != cfg.visual.image_start_id:
    raise ValueError(f"tokenizer (vocab {tok.vocab_size}, <img> {tok.img_start_id}) does not fit model {c.model.name} "
                     f"(vocab {cfg.vocab_size}, image_start_id {cfg.visual.image_start_id})")
  return tok


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def data_source(c, split: str = "train"):
  d = c.data
  if d.source == "shapes":
    from qwenvl_jax.data.shapes import ShapesSource
    from qwenvl_jax.train.config import parse_mix
    size = tuple(int(x) for x in d.image_sides.split(",")) if d.image_sides else d.image_size
    return ShapesSource(split, d.num_records or None, seed=c.seed, image_size=size, mix=parse_mix(d.mix))
  if d.source == "jsonl":
    from qwenvl_jax.data.jsonl import JsonlSource
    return JsonlSource(d.path, image_root=d.image_root or None, strict=d.strict, confine_images=d.confine_images)
  from qwenvl_jax.data.tfds_sources import ShapesTfdsSource
  return ShapesTfdsSource(d.path, split)


def data_pipeline(c, tok, processor, seed_offset: int = 0):
  """-> (an iterable of this host's batches with a checkpointable iterator, the task names of its per-task
  losses)."""
  from qwenvl_jax.data.shapes import TASKS
  d = c.data
  per_host = d.batch_size // jax.process_count()
  cfg = model_config(c)
  if c.mode == "contrastive":  # image-caption pairs at one size (train/contrastive.py)
    from qwenvl_jax.data.pairs import PairEncoder, build_pair_dataset
    dcfg = DataConfig(batch_size=per_host, strict=d.strict, num_threads=d.num_threads)
    image_fn = functools.partial(registry.family_of(cfg).inputs.contrastive_image, cfg, processor,
                                 size=d.image_size)
    encoder = PairEncoder(tok, dcfg, image_fn, c.contrastive.text_len)
    return build_pair_dataset(data_source(c), encoder, dcfg, seed=c.seed + seed_offset, num_epochs=None), ()
  if any_resolution(cfg):  # each row carries its own patches: every host packs its own rows
    dcfg = DataConfig(seq_len=d.seq_len, batch_size=per_host, mode=d.mode, strict=d.strict,
                      num_threads=d.num_threads, packing_window=d.packing_window, task_names=TASKS)
    encoder = registry.family_of(cfg).sample_encoder(tok, cfg, processor, dcfg, d.patch_budget)
    return build_patch_dataset(data_source(c), encoder, dcfg, patch_budget=d.patch_budget,
                               patch_dim=processor.patch_dim, merge=processor.merge_size, seed=c.seed + seed_offset,
                               num_epochs=None), TASKS
  dcfg = DataConfig(seq_len=d.seq_len, max_images=d.max_images, image_size=processor.image_size, batch_size=per_host,
                    mode=d.mode, truncation=d.truncation, strict=d.strict, num_threads=d.num_threads,
                    packing_window=d.packing_window, task_names=TASKS)
  return DataPipeline(data_source(c), tok, dcfg, seed=c.seed + seed_offset, num_epochs=None), TASKS


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a jitted n x n matmul on device 0 (the roofline used for MFU when no peak is configured)."""
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    x = f(x)
  x.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def run_stage(c: ml_collections.ConfigDict, workdir: str, shared_dir: str | None = None) -> dict:
  """Train one stage in `workdir` (resuming from its latest checkpoint if any). Returns final metrics.
  `shared_dir` holds what chained stages share (the trained tokenizer); default: the workdir. SIGTERM at any point
  ends the stage with exit status 0: during a step it finishes the step and saves; while starting up it saves
  nothing new; while waiting for data it saves the last step if that is not saved yet."""
  with SigtermGuard() as guard:
    try:
      return _run_stage(c, workdir, shared_dir, guard)
    except Interrupted:
      print("SIGTERM during start-up: exiting, nothing new saved", flush=True)
      return {"step": None, "stopped_by_signal": True}


def _run_stage(c, workdir: str, shared_dir: str | None, guard: SigtermGuard) -> dict:
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK | os.R_OK):
    raise PermissionError(f"workdir {workdir} is not readable and writable")
  primary = jax.process_index() == 0
  cfg = model_config(c)
  tok = tokenizer_for(c, cfg, shared_dir or workdir)
  mesh = mesh_from(c)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.data.batch_size % jax.process_count() or c.data.batch_size % batch_shards:
    raise ValueError(f"data.batch_size {c.data.batch_size} must be a multiple of the process count "
                     f"{jax.process_count()} and of the data x fsdp mesh size {batch_shards}")
  tx, sched = optimizer(c, cfg)
  head = contrastive_head(c)
  plan = lora_plan_of(c, cfg, mesh)
  abstract, shardings = state_shardings(cfg, tx, mesh, head, plan)
  processor = processor_for(c, cfg)
  pipeline, tasks = data_pipeline(c, tok, processor)
  data_iter = iter(pipeline)
  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep,
                           async_save=c.checkpoint.async_save)
  frozen, frozen_shardings, base = {}, {}, None
  if plan is not None:  # the frozen base, rebuilt from `init` on every start (checkpoints hold the trained part)
    base, _ = loader.start_params(c.init, cfg, c.seed)  # random: the same base on every start (seeded)
    frozen, frozen_shardings = plan.frozen(base), plan.frozen_abstract()[1]
  found = ckpt.restore_latest(abstract, shardings)
  if found is not None:
    start, state, data_state = found
    if data_state:
      data_iter.set_state(data_state)
    log.warning("resumed from step %d", start)
    print(f"resumed from step {start}", flush=True)
  else:
    if plan is not None:
      state = create_state(cfg, tx, mesh, c.seed, params=plan.initial_trained(base, jax.random.key(c.seed + 1)),
                           plan=plan)
    else:
      state = create_state(cfg, tx, mesh, c.seed, params=loader.start_params(c.init, cfg, mesh=mesh)[0], head=head)
    start = 0
  del base  # the frozen tree holds what the run needs (quantized for Q-LoRA)
  if primary:  # only once the workdir's checkpoint fits this config (a rejected one keeps the run's config.json)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
    _drop_metrics_after(os.path.join(workdir, "metrics.jsonl"), start)

  opts = StepOptions(grad_accum=c.optim.grad_accum, loss_chunk=c.optim.loss_chunk, z_loss=c.optim.z_loss,
                     skip_nonfinite=c.nonfinite == "skip", num_tasks=len(tasks))
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # every array: rows (and their patches)
  model = plan.train_module if plan is not None else registry.family_of(cfg).module(cfg)
  if head is None:
    one_step = functools.partial(train_step, model=model, tx=tx, schedule=sched, opts=opts)
  else:
    one_step = functools.partial(contrastive_step, model=model, head=head, tx=tx, schedule=sched, opts=opts)
  step_fn = jax.jit(one_step, in_shardings=(shardings, batch_sharding, frozen_shardings),
                    out_shardings=(shardings, None), donate_argnums=0)

  writer = _tb_writer(c, workdir, purge_step=start + 1) if primary else None
  total = c.optim.total_steps
  # MFU: fixed-span families compute the same every step; any-resolution batches count what each one feeds (the
  # local batch's FLOPs times the hosts: every host feeds as many rows)
  if head is not None:
    fixed_flops = contrastive_flops(cfg, c.data.batch_size, c.contrastive.text_len, processor)
  else:
    fixed_flops = None if any_resolution(cfg) else flops_per_step(
        cfg, c.data.batch_size, c.data.seq_len, c.data.batch_size * c.data.max_images, processor,
        frozen_base=plan is not None)
  peak = (c.peak_flops or measure_matmul_peak()) * jax.device_count()
  bar = _progress(start, total) if (primary and c.log.progress) else None
  window = {"loss": 0.0, "n": 0, "steps": 0, "tokens": 0.0, "flops": 0.0, "time": time.perf_counter(),
            "task": np.zeros(len(tasks)), "task_n": np.zeros(len(tasks)), "task_hit": np.zeros(len(tasks))}
  last: dict = {}
  step = start
  trace = _Trace(c.profile, os.path.join(workdir, "tensorboard"))
  saved, data_state = start, data_iter.get_state()
  guard.hold()  # from here SIGTERM finishes the step in flight
  try:
    with jax.set_mesh(mesh), _logical_rules():
      while step < total:
        try:
          with guard.waiting():
            local = next(data_iter)
        except Interrupted:
          if step > saved:  # data_state is the position after the last step's batch
            ckpt.save(step, state, data_state, force=True)
          ckpt.wait()
          print(f"SIGTERM while waiting for data: {'saved' if step > saved else 'already saved'} step {step}, "
                "exiting", flush=True)
          break
        data_state = data_iter.get_state()
        step_flops = fixed_flops or fed_flops(cfg, local, frozen_base=plan is not None) * jax.process_count()
        batch = _global_batch(local, batch_sharding)
        trace.before(step + 1)
        state, metrics = step_fn(state, batch, frozen)
        step += 1
        trace.after(step, state)
        m = jax.device_get(metrics)
        if not bool(m["finite"]):
          if c.nonfinite == "stop":
            ckpt.wait()  # an async save in flight is the last good state the message names
            good = ckpt.latest_step()
            raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (loss {float(m['loss'])}); " + (
                f"the last checkpoint (step {good}) holds the last good state" if good is not None else
                "no checkpoint was saved before it (lower the learning rate or check the data)"))
          log.warning("step %d: non-finite loss or gradient, update skipped", step)
        else:  # window means over the steps that updated (a skipped step's losses are NaN)
          window["loss"] += float(m["loss"])
          window["n"] += 1
          window["task"] += np.asarray(m["task_loss_sum"])
          window["task_n"] += np.asarray(m["task_tokens"])
          window["task_hit"] += np.asarray(m["task_hits"])
        window["steps"] += 1
        window["tokens"] += float(m["tokens"])
        window["flops"] += step_flops
        if step == start + 1:  # the first step of a run includes compilation: keep it out of throughput and MFU
          window.update(time=time.perf_counter(), steps=0, tokens=0.0, flops=0.0)
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{float(m['loss']):.3f}")
        if step % c.log.every == 0 or step == total:
          last = _log_window(window, m, step, total, peak, tasks, writer, bar)
          if primary:
            with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
              f.write(json.dumps({"step": step, "last_loss": float(m["loss"]), **last}) + "\n")
        if step % c.checkpoint.every == 0 or step == total or guard.requested:
          ckpt.save(step, state, data_state, force=True)
          saved = step
        if guard.requested:
          ckpt.wait()
          print(f"SIGTERM: saved step {step}, exiting", flush=True)
          break
  finally:
    trace.stop()
    try:
      ckpt.close()  # waits for a save in flight: its failure (a full disk) ends the run here, as one error
    finally:
      if bar is not None:
        bar.close()
      if writer is not None:
        writer.close()
  last.update(step=step, stopped_by_signal=guard.requested)
  return last


class _Trace:
  """A jax.profiler trace of steps start_step+1 .. start_step+steps (every process writes its own host's trace
  under log_dir/plugins/profile/, where TensorBoard's Profile tab finds it); steps=0 traces nothing."""

  def __init__(self, profile, log_dir: str):
    self.first, self.last = profile.start_step + 1, profile.start_step + profile.steps
    self.log_dir, self.on = log_dir, False

  def before(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.log_dir)
      self.on = True

  def after(self, step: int, state) -> None:
    if self.on and step >= self.last:
      jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
      self.stop()
      log.info("profile of steps %d-%d written under %s", self.first, self.last, self.log_dir)

  def stop(self) -> None:
    if self.on:
      jax.profiler.stop_trace()
      self.on = False


def _logical_rules():
  import flax.linen as nn
  return nn.logical_axis_rules(LOGICAL_RULES)


def _global_batch(local: dict, sharding) -> dict:
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def _tb_writer(c, workdir, purge_step=None):
  """purge_step: TensorBoard drops the events at and after it that an interrupted earlier run wrote."""
  if not c.log.tensorboard:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)


def _drop_metrics_after(path: str, step: int) -> None:
  """Keep one metrics line per step on resume: an interrupted run may have logged steps after its last checkpoint
  (and, if killed mid-write, half a line); the resumed run logs them again."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line.rstrip("\n") + "\n")
      except (ValueError, KeyError, TypeError):
        pass
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def _progress(start, total):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _log_window(w, m, step, total, peak, tasks, writer, bar) -> dict:
  dt = max(time.perf_counter() - w["time"], 1e-9)
  steps = w["steps"]
  nan = float("nan")
  out = {"loss": w["loss"] / w["n"] if w["n"] else nan, "grad_norm": float(m["grad_norm"]),
         "lr": float(m["lr"]), "tokens_per_s": w["tokens"] / dt if steps else nan,
         "steps_per_s": steps / dt if steps else nan, "mfu": w["flops"] / dt / peak if steps else nan}
  # per task over its answer tokens only (the data's task ids): teacher-forced arg-max accuracy and loss
  per_task = []
  for i, name in enumerate(tasks):
    if w["task_n"][i] > 0:
      out[f"loss/{name}"] = float(w["task"][i] / w["task_n"][i])
      out[f"acc/{name}"] = float(w["task_hit"][i] / w["task_n"][i])
      per_task.append(f"{name} {out[f'acc/{name}']:.2f}/{out[f'loss/{name}']:.2f}")
  line = (f"step {step}/{total}  loss {out['loss']:.4f}  grad_norm {out['grad_norm']:.3f}  lr {out['lr']:.2e}  "
          f"tokens/s {out['tokens_per_s']:.0f}  mfu {out['mfu']:.2%}")
  if per_task:
    line += "\n  answer tokens acc/loss: " + "  ".join(per_task)
  if "logit_scale" in m:  # the contrastive stage's learned temperature (1 / scale)
    out["logit_scale"] = float(m["logit_scale"])
    line += f"  logit_scale {out['logit_scale']:.2f}"
  if bar is not None:
    bar.write(line)
  elif jax.process_index() == 0:
    print(line, flush=True)
  if writer is not None:
    for k, v in out.items():
      if math.isfinite(v):
        writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
    writer.flush()
  w.update(loss=0.0, n=0, steps=0, tokens=0.0, flops=0.0, time=time.perf_counter(), task=np.zeros_like(w["task"]),
           task_n=np.zeros_like(w["task_n"]), task_hit=np.zeros_like(w["task_hit"]))
  return out


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run a config: one stage, or the chained `stages` each in workdir/<stage> from the previous one."""
  from qwenvl_jax.train.config import check_structure, resolve_stage, validate
  check_structure(c)
  d = c.distributed
  if d.initialize and d.coordinator_address:
    jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
  elif d.initialize:  # TPU pod slices (and clusters jax knows) give every process all three
    jax.distributed.initialize()
  if not c.stages:
    validate(c)
    return run_stage(c, workdir)
  results, previous = {}, None
  for name in c.stages:
    s = resolve_stage(c, name)
    if previous is not None:
      s.init.source, s.init.path = "checkpoint", previous
    validate(s)
    print(f"=== {name} ===", flush=True)
    results[name] = run_stage(s, os.path.join(workdir, name), shared_dir=workdir)
    previous = os.path.join(workdir, name)
    if results[name].get("stopped_by_signal"):
      break
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=float)
  return results

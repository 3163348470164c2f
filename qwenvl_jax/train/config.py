"""The training config schema (ml_collections) shared by the files in configs/, and its validation."""

from __future__ import annotations

import re

import ml_collections
import numpy as np

from qwenvl_jax.models import registry
from qwenvl_jax.models.qwen_vl.config import STAGE_FREEZE  # the default model's (configs import their family's)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # generative: next-token loss on ChatML / pre-training samples; contrastive: image-text alignment (InternVL's
  # stage 1, train/contrastive.py) on a source's image-caption pairs, with the fields of `contrastive`
  c.mode = "generative"
  c.contrastive = ml_collections.ConfigDict(dict(loss="clip", embed_dim=256, text_pooling="last",
                                                 init_temperature=0.07, text_len=32))
  c.model = ml_collections.ConfigDict(dict(name="qwen_vl_7b", param_dtype="float32", dtype="bfloat16",
                                           remat_policy="none", scan_layers=True,
                                           drop_path=0.0))  # InternViT's stochastic depth in training
  # Where the weights come from: random | hf (an HF Qwen-VL folder or our export) | checkpoint (a training
  # workdir of the previous stage, or this project's model checkpoint).
  c.init = ml_collections.ConfigDict(dict(source="random", path=""))
  # LoRA / Q-LoRA (train/lora.py): rank > 0 trains adapters on the `targets` linear layers ("" = the family's
  # default, its official recipe's) and the base parameters matching `trainable` (a regex, e.g. "^(wte|lm_head)/";
  # "" = none); the rest of the base stays frozen (optim.freeze is not used) and, with quantize int8 | int4 | nf4,
  # its LLM blocks are quantized (Q-LoRA). Layers are unrolled.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.05, targets="", trainable="", quantize=""))
  c.data = ml_collections.ConfigDict(dict(
      source="shapes",       # shapes | jsonl | tfds_shapes
      path="",               # jsonl: the data file; tfds_shapes: the TFDS data_dir
      image_root="",         # jsonl: folder image paths are relative to (default: the data file's folder)
      confine_images=False,  # jsonl: skip records whose images resolve outside image_root (../, absolute paths)
      tokenizer="shapes",    # a qwen.tiktoken / folder / .model path, or 'shapes' (train one into the workdir)
      num_records=0,         # shapes: records per epoch (0 = the split size)
      mix="",                # shapes: task weights "caption=2,ocr=1,..." (tasks left out get 0; "" = default mix)
      mode="chat", seq_len=2048, image_size=448, max_images=8, batch_size=8, truncation="truncate",
      strict=False, num_threads=2, packing_window=512,
      # any-resolution families (Qwen2-VL): ViT patches per row, the processor's pixel range (0: the family's
      # default), and shapes image sides "low,high" drawn per record ("": image_size for every image)
      patch_budget=0, min_pixels=0, max_pixels=0, image_sides=""))
  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-5, min_lr=1e-5, warmup_steps=400, total_steps=10_000, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
      warmup_ratio=0.0,  # > 0: warm up over this fraction of total_steps instead of warmup_steps (HF's warmup_ratio)
      clip_norm=1.0,  # global gradient-norm clipping; 0 turns clipping off (as Hugging Face's max_grad_norm=0)
      layer_decay=0.95, freeze=STAGE_FREEZE["stage2"], z_loss=0.0, grad_accum=1, loss_chunk=512,
      vision_lr_scale=1.0))  # LR multiplier of the ViT and the adapter
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.log = ml_collections.ConfigDict(dict(every=10, tensorboard=True, progress=True))
  # jax.profiler trace of `steps` steps after step `start_step` into workdir/tensorboard (TensorBoard's Profile tab)
  c.profile = ml_collections.ConfigDict(dict(start_step=10, steps=0))  # steps=0: off
  c.nonfinite = "stop"       # stop | skip: what a NaN/Inf loss or gradient does
  c.peak_flops = 0.0         # per-device peak FLOP/s for the MFU metric (0: measured matmul peak of device 0)
  # multi-host: initialize=True; coordinator_address "" lets the TPU runtime give all three (pod slices), else
  # "host:port" of process 0 with num_processes and this process's id (python -m qwenvl_jax.train.launch)
  c.distributed = ml_collections.ConfigDict(dict(initialize=False, coordinator_address="", num_processes=1,
                                                 process_id=0))
  # A config may chain stages (the demo does): names run in order, each in workdir/<name>, started from the previous
  # one's last checkpoint; `stage_overrides[name]` holds what differs from the fields above.
  c.stages = ()
  c.stage_overrides = ml_collections.ConfigDict()
  return c


def spec_of(c):
  """The contrastive stage's settings as `train.contrastive.ContrastiveSpec`."""
  from qwenvl_jax.train.contrastive import ContrastiveSpec
  k = c.contrastive
  return ContrastiveSpec(loss=k.loss, embed_dim=int(k.embed_dim), text_pooling=k.text_pooling,
                         init_temperature=float(k.init_temperature))


def resolve_stage(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of one stage of a chained config: a copy with that stage's overrides applied."""
  c = ml_collections.ConfigDict(config.to_dict())
  overrides = config.stage_overrides.get(name)
  if overrides is None:
    raise ValueError(f"stage {name!r} has no entry in stage_overrides")

  def merge(dst, src, where):
    for k, v in src.items():
      if k not in dst:
        raise ValueError(f"stage_overrides.{name}: unknown key {where}{k}")
      if isinstance(v, ml_collections.ConfigDict):
        merge(dst[k], v, f"{where}{k}.")
      else:
        dst[k] = v
  merge(c, overrides, "")
  c.stages = ()
  return c


def parse_mix(text: str) -> dict[str, float] | None:
  """'caption=2, ocr=1' -> {'caption': 2.0, 'ocr': 1.0} (checked against the shapes tasks); '' -> None (default)."""
  from qwenvl_jax.data.shapes import resolve_mix
  if not text.strip():
    return None
  mix = {}
  for item in text.split(","):
    name, _, weight = item.partition("=")
    try:
      mix[name.strip()] = float(weight)  # no '=' leaves weight '' -> ValueError too
    except ValueError:
      raise ValueError(f"{item.strip()!r} is not task=weight") from None
  resolve_mix(mix)
  return mix


def check_structure(c) -> None:
  """A config file's get_config() must give a ConfigDict with base_config()'s fields: ValueError naming what is
  missing (a plain dict, or a hand-built ConfigDict, would fail later at the first field it lacks)."""
  if not isinstance(c, ml_collections.ConfigDict):
    getattr(c, "seed", None)  # ml_collections' stand-in for a config file that did not load raises its error here
    raise ValueError(f"bad config: get_config() returned a {type(c).__name__}, not an ml_collections.ConfigDict "
                     "(start from qwenvl_jax.train.config.base_config())")

  def missing(have, want, where):
    for k, v in want.items():
      if k not in have:
        yield where + k
      elif isinstance(v, ml_collections.ConfigDict) and k != "stage_overrides":
        if not isinstance(have[k], ml_collections.ConfigDict):
          yield where + k
        else:
          yield from missing(have[k], v, f"{where}{k}.")
  lacking = list(missing(c, base_config(), ""))
  if lacking:
    raise ValueError(f"bad config: {len(lacking)} fields of base_config() missing, e.g. {', '.join(lacking[:3])} "
                     "(start from qwenvl_jax.train.config.base_config())")


def validate(c: ml_collections.ConfigDict, dry_run: bool = False) -> None:
  """Raise ValueError with one line naming the first bad value (dry_run: paths are not needed)."""
  def need(cond, msg):
    if not cond:
      raise ValueError(f"bad config value: {msg}")
  check_structure(c)
  named = registry.named_configs()
  need(c.model.name in named, f"model.name {c.model.name!r} not in {sorted(named)}")
  need(c.init.source in ("random", "hf", "checkpoint"), f"init.source {c.init.source!r}: random | hf | checkpoint")
  need(dry_run or c.init.source == "random" or c.init.path,
       "init.path is required when init.source is hf or checkpoint")
  need(c.data.source in ("shapes", "jsonl", "tfds_shapes"), f"data.source {c.data.source!r}: shapes|jsonl|tfds_shapes")
  need(dry_run or c.data.source == "shapes" or c.data.path, f"data.path is required for data.source={c.data.source}")
  if c.data.source == "shapes":
    try:
      parse_mix(c.data.mix)
    except ValueError as e:
      need(False, f"data.mix: {e}")
  need(c.data.seq_len > 0 and c.data.batch_size > 0, "data.seq_len and data.batch_size must be positive")
  need(c.mode in ("generative", "contrastive"), f"mode {c.mode!r}: generative | contrastive")
  need(0 <= c.model.drop_path < 1, f"model.drop_path {c.model.drop_path}: in [0, 1)")
  if c.model.drop_path:
    from qwenvl_jax.convert.loader import model_config
    try:
      model_config(c)
    except ValueError as e:
      need(False, str(e))
  fam = registry.family_of(registry.get_config(c.model.name))
  if c.mode == "contrastive":
    try:
      spec_of(c).validate()
    except (ValueError, TypeError) as e:
      need(False, str(e))
    need(c.contrastive.text_len >= 2, f"contrastive.text_len {c.contrastive.text_len}: at least 2")
    need(c.optim.grad_accum == 1, "optim.grad_accum must be 1 in contrastive mode (micro-batches would have fewer "
                                  "negatives: another loss)")
  elif fam.sample_encoder is not None:
    need(dry_run or c.data.patch_budget > 0,
         f"data.patch_budget must be positive for {c.model.name} (ViT patches per row)")
  elif fam.name == "internvl":
    need(False, f"{c.model.name}: InternVL trains in the contrastive stage (--config.mode=contrastive); its "
                "generative stages are not supported yet")
  if c.data.image_sides:
    try:
      lo, hi = (int(x) for x in c.data.image_sides.split(","))
    except ValueError:
      need(False, f"data.image_sides {c.data.image_sides!r}: expected 'low,high' pixels")
  for key in ("data.max_images", "data.image_size", "data.packing_window", "optim.grad_accum", "optim.loss_chunk",
              "log.every"):
    section, name = key.split(".")
    need(c[section][name] >= 1, f"{key} {c[section][name]}: must be at least 1")
  sizes = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  need(all(v >= 1 or v == -1 for v in sizes), f"mesh sizes {sizes}: each at least 1, or -1 (the remaining devices)")
  need(c.data.batch_size % c.optim.grad_accum == 0, "data.batch_size must be a multiple of optim.grad_accum")
  need(c.optim.total_steps > 0 and 0 <= c.optim.warmup_steps, "optim.total_steps > 0, optim.warmup_steps >= 0")
  need(0 <= c.optim.warmup_ratio < 1, f"optim.warmup_ratio {c.optim.warmup_ratio}: in [0, 1)")
  if c.lora.rank:
    need(c.lora.rank >= 1, f"lora.rank {c.lora.rank}: a positive rank, or 0 for full fine-tuning")
    need(c.mode == "generative", "LoRA trains the generative objective (mode=generative)")
    need(c.lora.quantize in ("", "int8", "int4", "nf4"), f"lora.quantize {c.lora.quantize!r}: int8 | int4 | nf4 "
                                                         "(or '' for LoRA without quantization)")
    need(c.lora.alpha > 0 and 0 <= c.lora.dropout < 1, "lora.alpha > 0 and lora.dropout in [0, 1)")
    for key in ("targets", "trainable"):
      try:
        re.compile(c.lora[key])
      except re.error as e:
        need(False, f"lora.{key} {c.lora[key]!r} is not a regular expression ({e})")
  need(c.optim.lr > 0 and 0 <= c.optim.min_lr <= c.optim.lr, "optim.lr > 0 and 0 <= optim.min_lr <= optim.lr")
  # The schedule runs in float32: a larger lr is inf there, and 0 * inf makes the first update NaN.
  need(c.optim.lr <= float(np.finfo(np.float32).max), f"optim.lr {c.optim.lr} overflows float32")
  need(0 < c.optim.layer_decay <= 1, "optim.layer_decay in (0, 1]")
  need(c.optim.clip_norm >= 0, f"optim.clip_norm {c.optim.clip_norm}: >= 0 (0 turns clipping off)")
  need(0 <= c.optim.b1 < 1 and 0 <= c.optim.b2 < 1, "optim.b1 and optim.b2 in [0, 1)")
  need(c.optim.eps > 0 and c.optim.weight_decay >= 0 and c.optim.z_loss >= 0,
       "optim.eps > 0, optim.weight_decay >= 0, optim.z_loss >= 0")
  for k, pattern in enumerate(c.optim.freeze):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      need(False, f"optim.freeze[{k}] {pattern!r} is not a regular expression ({e})")
  need(c.optim.vision_lr_scale > 0, "optim.vision_lr_scale must be positive")
  need(c.nonfinite in ("stop", "skip"), f"nonfinite {c.nonfinite!r}: stop | skip")
  need(c.checkpoint.every > 0 and c.checkpoint.keep > 0, "checkpoint.every and checkpoint.keep must be positive")
  for key in ("init.path", "data.path", "data.image_root", "data.tokenizer"):
    value = str(c[key.split(".")[0]][key.split(".")[1]])
    need("://" not in value, f"{key} {value!r}: paths are read as local files; mount the bucket (Cloud Storage "
                             "FUSE, docs/tpu.md) and pass the mounted path")
  need(c.profile.start_step >= 0 and c.profile.steps >= 0, "profile.start_step and profile.steps must be >= 0")

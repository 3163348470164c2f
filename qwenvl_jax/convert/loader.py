"""The one loader under everything that reads weights: path -> (family, config, params).

It reads an HF folder (config.json `model_type` picks the family), this project's model checkpoint, or a `train.py`
workdir (the latest step of one stage). `qv.load` wraps the result in the model facade; the trainer starts every
run that does not start from random through `start_params`. Nothing here imports the public API or the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax

from qwenvl_jax.convert import checkpoint
from qwenvl_jax.convert.hf import import_hf_params
from qwenvl_jax.convert.tensor_io import CheckpointError, checkpoint_files
from qwenvl_jax.models import quantize as quantization
from qwenvl_jax.models import registry
from qwenvl_jax.models.registry import Family
from qwenvl_jax.nn.layers import stack_layers, unstack_layers
from qwenvl_jax.sharding import logical_to_sharding, on_first_local_device

log = logging.getLogger("qwenvl_jax.convert")


@dataclasses.dataclass
class Loaded:
  family: Family
  config: Any
  params: Any
  assets_dir: str | None   # where the tokenizer / processor files of this checkpoint are (None if nowhere)
  quantize: str | None = None   # 'int8': params are the quantized tree of `models/quantize.py`
  lora: Any = None   # a LoRA workdir's `LoraWeights` (params are then its merged weights)
  step: int | None = None   # a train.py workdir's: the training step of the checkpoint read


@dataclasses.dataclass
class LoraWeights:
  """What a LoRA run trained: the adapters (and the base parameters `trainable` named), as saved."""
  spec: Any            # models.lora.LoraSpec
  trained: dict        # nested dict: `kernel_lora_a/b` leaves + trained base parameters
  trainable: str       # the run's lora.trainable regex


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {folder}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_hf_config(folder: str, **overrides):
  """The model config of an HF folder, in its family's dataclass."""
  d = read_hf_config(folder)
  fam = registry.for_model_type(d.get("model_type"))
  return fam.from_hf_dict(d, **{**fam.folder_fields(folder, d), **overrides})


def is_training_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "config.json"))


def model_config(c):
  """The model config a training config (`configs/*.py`, ml_collections) names in its `model` section."""
  m = c.model
  lora = c.get("lora") is not None and bool(c.lora.get("rank"))  # adapters are per layer: unrolled
  cfg = registry.get_config(m.name, param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                            scan_layers=m.scan_layers and not lora)
  if m.get("drop_path", 0.0):  # stochastic depth in the vision tower: InternViT's
    if not hasattr(getattr(cfg, "vision", None), "drop_path_rate"):
      raise ValueError(f"model.drop_path: {m.name}'s vision tower has no drop path (InternVL's has)")
    cfg = cfg.replace(vision={"drop_path_rate": float(m.drop_path)})
  return cfg


def relayout(params, stored_scan: bool, scan: bool):
  """Parameters saved with scanned (stacked) or unrolled layers, in the layout `scan` asks for."""
  if stored_scan == scan:
    return params
  return unstack_layers(params) if stored_scan else stack_layers(params)


def _dtype_overrides(dtype: str | None) -> dict:
  return {} if dtype is None else {"param_dtype": dtype, "dtype": dtype}


def param_shardings(cfg, mesh):
  """The NamedSharding of every parameter of `cfg` on `mesh` (the one rules table; undividable dims replicated)."""
  return logical_to_sharding(registry.family_of(cfg).abstract_params(cfg, boxed=True), mesh)


def _stored_shardings(stored, mesh, quantize):
  """Where a checkpoint's float params are restored: the host CPU when they are quantized next (leaf by leaf, so
  no device holds a float copy), else their shards on `mesh`, else the first device."""
  if quantize:
    cpu = jax.sharding.SingleDeviceSharding(quantization.host_device())
    return jax.tree.map(lambda _: cpu, registry.family_of(stored).abstract_params(stored))
  if mesh is not None:
    return param_shardings(stored, mesh)
  return on_first_local_device(registry.family_of(stored).abstract_params(stored))


def _placed(params, stored, cfg, mesh, quantize=None):
  """Params read in the stored layer layout -> the layout, shardings (and quantization) `cfg` asks for."""
  relaid = stored.scan_layers != cfg.scan_layers
  params = relayout(params, stored.scan_layers, cfg.scan_layers)
  if quantize:
    return quantization.Quantizer(cfg, quantize, mesh).quantize_tree(params)
  return jax.device_put(params, param_shardings(cfg, mesh)) if relaid and mesh is not None else params


def _quantize_overrides(quantize, overrides: dict) -> dict:
  quantization.check_mode(quantize)
  if not quantize:
    return overrides
  if overrides.get("scan_layers"):
    raise ValueError(f"quantize={quantize!r} needs unrolled layers: drop scan_layers=True")
  return {**overrides, "scan_layers": False}


def load(path: str, dtype: str | None = "float32", progress=None, mesh=None, quantize: str | None = None,
         before_read=None, **overrides) -> Loaded:
  """Read the weights at `path` (HF folder | model checkpoint | train.py workdir).

  dtype: parameter and compute dtype ('float32' | 'bfloat16' | None = keep a checkpoint's own). overrides: config
  fields (e.g. scan_layers=False; any checkpoint converts to either layer layout). progress(n_bytes): HF import
  progress callback. mesh: a (data, fsdp, tensor) `jax.sharding.Mesh`: every parameter goes straight into its
  shards as it is read (HF tensor by tensor, Orbax with target shardings), so no host or device holds the whole
  model; without one, HF weights come back as host numpy arrays and checkpoints on the first device.
  quantize: 'int8' (weight-only, `models/quantize.py`; unrolled layers): every linear kernel is quantized on the
  host as it is read and placed as int8 + scales (HF tensor by tensor; checkpoints are restored to the host first).
  before_read(cfg): called with the model config before any weight is read (e.g. a memory check).
  """
  check = before_read or (lambda cfg: None)
  overrides = _quantize_overrides(quantize, overrides)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if checkpoint.is_checkpoint(path):
    stored = checkpoint.load_config(path).replace(**_dtype_overrides(dtype))
    fam = registry.family_of(stored)
    cfg = stored.replace(**overrides)
    check(cfg)
    params = checkpoint.load(path, fam.abstract_params(stored), _stored_shardings(stored, mesh, quantize))
    return Loaded(fam, cfg, _placed(params, stored, cfg, mesh, quantize), checkpoint.assets_dir(path), quantize)
  if is_training_workdir(path):
    return _load_training_workdir(path, dtype, mesh, quantize, check, **overrides)
  try:
    checkpoint_files(path)
  except CheckpointError:
    raise CheckpointError(f"{path} is neither a Hugging Face folder (config.json + model weights), "
                          f"a qwenvl_jax checkpoint ({checkpoint.CONFIG_FILE} + params/) nor a train.py workdir "
                          f"(config.json + checkpoints/)") from None
  d = read_hf_config(path)
  if d.get("quantization_config"):
    q = d["quantization_config"]
    scheme = f"{q.get('quant_method', 'unknown')} {q.get('bits', '?')}-bit" if isinstance(q, dict) else str(q)
    raise CheckpointError(f"{path} holds pre-quantized weights ({scheme}); this project reads float checkpoints and "
                          "quantizes them itself (quantize='int8', Q-LoRA's lora.quantize): use the float checkpoint")
  fam = registry.for_model_type(d.get("model_type"))
  cfg = fam.from_hf_dict(d, **{**fam.folder_fields(path, d), **_dtype_overrides(dtype or "float32"), **overrides})
  check(cfg)
  shardings = None if mesh is None or quantize else param_shardings(cfg, mesh)
  place = quantization.Quantizer(cfg, quantize, mesh).place if quantize else None
  params = import_hf_params(path, cfg, fam.abstract_params(cfg), dtype=cfg.param_dtype, progress=progress,
                            shardings=shardings, place=place)
  return Loaded(fam, cfg, params, path, quantize)


def _load_training_workdir(path: str, dtype: str | None, mesh=None, quantize=None, check=lambda cfg: None,
                           **overrides) -> Loaded:
  """The params of the latest checkpoint of a `train.py` workdir (one stage), with its model config."""
  train_cfg = read_train_config(path)
  if train_cfg.get("lora") is not None and train_cfg.lora.get("rank"):
    return _load_lora_workdir(path, train_cfg, dtype, mesh, quantize, check, **overrides)
  stored = model_config(train_cfg).replace(**_dtype_overrides(dtype))
  fam = registry.family_of(stored)
  cfg = stored.replace(**overrides)
  check(cfg)
  params, step = checkpoint.load_training_params(path, fam.abstract_params(stored),
                                                 _stored_shardings(stored, mesh, quantize))
  return Loaded(fam, cfg, _placed(params, stored, cfg, mesh, quantize), None, quantize, step=step)


def _load_lora_workdir(path: str, train_cfg, dtype, mesh, quantize, check, **overrides) -> Loaded:
  """A LoRA / Q-LoRA run's workdir: its base (the run's `init`, read again) with the latest checkpoint's adapters
  merged in (into the dequantized base for Q-LoRA: what they were trained against). The adapters come along as
  `Loaded.lora` (for `qv.export_peft`)."""
  stored = model_config(train_cfg).replace(**_dtype_overrides(dtype))  # unrolled (model_config: LoRA)
  fam = registry.family_of(stored)
  cfg = stored.replace(**overrides)
  check(cfg)
  base, assets = start_params(train_cfg.init, stored, train_cfg.seed)
  trained = lora_trained(path, train_cfg, stored)
  params = merged(base, trained, stored)
  return Loaded(fam, cfg, _placed(params, stored, cfg, mesh, quantize), assets, quantize, lora=trained)


def read_train_config(workdir: str):
  """A train.py workdir's resolved config (config.json) as a ConfigDict."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} is not a train.py workdir (no config.json)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def lora_trained(path: str, train_cfg, cfg) -> LoraWeights:
  """The latest checkpoint's trained part of a LoRA workdir, read for model `cfg` (unrolled): one-line ValueError
  when its adapters do not fit that model (another shape, another rank or other targets)."""
  from flax.traverse_util import flatten_dict, unflatten_dict

  from qwenvl_jax.models import lora
  spec = lora.spec_from_config(train_cfg.get("lora"))
  if spec is None:
    raise ValueError(f"{path} is not a LoRA run (its config has lora.rank 0)")
  abstract = flatten_dict(lora.abstract_tree(cfg, spec))
  trained_abstract = unflatten_dict({p: abstract[p] for p in lora.trained_paths(abstract, train_cfg.lora.trainable)})
  try:
    trained, _ = checkpoint.load_training_params(path, trained_abstract, on_first_local_device(trained_abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: its adapters do not fit this model ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:200]})") from None
  return LoraWeights(spec, trained, train_cfg.lora.trainable)


def merged(base: dict, weights: LoraWeights, cfg) -> dict:
  """Float base parameters (unrolled) with a LoRA run's trained part merged in: adapters folded into their
  kernels; for Q-LoRA into the base as quantized and dequantized again, which is what they were trained against."""
  from qwenvl_jax.models import lora
  spec = weights.spec
  if spec.quantize:
    base = lora.dequantized(quantization.Quantizer(cfg, spec.quantize, module=lora.lora_module(cfg, spec))
                            .quantize_tree(base))
  return lora.merge(lora.with_adapters(base, weights.trained), spec)


def start_params(init, cfg, seed: int | None = None, mesh=None):
  """The weights a run starts from, per its `init` section, in `cfg`'s layer layout -> (params, assets dir or None).

  init.path: an HF folder, a model checkpoint or a train.py workdir (either layer layout; a LoRA run's adapters
  merged), read straight into `mesh`'s shards when given (else host / first device). init.source random: `seed`'s
  initialisation as a run makes it, or params None without a seed (the caller initialises in place, sharded).
  One-line ValueError when the weights are another model than `cfg`."""
  if init.source == "random":
    return (None if seed is None else _jitted_init(cfg)(jax.random.key(seed))), None
  if not os.path.exists(init.path):
    raise FileNotFoundError(f"init.path {init.path} does not exist")
  got = load(init.path, dtype=cfg.param_dtype, mesh=mesh, scan_layers=cfg.scan_layers)
  if type(got.config) is not type(cfg) or got.config.replace(
      param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat_policy=cfg.remat_policy) != cfg:
    raise ValueError(f"init.path {init.path}: its model config does not match the run's (model.name and "
                     "model.overrides)")
  if got.step is not None:
    log.warning("initialised from %s (step %d)", init.path, got.step)
  return got.params, got.assets_dir


@functools.lru_cache(maxsize=4)
def _jitted_init(cfg):
  """The compiled random initialisation of `cfg` (kept: the run, its loading and its tests build the same base)."""
  return jax.jit(lambda key: registry.family_of(cfg).init_params(cfg, key))

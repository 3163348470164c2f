"""The one loader under everything that reads weights: path -> (family, config, params).

It reads an HF folder (config.json `model_type` picks the family), this project's model checkpoint, or a `train.py`
workdir (the latest step of one stage). `qv.load` wraps the result in the model facade; the trainer uses it to
start a stage from HF weights. Nothing here imports the public API or the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from qwenvl_jax.convert import checkpoint
from qwenvl_jax.convert.hf import import_hf_params
from qwenvl_jax.convert.tensor_io import CheckpointError, checkpoint_files
from qwenvl_jax.models import registry
from qwenvl_jax.models.registry import Family
from qwenvl_jax.nn.layers import stack_layers, unstack_layers
from qwenvl_jax.sharding import logical_to_sharding


@dataclasses.dataclass
class Loaded:
  family: Family
  config: Any
  params: Any
  assets_dir: str | None   # where the tokenizer / processor files of this checkpoint are (None if nowhere)


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
  return registry.for_model_type(d.get("model_type")).from_hf_dict(d, **overrides)


def is_training_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "config.json"))


def model_config(c):
  """The model config a training config (`configs/*.py`, ml_collections) names in its `model` section."""
  m = c.model
  return registry.get_config(m.name, param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                             scan_layers=m.scan_layers)


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


def _placed(params, stored, cfg, mesh):
  """Params read in the stored layer layout -> the layout and shardings `cfg` asks for."""
  if stored.scan_layers == cfg.scan_layers:
    return params
  params = relayout(params, stored.scan_layers, cfg.scan_layers)
  return params if mesh is None else jax.device_put(params, param_shardings(cfg, mesh))


def load(path: str, dtype: str | None = "float32", progress=None, mesh=None, **overrides) -> Loaded:
  """Read the weights at `path` (HF folder | model checkpoint | train.py workdir).

  dtype: parameter and compute dtype ('float32' | 'bfloat16' | None = keep a checkpoint's own). overrides: config
  fields (e.g. scan_layers=False; any checkpoint converts to either layer layout). progress(n_bytes): HF import
  progress callback. mesh: a (data, fsdp, tensor) `jax.sharding.Mesh`: every parameter goes straight into its
  shards as it is read (HF tensor by tensor, Orbax with target shardings), so no host or device holds the whole
  model; without one, HF weights come back as host numpy arrays and checkpoints on the first device.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if checkpoint.is_checkpoint(path):
    stored = checkpoint.load_config(path).replace(**_dtype_overrides(dtype))
    fam = registry.family_of(stored)
    cfg = stored.replace(**overrides)
    shardings = None if mesh is None else param_shardings(stored, mesh)
    params = checkpoint.load(path, fam.abstract_params(stored), shardings)
    return Loaded(fam, cfg, _placed(params, stored, cfg, mesh), checkpoint.assets_dir(path))
  if is_training_workdir(path):
    return _load_training_workdir(path, dtype, mesh, **overrides)
  try:
    checkpoint_files(path)
  except CheckpointError:
    raise CheckpointError(f"{path} is neither a Hugging Face folder (config.json + model weights), "
                          f"a qwenvl_jax checkpoint ({checkpoint.CONFIG_FILE} + params/) nor a train.py workdir "
                          f"(config.json + checkpoints/)") from None
  d = read_hf_config(path)
  fam = registry.for_model_type(d.get("model_type"))
  cfg = fam.from_hf_dict(d, **_dtype_overrides(dtype or "float32"), **overrides)
  shardings = None if mesh is None else param_shardings(cfg, mesh)
  params = import_hf_params(path, cfg, fam.abstract_params(cfg), dtype=cfg.param_dtype, progress=progress,
                            shardings=shardings)
  return Loaded(fam, cfg, params, path)


def _load_training_workdir(path: str, dtype: str | None, mesh=None, **overrides) -> Loaded:
  """The params of the latest checkpoint of a `train.py` workdir (one stage), with its model config."""
  import ml_collections

  with open(os.path.join(path, "config.json")) as f:
    train_cfg = ml_collections.ConfigDict(json.load(f))
  stored = model_config(train_cfg).replace(**_dtype_overrides(dtype))
  fam = registry.family_of(stored)
  cfg = stored.replace(**overrides)
  abstract = fam.abstract_params(stored)
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, abstract)
  else:
    shardings = param_shardings(stored, mesh)
  params, _ = checkpoint.load_training_params(path, abstract, shardings)
  return Loaded(fam, cfg, _placed(params, stored, cfg, mesh), None)

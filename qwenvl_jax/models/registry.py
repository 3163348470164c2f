"""Which family a config, a config.json `model_type` or a named config belongs to.

A family is a folder `models/<name>/` whose `__init__.py` defines `FAMILY`, a `Family` record of what the shared
code (loading, conversion, training, inference) asks of it. Families are imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

# family name -> package; HF config.json model_type -> family name
FAMILY_PACKAGES = {"qwen_vl": "qwenvl_jax.models.qwen_vl", "qwen2_vl": "qwenvl_jax.models.qwen2_vl",
                   "internvl": "qwenvl_jax.models.internvl"}
MODEL_TYPES = {"qwen": "qwen_vl", "qwen2_vl": "qwen2_vl", "internvl": "internvl", "internvl_chat": "internvl"}


@dataclasses.dataclass(frozen=True)
class Family:
  """What a family provides. Callables take the family's config dataclass (`cfg`)."""
  name: str
  config_class: type
  named: dict                                  # preset name -> config
  from_hf_dict: Callable[..., Any]             # (config.json dict, **overrides) -> cfg
  to_hf_dict: Callable[..., dict]              # (cfg, torch_dtype) -> config.json dict
  from_json_dict: Callable[[dict], Any]        # this project's checkpoint config -> cfg
  to_json_dict: Callable[[Any], dict]
  module: Callable[[Any], Any]                 # cfg -> Flax module
  example_call: Callable[[Any], tuple]         # cfg -> (args, kwargs) of a module call reaching every parameter
  hf_slots: Callable[[Any], dict]              # cfg -> {HF key: Slot} (models/rules.py)
  ignored_hf_keys: Any                         # compiled regex of HF buffers skipped on import
  processor: Callable[..., Any]                # (cfg, **overrides) -> processor
  processor_from_pretrained: Callable[..., Any]  # (folder, cfg, **overrides) -> processor
  param_groups: Callable[[Any], Any]           # cfg -> ParamGroups
  image_flops: Callable[[Any, Any], float]     # (cfg, processor) -> forward FLOPs of one image's vision path
  inputs: Any                                  # module: host-side model inputs (models/<family>/inputs.py)
  hf_key_alias: Callable[[str], str] = lambda k: k   # HF key as written by other tools -> the canonical key
  # any-resolution families: (tokenizer, cfg, processor, DataConfig, patch_budget) -> sample encoder whose samples
  # are packed on tokens and patches (data/patch_packing.py); None: fixed image spans (data/pipeline.py)
  sample_encoder: Callable[..., Any] | None = None
  batch_vision_flops: Callable[[Any, dict], float] | None = None  # (cfg, packed batch) -> vision FLOPs it feeds
  # config fields an HF folder gives outside config.json (e.g. special token ids from its tokenizer files):
  # (folder, config.json dict) -> {field: value}
  folder_fields: Callable[[str, dict], dict] = lambda folder, d: {}
  hf_export_config: Callable[[Any], Any] = lambda cfg: cfg   # cfg -> the config whose name map export writes
  lora_targets: str = ""     # regex (full match) over module paths that LoRA adapts by default (models/lora.py)
  # HF module name (a checkpoint key less `.weight`) -> the name PEFT sees in the HF model's module tree
  peft_module_name: Callable[[str], str] = lambda name: name

  def init_params(self, cfg, rng, boxed: bool = False):
    """Random parameters of `cfg`'s module (through a call reaching every parameter); `boxed=True` keeps the
    logical-axis metadata."""
    import flax.linen as nn
    args, kw = self.example_call(cfg)
    params = self.module(cfg).init(rng, *args, **kw)["params"]
    return params if boxed else nn.meta.unbox(params)

  def abstract_params(self, cfg, boxed: bool = False):
    """Shapes and dtypes of every parameter (a tree of ShapeDtypeStruct); nothing is allocated."""
    import jax
    return jax.eval_shape(lambda: self.init_params(cfg, jax.random.key(0), boxed=boxed))

  def get_config(self, name, **overrides):
    if isinstance(name, self.config_class):
      cfg = name
    elif name in self.named:
      cfg = self.named[name]
    else:
      raise ValueError(f"unknown {self.name} model config {name!r}; known: {sorted(self.named)}")
    return cfg.replace(**overrides) if overrides else (cfg.validate() or cfg)


def family(name: str) -> Family:
  if name not in FAMILY_PACKAGES:
    raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILY_PACKAGES)}")
  return importlib.import_module(FAMILY_PACKAGES[name]).FAMILY


def for_model_type(model_type: str | None) -> Family:
  """The family of an HF config.json `model_type`."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type {model_type!r} is not supported; supported: {sorted(MODEL_TYPES)}")
  return family(MODEL_TYPES[model_type])


def family_of(cfg) -> Family:
  """The family of a config object."""
  for name in FAMILY_PACKAGES:
    fam = family(name)
    if isinstance(cfg, fam.config_class):
      return fam
  raise TypeError(f"{type(cfg).__name__} is not the config of any model family")


def named_configs() -> dict[str, Family]:
  """Every preset name -> its family."""
  return {n: fam for name in FAMILY_PACKAGES for fam in [family(name)] for n in fam.named}


def get_config(name, **overrides):
  """A named config of any family (or a config object) with optional field overrides."""
  if not isinstance(name, str):
    return family_of(name).get_config(name, **overrides)
  named = named_configs()
  if name not in named:
    raise ValueError(f"unknown model config {name!r}; known: {sorted(named)}")
  return named[name].get_config(name, **overrides)

"""InternVL configuration: dataclasses, the named configs, both config.json layouts, parameter groups.

Two checkpoint formats exist. The transformers-native one (`InternVLForConditionalGeneration`, model_type
`internvl`: `vision_config` + `text_config` of model_type qwen2 or llama) is read and written. The original OpenGVLab
remote-code one (`InternVLChatModel`, model_type `internvl_chat`: `vision_config` + `llm_config`, the LLM a
Qwen2ForCausalLM, LlamaForCausalLM or InternLM2ForCausalLM) is read: InternLM2 is a LLaMA-style decoder whose q/k/v
are packed in one `wqkv` matrix, so it becomes the `llama` text model here. `checkpoint_format` says which name map
the weights are read with; export always writes the native layout.

The original layout keeps `<IMG_CONTEXT>`'s id out of config.json (its chat code takes it from the tokenizer): the
loader reads it from the folder's tokenizer files (`image_token_id` below).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from qwenvl_jax.models import config_base
from qwenvl_jax.models.groups import ParamGroups
from qwenvl_jax.nn.decoder import DecoderSpec
from qwenvl_jax.nn.layers import ACTIVATIONS
from qwenvl_jax.nn.vit import ViTSpec

FAMILY = "internvl"
TEXT_MODEL_TYPES = ("qwen2", "llama")
CHECKPOINT_FORMATS = ("native", "original", "original_internlm2")
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
  """InternViT. Defaults are InternViT-300M-448px's (InternVL2.5 / InternVL3 up to 38B)."""
  hidden_size: int = 1024
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  intermediate_size: int = 4096
  image_size: int = 448
  patch_size: int = 14
  num_channels: int = 3
  attention_bias: bool = True
  use_qk_norm: bool = False
  norm_type: str = "layer_norm"     # layer_norm | rms_norm (InternViT-6B)
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  layer_scale_init_value: float = 0.1
  use_mean_pooling: bool = True     # False: a final LayerNorm after the blocks (`layernorm`)
  drop_path_rate: float = 0.0       # stochastic depth when training (the last block's rate; InternViT's linspace)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  text_model_type: str = "qwen2"    # qwen2 (q/k/v biases) | llama (`attention_bias` for q/k/v and o)
  vocab_size: int = 151674
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_hidden_layers: int = 24
  num_attention_heads: int = 14
  num_key_value_heads: int = 2
  head_dim_override: int | None = None   # text_config.head_dim when it is not hidden / heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  max_position_embeddings: int = 32768
  attention_bias: bool = False      # llama only
  tie_word_embeddings: bool = False
  image_token_id: int = 151667      # <IMG_CONTEXT>
  image_start_token_id: int | None = None   # <img> / </img>: only prompts use them (the model needs neither)
  image_end_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None
  downsample_ratio: float = 0.5
  projector_hidden_act: str = "gelu"
  vision_feature_layer: int = -1
  vision: InternVisionConfig = dataclasses.field(default_factory=InternVisionConfig)
  # what the processor tiles an image into (preprocessor_config.json overrides them)
  min_tiles: int = 1
  max_tiles: int = 12
  use_thumbnail: bool = True
  # Implementation switches (not part of the HF config).
  checkpoint_format: str = "native"  # the name map weights are read with (CHECKPOINT_FORMATS); export is native
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"

  @property
  def head_dim(self) -> int:
    return self.head_dim_override or self.hidden_size // self.num_attention_heads

  @property
  def merge(self) -> int:
    """Patches per side merged into one token by the pixel shuffle (2 for a ratio of 0.5)."""
    return round(1 / self.downsample_ratio)

  @property
  def tokens_per_tile(self) -> int:
    return (self.vision.grid // self.merge) ** 2

  @property
  def projector_in(self) -> int:
    return self.vision.hidden_size * self.merge ** 2

  @property
  def decoder(self) -> DecoderSpec:
    bias = self.text_model_type == "qwen2" or self.attention_bias
    return DecoderSpec(num_layers=self.num_hidden_layers, hidden=self.hidden_size, heads=self.num_attention_heads,
                       kv_heads=self.num_key_value_heads, head_dim=self.head_dim, mlp_dim=self.intermediate_size,
                       eps=self.rms_norm_eps, qkv_bias=bias,
                       out_bias=self.text_model_type == "llama" and self.attention_bias, mlp_bias=False,
                       dtype=self.dtype, param_dtype=self.param_dtype, scan=self.scan_layers,
                       remat=self.remat_policy)

  @property
  def vit(self) -> ViTSpec:
    v = self.vision
    return ViTSpec(width=v.hidden_size, layers=v.num_hidden_layers, heads=v.num_attention_heads,
                   mlp_dim=v.intermediate_size, activation=v.hidden_act, eps=v.layer_norm_eps, dtype=self.dtype,
                   param_dtype=self.param_dtype, scan=self.scan_layers, remat=self.remat_policy, norm=v.norm_type,
                   layer_scale=v.layer_scale_init_value or 1.0, qk_norm=v.use_qk_norm,
                   qkv_bias=v.attention_bias, drop_path=v.drop_path_rate)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)

  def replace(self, **kw) -> "InternVLConfig":
    return config_base.replace(self, "vision", **kw)

  def validate(self) -> None:
    def need(cond, msg):
      if not cond:
        raise ValueError(f"invalid model config: {msg}")
    v = self.vision
    need(self.text_model_type in TEXT_MODEL_TYPES,
         f"text model_type {self.text_model_type!r} not supported; supported: {list(TEXT_MODEL_TYPES)}")
    need(self.checkpoint_format in CHECKPOINT_FORMATS, f"checkpoint_format {self.checkpoint_format!r}")
    need(self.head_dim_override is not None or self.hidden_size % self.num_attention_heads == 0,
         f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
    need(self.num_attention_heads % self.num_key_value_heads == 0,
         f"num_attention_heads {self.num_attention_heads} not a multiple of num_key_value_heads "
         f"{self.num_key_value_heads}")
    need(v.hidden_size % v.num_attention_heads == 0,
         f"vision hidden_size {v.hidden_size} not divisible by num_attention_heads {v.num_attention_heads}")
    need(v.image_size % v.patch_size == 0, f"image_size {v.image_size} not a multiple of patch_size {v.patch_size}")
    need(abs(1 / self.downsample_ratio - self.merge) < 1e-6 and v.grid % self.merge == 0,
         f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the {v.grid}-patch grid")
    need(v.norm_type in ("layer_norm", "rms_norm"), f"vision norm_type {v.norm_type!r}: layer_norm | rms_norm")
    need(0 <= v.drop_path_rate < 1, f"vision drop_path_rate {v.drop_path_rate}: in [0, 1)")
    need(v.hidden_act in ACTIVATIONS and self.projector_hidden_act in ACTIVATIONS,
         f"activations {v.hidden_act!r} / {self.projector_hidden_act!r} not in {sorted(ACTIVATIONS)}")
    need(self.vision_feature_layer == -1,
         f"vision_feature_layer {self.vision_feature_layer}: only -1 (the last layer, every released model) is "
         "supported")
    need(0 <= self.image_token_id < self.vocab_size,
         f"image_token_id {self.image_token_id} outside the vocabulary [0, {self.vocab_size})")
    need(1 <= self.min_tiles <= self.max_tiles, f"need 1 <= min_tiles <= max_tiles; got {self.min_tiles}, "
         f"{self.max_tiles}")
    config_base.check_switches(self, need)


def _vision(**kw) -> InternVisionConfig:
  return InternVisionConfig(**kw)


# OpenGVLab/InternVL3-{1B,8B}-hf config.json (InternViT-300M-448px + Qwen2.5 0.5B / 7B).
_INTERNVL3_IDS = dict(image_token_id=151667, image_start_token_id=151665, image_end_token_id=151666)
INTERNVL3_1B = InternVLConfig(**_INTERNVL3_IDS)
INTERNVL3_8B = InternVLConfig(
    vocab_size=151674, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, **_INTERNVL3_IDS)

# Same dimensions as the golden fixture model (tests/fixtures/internvl_tiny).
INTERNVL_TINY = InternVLConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, image_token_id=490, image_start_token_id=488,
    image_end_token_id=489, bos_token_id=492, eos_token_id=493, pad_token_id=491,
    vision=_vision(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56))

NAMED = {"internvl3_1b": INTERNVL3_1B, "internvl3_8b": INTERNVL3_8B, "internvl_tiny": INTERNVL_TINY}


def param_groups(cfg: InternVLConfig) -> ParamGroups:
  """Which parameters are InternViT, the MLP projector and the LLM (freezing, LR scales, layer-wise decay)."""
  return ParamGroups(vision=r"^vision/", adapter=r"^projector/", llm=r"^(wte|decoder|lm_head)/",
                     vit_layers=cfg.vision.num_hidden_layers, vit_embeddings=r"^vision/(patch_embed|cls|pos_embed)",
                     vit_blocks="vision/layers", no_decay=r"(/bias$|/scale$|pos_embed$|/cls$|/ls[12]$)")


# --- Hugging Face config.json ------------------------------------------------------------------

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id")
_VISION_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
                "layer_norm_eps", "hidden_act", "norm_type", "use_mean_pooling", "drop_path_rate")
# the original InternViT config's names for the same fields
_ORIGINAL_VISION = {"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm",
                    "initializer_factor": "layer_scale_init_value"}


def _text_fields(t: dict) -> dict:
  arch = t.get("model_type")
  if arch not in ("qwen2", "llama", "internlm2"):
    raise ValueError(f"config.json: language model {arch!r} is not supported; supported: qwen2, llama (and "
                     "internlm2 in the original format)")
  if t.get("use_sliding_window"):
    raise ValueError("config.json sets use_sliding_window: sliding-window attention is not supported")
  rope = dict(t.get("rope_scaling") or t.get("rope_parameters") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", "dynamic"):  # dynamic NTK changes nothing within max_position_embeddings
    raise ValueError(f"config.json: rope scaling {kind!r} is not supported (default or dynamic only)")
  kw: dict[str, Any] = {k: t[k] for k in _TEXT_KEYS if k in t}
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = tuple(kw["eos_token_id"])
  kw["rope_theta"] = float(rope.get("rope_theta", t.get("rope_theta", 10000.0)))
  kw["text_model_type"] = "qwen2" if arch == "qwen2" else "llama"
  if arch != "qwen2":
    kw["attention_bias"] = bool(t.get("attention_bias", t.get("bias", False)))
  if t.get("head_dim") and t["head_dim"] != t["hidden_size"] // t["num_attention_heads"]:
    kw["head_dim_override"] = int(t["head_dim"])
  return kw


def _image_size(v) -> int:
  size = v if isinstance(v, int) else v[0] if isinstance(v, (list, tuple)) else None
  if size is None or (isinstance(v, (list, tuple)) and len(set(v)) != 1):
    raise ValueError(f"config.json: image_size {v!r}: square tiles only")
  return int(size)


def from_hf_dict(d: dict, **overrides) -> InternVLConfig:
  """config.json of either format (module docstring) -> InternVLConfig (unknown keys are ignored)."""
  mt = d.get("model_type")
  if mt == "internvl":
    kw = _text_fields(d.get("text_config") or {})
    vd = d.get("vision_config") or {}
    vis = {k: vd[k] for k in _VISION_KEYS if k in vd}
    vis.update(attention_bias=bool(vd.get("attention_bias", True)), use_qk_norm=bool(vd.get("use_qk_norm", False)),
               layer_scale_init_value=float(vd.get("layer_scale_init_value", 0.1)),
               image_size=_image_size(vd.get("image_size", 448)),
               patch_size=_image_size(vd.get("patch_size", 14)))
    kw.update(image_token_id=d.get("image_token_id", 151667), downsample_ratio=float(d.get("downsample_ratio", 0.5)),
              projector_hidden_act=d.get("projector_hidden_act", "gelu"),
              vision_feature_layer=d.get("vision_feature_layer", -1), checkpoint_format="native")
    if d.get("vision_feature_select_strategy", "default") != "default":
      raise ValueError("config.json: vision_feature_select_strategy must be 'default' (the class token dropped)")
    kw["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", kw.get("tie_word_embeddings", False)))
  elif mt == "internvl_chat":
    if "image_token_id" not in overrides:
      raise ValueError("the original InternVL config.json does not give <IMG_CONTEXT>'s id and no tokenizer file of "
                       "the folder does (added_tokens.json, tokenizer_config.json, tokenizer.json): pass "
                       "image_token_id=...")
    llm = d.get("llm_config") or {}
    kw = _text_fields(llm)
    vd = dict(d.get("vision_config") or {})
    if d.get("ps_version", "v2") != "v2":
      raise ValueError(f"config.json: ps_version {d.get('ps_version')!r}: only v2 (every InternVL 1.5+ model)")
    vis = {k: vd[k] for k in _VISION_KEYS if k in vd}
    vis.update({ours: vd[theirs] for theirs, ours in _ORIGINAL_VISION.items() if theirs in vd})
    vis.update(image_size=_image_size(d.get("force_image_size") or vd.get("image_size", 448)),
               patch_size=_image_size(vd.get("patch_size", 14)), use_mean_pooling=True)
    kw.update(downsample_ratio=float(d.get("downsample_ratio", 0.5)), projector_hidden_act="gelu",
              vision_feature_layer=d.get("select_layer", -1), use_thumbnail=bool(d.get("use_thumbnail", True)),
              min_tiles=int(d.get("min_dynamic_patch", 1)), max_tiles=int(d.get("max_dynamic_patch", 12)),
              checkpoint_format="original_internlm2" if llm.get("model_type") == "internlm2" else "original")
    kw["tie_word_embeddings"] = False  # InternVLChatConfig forces it
    if not d.get("dynamic_image_size", True):
      kw["max_tiles"] = 1
  else:
    raise ValueError(f"config.json has model_type {mt!r}; expected 'internvl' or 'internvl_chat'")
  kw.update({k: overrides.pop(k) for k in ("image_token_id", "image_start_token_id", "image_end_token_id")
             if k in overrides})
  try:
    cfg = InternVLConfig(**kw, vision=InternVisionConfig(**vis))
  except TypeError as e:
    raise ValueError(f"config.json: {e}") from None
  return cfg.replace(**overrides) if overrides else (cfg.validate() or cfg)


def special_token_ids(folder: str) -> dict[str, int]:
  """<img>, </img>, <IMG_CONTEXT> ids of an HF folder's tokenizer files (added_tokens.json, tokenizer_config.json's
  added_tokens_decoder, tokenizer.json's added_tokens, processor_config.json), as field names of InternVLConfig;
  {} if none says."""
  names = {IMG_CONTEXT: "image_token_id", IMG_START: "image_start_token_id", IMG_END: "image_end_token_id"}
  found: dict[str, int] = {}

  def read(name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, ValueError):
      return None
  added = read("added_tokens.json") or {}
  pairs = list(added.items()) if isinstance(added, dict) else []
  decoder = (read("tokenizer_config.json") or {}).get("added_tokens_decoder") or {}
  pairs += [(t.get("content"), int(i)) for i, t in decoder.items() if isinstance(t, dict)]
  pairs += [(t.get("content"), t.get("id")) for t in (read("tokenizer.json") or {}).get("added_tokens") or []]
  proc = read("processor_config.json") or {}  # the native InternVLProcessor's own record of the three ids
  pairs += [(token, proc.get(key)) for token, key in ((IMG_START, "start_image_token_id"),
                                                      (IMG_END, "end_image_token_id"),
                                                      (IMG_CONTEXT, "context_image_token_id"))]
  for token, i in pairs:
    if token in names and isinstance(i, int):
      found.setdefault(names[token], i)
  return found


def to_hf_dict(cfg: InternVLConfig, torch_dtype: str = "bfloat16") -> dict:
  """InternVLConfig -> config.json of `InternVLForConditionalGeneration` (the transformers-native layout)."""
  v = cfg.vision
  text: dict[str, Any] = {
      "model_type": cfg.text_model_type, "hidden_act": "silu", "rope_theta": cfg.rope_theta,
      "attention_dropout": 0.0, "use_cache": True, "head_dim": cfg.head_dim,
      "architectures": ["Qwen2ForCausalLM" if cfg.text_model_type == "qwen2" else "LlamaForCausalLM"]}
  for k in _TEXT_KEYS:
    value = getattr(cfg, k)
    if value is not None:
      text[k] = list(value) if isinstance(value, tuple) else value
  if cfg.text_model_type == "qwen2":
    text.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers)
  else:
    text.update(attention_bias=cfg.attention_bias, mlp_bias=False)
  vision = {"model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "intermediate_size": v.intermediate_size,
            "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.num_channels, "attention_bias": v.attention_bias, "use_qk_norm": v.use_qk_norm,
            "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "layer_scale_init_value": v.layer_scale_init_value, "use_mean_pooling": v.use_mean_pooling,
            "use_absolute_position_embeddings": True, "use_mask_token": False, "attention_dropout": 0.0,
            "projection_dropout": 0.0, "hidden_dropout_prob": 0.0}
  return {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
          "downsample_ratio": cfg.downsample_ratio, "image_token_id": cfg.image_token_id,
          "image_seq_length": cfg.tokens_per_tile, "projector_hidden_act": cfg.projector_hidden_act,
          "vision_feature_layer": cfg.vision_feature_layer, "vision_feature_select_strategy": "default",
          "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": torch_dtype, "text_config": text,
          "vision_config": vision}


def to_json_dict(cfg: InternVLConfig) -> dict:
  return config_base.to_json(cfg, FAMILY)


def from_json_dict(d: dict) -> InternVLConfig:
  def ids(x):
    return tuple(x) if isinstance(x, list) else x
  return config_base.from_json(InternVLConfig, InternVisionConfig, "vision", d, eos_token_id=ids)

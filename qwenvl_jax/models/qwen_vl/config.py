"""Qwen-VL (v1) configuration: dataclasses, the named configs, the HF `config.json` mapping, parameter groups.

A `QwenVLConfig` is frozen and hashable so it can be a static argument of `jax.jit`.
Field names follow the official Qwen-VL `config.json` where one exists, so the mapping
to and from Hugging Face is a rename at most.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwenvl_jax.models import config_base
from qwenvl_jax.models.groups import ParamGroups
from qwenvl_jax.nn.decoder import DecoderSpec
from qwenvl_jax.nn.vit import ViTSpec

FAMILY = "qwen_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT + resampler. Defaults are the official Qwen-VL ViT-bigG/14."""
  image_size: int = 448
  patch_size: int = 14
  width: int = 1664
  layers: int = 48
  heads: int = 16
  mlp_ratio: float = 4.9231
  output_dim: int = 4096      # resampler width == decoder hidden size
  n_queries: int = 256        # a square number: queries sit on a sqrt(n) x sqrt(n) grid
  image_start_id: int = 151857  # <img>; </img> = +1, <imgpad> = +2 (as the official code assumes)
  pos_table_size: int = 256   # learned ViT positions: a 16x16 table resized to the patch grid
  layer_norm_eps: float = 1e-6

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def resampler_heads(self) -> int:
    return self.output_dim // 128

  @property
  def image_end_id(self) -> int:
    return self.image_start_id + 1

  @property
  def image_pad_id(self) -> int:
    return self.image_start_id + 2


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  """Decoder fields use the official `config.json` names; `visual` is the vision tower."""
  vocab_size: int = 151936
  hidden_size: int = 4096
  num_attention_heads: int = 32
  kv_channels: int = 128
  num_hidden_layers: int = 32
  intermediate_size: int = 22016  # official convention: each of w1/w2 is intermediate_size // 2 wide
  seq_length: int = 2048          # training context; dynamic NTK / logn start beyond it
  max_position_embeddings: int = 8192
  rotary_emb_base: float = 10000.0
  rotary_pct: float = 1.0
  layer_norm_epsilon: float = 1e-6
  use_dynamic_ntk: bool = True    # inference only, as in the official code
  use_logn_attn: bool = True      # inference only, as in the official code
  no_bias: bool = True            # biases off for c_proj / MLP; c_attn always has a bias
  visual: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  # Implementation switches (not part of the HF config).
  param_dtype: str = "float32"
  dtype: str = "float32"          # compute dtype; norms, softmax and RoPE always run in float32
  scan_layers: bool = True
  remat_policy: str = "none"      # none | full | dots_saveable | dots_with_no_batch_dims_saveable

  @property
  def head_dim(self) -> int:
    return self.kv_channels

  @property
  def mlp_dim(self) -> int:
    return self.intermediate_size // 2

  @property
  def rotary_dim(self) -> int:
    return int(self.kv_channels * self.rotary_pct)

  @property
  def decoder(self) -> DecoderSpec:
    return DecoderSpec(num_layers=self.num_hidden_layers, hidden=self.hidden_size, heads=self.num_attention_heads,
                       kv_heads=self.num_attention_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
                       eps=self.layer_norm_epsilon, qkv_bias=True, out_bias=not self.no_bias,
                       mlp_bias=not self.no_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       scan=self.scan_layers, remat=self.remat_policy)

  @property
  def vit(self) -> ViTSpec:
    v = self.visual
    return ViTSpec(width=v.width, layers=v.layers, heads=v.heads, mlp_dim=v.mlp_dim, activation="gelu",
                   eps=v.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, scan=self.scan_layers,
                   remat=self.remat_policy)

  def replace(self, **kw) -> "QwenVLConfig":
    return config_base.replace(self, "visual", **kw)

  def validate(self) -> None:
    def need(cond, msg):
      if not cond:
        raise ValueError(f"invalid model config: {msg}")
    need(self.hidden_size == self.num_attention_heads * self.kv_channels,
         f"hidden_size {self.hidden_size} != num_attention_heads {self.num_attention_heads} * kv_channels {self.kv_channels}")
    need(self.rotary_dim % 2 == 0, "rotary dimension must be even")
    v = self.visual
    need(v.output_dim == self.hidden_size, f"visual.output_dim {v.output_dim} != hidden_size {self.hidden_size}")
    need(v.width % v.heads == 0, f"visual.width {v.width} not divisible by visual.heads {v.heads}")
    need(v.output_dim % 128 == 0, "visual.output_dim must be a multiple of 128 (resampler heads = output_dim // 128)")
    need(int(round(v.n_queries ** 0.5)) ** 2 == v.n_queries, f"visual.n_queries {v.n_queries} is not a square")
    need(int(round(v.pos_table_size ** 0.5)) ** 2 == v.pos_table_size, "visual.pos_table_size must be a square")
    need(v.image_size % v.patch_size == 0, "visual.image_size must be a multiple of patch_size")
    need(v.image_pad_id < self.vocab_size, f"image token ids {v.image_start_id}..{v.image_pad_id} outside vocab {self.vocab_size}")
    config_base.check_switches(self, need)


# The official Qwen-VL / Qwen-VL-Chat checkpoint.
QWEN_VL_7B = QwenVLConfig()

# Same dimensions as the golden fixture model (tests/fixtures/qwen_vl_tiny).
QWEN_VL_TINY = QwenVLConfig(
    vocab_size=320, hidden_size=256, num_attention_heads=4, kv_channels=64, num_hidden_layers=2,
    intermediate_size=512, seq_length=64, max_position_embeddings=512,
    visual=VisionConfig(image_size=112, patch_size=14, width=96, layers=2, heads=4, mlp_ratio=2.0,
                        output_dim=256, n_queries=16, image_start_id=300))

# Small model for the embedded demo on a 2-core CPU; vocabulary and image ids are those of the SentencePiece
# tokenizer trained on the shapes dataset (`qwenvl_jax.data.shapes.train_tokenizer`: 1024 pieces, <img> = 215).
QWEN_VL_DEMO = QwenVLConfig(
    vocab_size=1024, hidden_size=256, num_attention_heads=4, kv_channels=64, num_hidden_layers=4,
    intermediate_size=1024, seq_length=512, max_position_embeddings=2048,
    visual=VisionConfig(image_size=112, patch_size=14, width=192, layers=4, heads=4, mlp_ratio=4.0,
                        output_dim=256, n_queries=16, image_start_id=215))

NAMED = {"qwen_vl_7b": QWEN_VL_7B, "qwen_vl_tiny": QWEN_VL_TINY, "qwen_vl_demo": QWEN_VL_DEMO}

# The resampler's 2-D sin-cos table is a parameter of the official checkpoint that training keeps fixed.
_FIXED = r"^resampler/pos_embed$"

# Freezing per stage of the paper's recipe (regexes on parameter paths): stage 1 trains the ViT and adapter with the
# LLM frozen, stage 2 trains everything, stage 3 freezes the ViT.
STAGE_FREEZE = {
    "stage1": (r"^(wte|decoder|lm_head)/", _FIXED),
    "stage2": (_FIXED,),
    "stage3": (r"^visual/", _FIXED),
    # the official finetune.py's fix_vit (full fine-tuning): the ViT frozen except `attn_pool`, trained whole (its
    # pos_embed too); the ViT's ln_post and proj (here under resampler/) stay frozen with the rest of the ViT
    "finetune": (r"^visual/", r"^resampler/(ln_post|proj)(/|$)"),
}


def param_groups(cfg: QwenVLConfig) -> ParamGroups:
  """Which parameters are the ViT, the adapter (resampler) and the LLM, for freezing, LR scales and LLRD."""
  return ParamGroups(vision=r"^visual/", adapter=r"^resampler/", llm=r"^(wte|decoder|lm_head)/",
                     vit_layers=cfg.visual.layers, vit_embeddings=r"^visual/(patch_embed|pos_embed|ln_pre/)")


def get_config(name: str | QwenVLConfig, **overrides) -> QwenVLConfig:
  """A named config (see `NAMED`) with optional field overrides."""
  if isinstance(name, QwenVLConfig):
    cfg = name
  elif name in NAMED:
    cfg = NAMED[name]
  else:
    raise ValueError(f"unknown model config {name!r}; known: {sorted(NAMED)}")
  return cfg.replace(**overrides) if overrides else (cfg.validate() or cfg)


# --- Hugging Face config.json ------------------------------------------------------------------

_HF_DECODER_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "kv_channels", "num_hidden_layers",
                    "intermediate_size", "seq_length", "max_position_embeddings", "rotary_emb_base",
                    "rotary_pct", "layer_norm_epsilon", "use_dynamic_ntk", "use_logn_attn", "no_bias")
_HF_VISUAL_KEYS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim",
                   "n_queries", "image_start_id")


def from_hf_dict(d: dict, **overrides) -> QwenVLConfig:
  """Official QWenConfig JSON -> QwenVLConfig (unknown HF keys are ignored)."""
  if d.get("model_type") not in (None, "qwen"):
    raise ValueError(f"config.json has model_type {d.get('model_type')!r}; expected 'qwen' (Qwen-VL v1)")
  if "visual" not in d:
    raise ValueError("config.json has no 'visual' section: not a Qwen-VL checkpoint")
  dec = {k: d[k] for k in _HF_DECODER_KEYS if k in d}
  vis = {k: d["visual"][k] for k in _HF_VISUAL_KEYS if k in d["visual"]}
  if "rotary_emb_base" in dec:
    dec["rotary_emb_base"] = float(dec["rotary_emb_base"])
  cfg = QwenVLConfig(**dec, visual=VisionConfig(**vis))
  return cfg.replace(**overrides) if overrides else (cfg.validate() or cfg)


def to_hf_dict(cfg: QwenVLConfig, torch_dtype: str = "bfloat16") -> dict:
  """QwenVLConfig -> a config.json the official remote code loads."""
  d: dict[str, Any] = {
      "architectures": ["QWenLMHeadModel"],
      "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                   "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
      "model_type": "qwen",
      "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0, "initializer_range": 0.02,
      "scale_attn_weights": True, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
      "use_cache": True, "use_flash_attn": False,
      # all three false = the official code picks bf16/fp16/fp32 from the hardware (as the released
      # checkpoints do); a true flag would force that precision even when torch_dtype asks otherwise
      "bf16": False, "fp16": False, "fp32": False,
      "torch_dtype": torch_dtype,
  }
  for k in _HF_DECODER_KEYS:
    d[k] = getattr(cfg, k)
  if float(cfg.rotary_emb_base).is_integer():
    d["rotary_emb_base"] = int(cfg.rotary_emb_base)
  d["visual"] = {k: getattr(cfg.visual, k) for k in _HF_VISUAL_KEYS}
  return dict(sorted(d.items()))


def to_json_dict(cfg: QwenVLConfig) -> dict:
  return config_base.to_json(cfg, FAMILY)


def from_json_dict(d: dict) -> QwenVLConfig:
  return config_base.from_json(QwenVLConfig, VisionConfig, "visual", d)

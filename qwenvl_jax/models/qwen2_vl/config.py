"""Qwen2-VL configuration: dataclasses, the named configs, the HF `config.json` mapping (both layouts), groups.

Field names follow the HF config. config.json comes in two layouts: the flat one of the published checkpoints (text
fields at the top, `rope_scaling.mrope_section`) and the nested one transformers 5 writes (`text_config`,
`rope_parameters`); `from_hf_dict` reads both, `to_hf_dict` writes the flat one (read by transformers 4.45+ and 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwenvl_jax.data.hf_tokenizer import added_token_ids
from qwenvl_jax.models import config_base
from qwenvl_jax.models.groups import ParamGroups
from qwenvl_jax.nn.decoder import DecoderSpec
from qwenvl_jax.nn.layers import ACTIVATIONS
from qwenvl_jax.nn.vit import ViTSpec

FAMILY = "qwen2_vl"
POSITION_RULES = ("paper", "transformers_5_23")


@dataclasses.dataclass(frozen=True)
class Qwen2VisionConfig:
  """The ViT with 2-D RoPE and the 2x2 patch merger. Defaults are the released 7B's."""
  depth: int = 32
  embed_dim: int = 1280
  hidden_size: int = 3584          # merger output = the LLM width
  mlp_ratio: float = 4.0
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  hidden_act: str = "quick_gelu"
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  @property
  def patch_dim(self) -> int:
    """Length of one processor patch row: C * T * p * p."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_dim(self) -> int:
    return self.embed_dim * self.spatial_merge_size ** 2


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  image_token_id: int = 151655
  video_token_id: int = 151656
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None
  vision: Qwen2VisionConfig = dataclasses.field(default_factory=Qwen2VisionConfig)
  # Implementation switches (not part of the HF config).
  position_rule: str = "paper"     # text after a vision block: paper (1 + max over t/h/w) | transformers_5_23
  param_dtype: str = "float32"
  dtype: str = "float32"           # compute dtype; norms, softmax and RoPE always run in float32
  scan_layers: bool = True
  remat_policy: str = "none"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def decoder(self) -> DecoderSpec:
    return DecoderSpec(num_layers=self.num_hidden_layers, hidden=self.hidden_size, heads=self.num_attention_heads,
                       kv_heads=self.num_key_value_heads, head_dim=self.head_dim, mlp_dim=self.intermediate_size,
                       eps=self.rms_norm_eps, qkv_bias=True, out_bias=False, mlp_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, scan=self.scan_layers, remat=self.remat_policy)

  @property
  def vit(self) -> ViTSpec:
    v = self.vision
    return ViTSpec(width=v.embed_dim, layers=v.depth, heads=v.num_heads, mlp_dim=v.mlp_dim, activation=v.hidden_act,
                   eps=v.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, scan=self.scan_layers,
                   remat=self.remat_policy)

  def replace(self, **kw) -> "Qwen2VLConfig":
    if "mrope_section" in kw:
      kw["mrope_section"] = tuple(kw["mrope_section"])
    return config_base.replace(self, "vision", **kw)

  def validate(self) -> None:
    def need(cond, msg):
      if not cond:
        raise ValueError(f"invalid model config: {msg}")
    need(self.hidden_size % self.num_attention_heads == 0,
         f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
    need(self.num_attention_heads % self.num_key_value_heads == 0,
         f"num_attention_heads {self.num_attention_heads} not a multiple of num_key_value_heads "
         f"{self.num_key_value_heads}")
    need(len(self.mrope_section) == 3 and 2 * sum(self.mrope_section) == self.head_dim,
         f"mrope_section {list(self.mrope_section)} must be 3 sizes summing to head_dim / 2 = {self.head_dim // 2}")
    v = self.vision
    need(v.embed_dim % v.num_heads == 0, f"vision embed_dim {v.embed_dim} not divisible by num_heads {v.num_heads}")
    need(v.head_dim % 4 == 0, f"vision head_dim {v.head_dim} must be a multiple of 4 (2-D RoPE)")
    need(v.hidden_size == self.hidden_size, f"vision hidden_size {v.hidden_size} != hidden_size {self.hidden_size}")
    need(v.hidden_act in ACTIVATIONS, f"vision hidden_act {v.hidden_act!r} not in {sorted(ACTIVATIONS)}")
    ids = {"vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
           "image_token_id": self.image_token_id, "video_token_id": self.video_token_id}
    for name, i in ids.items():
      need(0 <= i < self.vocab_size, f"{name} {i} outside the vocabulary [0, {self.vocab_size})")
    need(len(set(ids.values())) == 4, f"vision token ids must differ: {ids}")
    need(self.position_rule in POSITION_RULES, f"position_rule {self.position_rule!r} not in {POSITION_RULES}")
    config_base.check_switches(self, need)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def _vision(**kw) -> Qwen2VisionConfig:
  return Qwen2VisionConfig(**kw)


# The released checkpoints (Qwen/Qwen2-VL-{2B,7B,72B}-Instruct config.json).
QWEN2_VL_2B = Qwen2VLConfig(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, tie_word_embeddings=True, vision=_vision(hidden_size=1536))
QWEN2_VL_7B = Qwen2VLConfig()
QWEN2_VL_72B = Qwen2VLConfig(
    hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    rms_norm_eps=1e-6, vision=_vision(hidden_size=8192))

# Same dimensions as the golden fixture model (tests/fixtures/qwen2_vl_tiny).
QWEN2_VL_TINY = Qwen2VLConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, mrope_section=(2, 3, 3), max_position_embeddings=2048, tie_word_embeddings=True,
    vision_start_token_id=480, vision_end_token_id=481, image_token_id=482, video_token_id=483, bos_token_id=485,
    eos_token_id=486, pad_token_id=484,
    vision=_vision(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=4))

# The shapes demo (configs/qwen2_vl_demo.py): its tokenizer.json is trained on the shapes texts with Qwen2-VL's
# added tokens at the top of 1024 ids (`data.shapes.train_tokenizer_json`), so the ids below are those.
_DEMO_IDS = added_token_ids(1024)
QWEN2_VL_DEMO = Qwen2VLConfig(
    vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, mrope_section=(8, 12, 12), max_position_embeddings=4096, tie_word_embeddings=True,
    vision_start_token_id=_DEMO_IDS["<|vision_start|>"], vision_end_token_id=_DEMO_IDS["<|vision_end|>"],
    image_token_id=_DEMO_IDS["<|image_pad|>"], video_token_id=_DEMO_IDS["<|video_pad|>"],
    bos_token_id=_DEMO_IDS["<|endoftext|>"], eos_token_id=_DEMO_IDS["<|im_end|>"],
    vision=_vision(depth=4, embed_dim=192, hidden_size=256, mlp_ratio=4.0, num_heads=4))

NAMED = {"qwen2_vl_2b": QWEN2_VL_2B, "qwen2_vl_7b": QWEN2_VL_7B, "qwen2_vl_72b": QWEN2_VL_72B,
         "qwen2_vl_tiny": QWEN2_VL_TINY, "qwen2_vl_demo": QWEN2_VL_DEMO}

# Freezing per stage of the paper's recipe: stage 1 trains the ViT and merger (LLM frozen), stage 2 everything,
# stage 3 (instruction tuning) freezes the ViT.
STAGE_FREEZE = {
    "stage1": (r"^(wte|decoder|lm_head)/",),
    "stage2": (),
    "stage3": (r"^visual/",),
}
# The stage configs' image range (our choice; the paper gives none): at least 56x56 px, at most 1024 merged tokens,
# i.e. 4096 ViT patches, so the largest image fits a row's patch budget alone.
STAGE_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 1024 * 28 * 28}


def param_groups(cfg: Qwen2VLConfig) -> ParamGroups:
  """Which parameters are the ViT, the adapter (patch merger) and the LLM, for freezing, LR scales and LLRD."""
  return ParamGroups(vision=r"^visual/", adapter=r"^merger/", llm=r"^(wte|decoder|lm_head)/",
                     vit_layers=cfg.vision.depth, vit_embeddings=r"^visual/patch_embed$")


# --- Hugging Face config.json ------------------------------------------------------------------

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id",
              "pad_token_id")
_TOKEN_KEYS = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
_VISION_KEYS = ("depth", "embed_dim", "hidden_size", "mlp_ratio", "num_heads", "in_channels", "patch_size",
                "spatial_merge_size", "temporal_patch_size", "hidden_act")


def from_hf_dict(d: dict, **overrides) -> Qwen2VLConfig:
  """Qwen2-VL config.json (flat or nested layout) -> Qwen2VLConfig (unknown HF keys are ignored)."""
  if d.get("model_type") != "qwen2_vl":
    raise ValueError(f"config.json has model_type {d.get('model_type')!r}; expected 'qwen2_vl'")
  text = {**d, **(d.get("text_config") or {})}  # nested: text fields live under text_config
  if text.get("use_sliding_window"):
    raise ValueError("config.json sets use_sliding_window: sliding-window attention is not supported")
  rope = {}
  for src in (d, text):
    for key in ("rope_scaling", "rope_parameters"):
      rope.update(src.get(key) or {})
  kw: dict[str, Any] = {k: text[k] for k in _TEXT_KEYS if k in text}
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = tuple(kw["eos_token_id"])
  kw.update({k: d[k] for k in _TOKEN_KEYS if k in d})
  kw["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
  if "mrope_section" in rope:
    kw["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
  kw["tie_word_embeddings"] = bool(d.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
  vd = dict(d.get("vision_config") or {})
  if "in_chans" in vd:
    vd.setdefault("in_channels", vd["in_chans"])
  vis = {k: vd[k] for k in _VISION_KEYS if k in vd}
  vrope = vd.get("rope_parameters") or {}
  if "rope_theta" in vrope:
    vis["rope_theta"] = float(vrope["rope_theta"])
  if "mlp_ratio" in vis:
    vis["mlp_ratio"] = float(vis["mlp_ratio"])
  try:
    cfg = Qwen2VLConfig(**kw, vision=Qwen2VisionConfig(**vis))
  except TypeError as e:
    raise ValueError(f"config.json: {e}") from None
  return cfg.replace(**overrides) if overrides else (cfg.validate() or cfg)


def to_hf_dict(cfg: Qwen2VLConfig, torch_dtype: str = "bfloat16") -> dict:
  """Qwen2VLConfig -> config.json in the flat layout of the published checkpoints."""
  v = cfg.vision
  mlp_ratio = int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio
  d: dict[str, Any] = {
      "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
      "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
      "use_sliding_window": False, "sliding_window": cfg.max_position_embeddings,
      "max_window_layers": cfg.num_hidden_layers, "rope_theta": cfg.rope_theta,
      "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
      "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": torch_dtype,
      "vision_config": {"depth": v.depth, "embed_dim": v.embed_dim, "hidden_size": v.hidden_size,
                        "hidden_act": v.hidden_act, "mlp_ratio": mlp_ratio, "num_heads": v.num_heads,
                        "in_channels": v.in_channels, "patch_size": v.patch_size,
                        "spatial_merge_size": v.spatial_merge_size,
                        "temporal_patch_size": v.temporal_patch_size,
                        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}},
  }
  for k in _TEXT_KEYS + _TOKEN_KEYS:
    value = getattr(cfg, k)
    if value is not None:
      d[k] = list(value) if isinstance(value, tuple) else value
  return dict(sorted(d.items()))


def to_json_dict(cfg: Qwen2VLConfig) -> dict:
  return config_base.to_json(cfg, FAMILY)


def from_json_dict(d: dict) -> Qwen2VLConfig:
  def ids(x):
    return tuple(x) if isinstance(x, list) else x
  return config_base.from_json(Qwen2VLConfig, Qwen2VisionConfig, "vision", d, mrope_section=tuple, eos_token_id=ids)

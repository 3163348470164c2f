"""InternVL <-> Hugging Face checkpoints: the native name map (read and written) and the original one (read).

Native (`InternVLForConditionalGeneration` as save_pretrained writes it):
  language_model.model.{embed_tokens, layers.N.*, norm} / language_model.lm_head     decoder (Qwen2 or LLaMA)
  vision_tower.embeddings.{cls_token [1,1,W], patch_embeddings.projection [W,3,p,p], position_embeddings [1,T,W]}
  vision_tower.encoder.layer.N.{attention.{q,k,v}_proj, attention.projection_layer, attention.{q,k}_norm,
      lambda_1, lambda_2, layernorm_before, layernorm_after, mlp.fc1, mlp.fc2}
  multi_modal_projector.{layer_norm, linear_1, linear_2}
Original OpenGVLab (`InternVLChatModel`):
  vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}
  vision_model.encoder.layers.N.{norm1, attn.qkv [3W, W] = [q; k; v], attn.proj, attn.{q,k}_norm, ls1, ls2, norm2,
      mlp.fc1, mlp.fc2};  mlp1.{0 (LayerNorm), 1, 3 (Linear)}
  language_model.*: as native for Qwen2 / LLaMA; InternLM2: model.tok_embeddings, layers.N.attention.wqkv (below),
      attention.wo, feed_forward.{w1 gate, w3 up, w2 down}, attention_norm, ffn_norm, model.norm, output
Keys as transformers 5 names them in memory (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`) are
read too.
"""

from __future__ import annotations

import re

import numpy as np

from qwenvl_jax.models.internvl.config import InternVLConfig
from qwenvl_jax.models.rules import (
  RuleTable,
  Slot,
  add_decoder_rules,
  conv2d,
  expand,
  fused_blocks,
  linear,
  qkv_paths,
  reshaped,
  same,
)

IGNORED_HF_KEYS = re.compile(r"rotary_emb\.inv_freq$")
_ALIASES = ((re.compile(r"^model\.language_model\."), "language_model.model."),
            (re.compile(r"^model\.vision_tower\."), "vision_tower."),
            (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
            (re.compile(r"^lm_head\."), "language_model.lm_head."))


def peft_module_name(name: str) -> str:
  """Checkpoint module name -> transformers 5's module tree (the inverse of the aliases above)."""
  for ours, theirs in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                       ("multi_modal_projector.", "model.multi_modal_projector."),
                       ("language_model.lm_head", "lm_head")):
    if name.startswith(ours):
      return theirs + name[len(ours):]
  return name


def hf_key_alias(key: str) -> str:
  for pattern, repl in _ALIASES:
    key = pattern.sub(repl, key)
  return key


def _token_table():
  """[1, 1, W] (class token) <-> [W]; [1, T, W] (position table) <-> [T, W]."""
  def to_ours(w):
    return (w[0, 0] if w.shape[1] == 1 else w[0],)

  def to_hf(x):
    return x[None, None] if x.ndim == 1 else x[None]
  return to_ours, to_hf


def _internlm2_wqkv(heads: int, kv_heads: int, head_dim: int):
  """InternLM2's packed `wqkv` [(H + 2K) * Dh, D]: rows grouped per key/value head g as [g's H/K query heads, key g,
  value g] (each Dh rows) <-> q [D, H, Dh], k and v [D, K, Dh] (query head h reads key/value head h // (H/K))."""
  g = heads // kv_heads

  def to_ours(w):
    w4 = w.reshape(kv_heads, g + 2, head_dim, -1)
    q = w4[:, :g].reshape(heads, head_dim, -1)
    return q.transpose(2, 0, 1), w4[:, g].transpose(2, 0, 1), w4[:, g + 1].transpose(2, 0, 1)

  def to_hf(q, k, v):
    d = q.shape[0]
    qg = q.transpose(1, 2, 0).reshape(kv_heads, g, head_dim, d)
    kv = np.stack([k.transpose(1, 2, 0), v.transpose(1, 2, 0)], axis=1)
    return np.concatenate([qg, kv], axis=1).reshape(-1, d)
  return to_ours, to_hf


def _vision_native(r: RuleTable, cfg: InternVLConfig) -> None:
  v, add = cfg.vision, r.add
  vh, vdh = v.num_attention_heads, v.head_dim
  e, vl = "vision_tower.embeddings.", ("vision", "layers")
  add(e + "cls_token", [("vision", "cls")], _token_table())
  add(e + "patch_embeddings.projection.weight", [("vision", "patch_embed")], conv2d())
  add(e + "patch_embeddings.projection.bias", [("vision", "patch_bias")], same())
  add(e + "position_embeddings", [("vision", "pos_embed")], _token_table())
  b = "vision_tower.encoder.layer.{i}."
  for name in ("q", "k", "v"):
    add(b + f"attention.{name}_proj.weight", [vl + ("attn", name, "kernel")], linear(out_shape=(vh, vdh)),
        "vision")
    if v.attention_bias:
      add(b + f"attention.{name}_proj.bias", [vl + ("attn", name, "bias")], reshaped((vh, vdh)), "vision")
  add(b + "attention.projection_layer.weight", [vl + ("attn", "out", "kernel")], linear(in_shape=(vh, vdh)),
      "vision")
  add(b + "attention.projection_layer.bias", [vl + ("attn", "out", "bias")], same(), "vision")
  if v.use_qk_norm:
    for name in ("q", "k"):
      add(b + f"attention.{name}_norm.weight", [vl + ("attn", f"{name}_norm", "scale")], same(), "vision")
  add(b + "lambda_1", [vl + ("ls1",)], same(), "vision")
  add(b + "lambda_2", [vl + ("ls2",)], same(), "vision")
  _norm_rules(r, cfg, b + "layernorm_before", vl + ("ln_1",), "vision")
  _norm_rules(r, cfg, b + "layernorm_after", vl + ("ln_2",), "vision")
  for name in ("fc1", "fc2"):
    add(b + f"mlp.{name}.weight", [vl + ("mlp", name, "kernel")], linear(), "vision")
    add(b + f"mlp.{name}.bias", [vl + ("mlp", name, "bias")], same(), "vision")
  if not v.use_mean_pooling:
    add("vision_tower.layernorm.weight", [("vision", "ln_post", "scale")], same())
    add("vision_tower.layernorm.bias", [("vision", "ln_post", "bias")], same())
  p = "multi_modal_projector."
  add(p + "layer_norm.weight", [("projector", "ln", "scale")], same())
  add(p + "layer_norm.bias", [("projector", "ln", "bias")], same())
  for hf_name, ours in (("linear_1", "fc1"), ("linear_2", "fc2")):
    add(p + f"{hf_name}.weight", [("projector", "mlp", ours, "kernel")], linear())
    add(p + f"{hf_name}.bias", [("projector", "mlp", ours, "bias")], same())


def _vision_original(r: RuleTable, cfg: InternVLConfig) -> None:
  v, add = cfg.vision, r.add
  vh, vdh = v.num_attention_heads, v.head_dim
  e, vl = "vision_model.embeddings.", ("vision", "layers")
  add(e + "class_embedding", [("vision", "cls")], _token_table())
  add(e + "patch_embedding.weight", [("vision", "patch_embed")], conv2d())
  add(e + "patch_embedding.bias", [("vision", "patch_bias")], same())
  add(e + "position_embedding", [("vision", "pos_embed")], _token_table())
  b = "vision_model.encoder.layers.{i}."
  add(b + "attn.qkv.weight", qkv_paths(vl + ("attn",), "kernel"), fused_blocks(vh, vdh), "vision")
  if v.attention_bias:
    add(b + "attn.qkv.bias", qkv_paths(vl + ("attn",), "bias"), fused_blocks(vh, vdh), "vision")
  add(b + "attn.proj.weight", [vl + ("attn", "out", "kernel")], linear(in_shape=(vh, vdh)), "vision")
  add(b + "attn.proj.bias", [vl + ("attn", "out", "bias")], same(), "vision")
  if v.use_qk_norm:
    for name in ("q", "k"):
      add(b + f"attn.{name}_norm.weight", [vl + ("attn", f"{name}_norm", "scale")], same(), "vision")
  add(b + "ls1", [vl + ("ls1",)], same(), "vision")
  add(b + "ls2", [vl + ("ls2",)], same(), "vision")
  _norm_rules(r, cfg, b + "norm1", vl + ("ln_1",), "vision")
  _norm_rules(r, cfg, b + "norm2", vl + ("ln_2",), "vision")
  for name in ("fc1", "fc2"):
    add(b + f"mlp.{name}.weight", [vl + ("mlp", name, "kernel")], linear(), "vision")
    add(b + f"mlp.{name}.bias", [vl + ("mlp", name, "bias")], same(), "vision")
  add("mlp1.0.weight", [("projector", "ln", "scale")], same())
  add("mlp1.0.bias", [("projector", "ln", "bias")], same())
  for hf_idx, ours in (("1", "fc1"), ("3", "fc2")):
    add(f"mlp1.{hf_idx}.weight", [("projector", "mlp", ours, "kernel")], linear())
    add(f"mlp1.{hf_idx}.bias", [("projector", "mlp", ours, "bias")], same())


def _norm_rules(r: RuleTable, cfg: InternVLConfig, hf: str, ours: tuple, stack: str) -> None:
  r.add(hf + ".weight", [ours + ("scale",)], same(), stack)
  if cfg.vision.norm_type == "layer_norm":
    r.add(hf + ".bias", [ours + ("bias",)], same(), stack)


def _internlm2(r: RuleTable, cfg: InternVLConfig) -> None:
  spec, add = cfg.decoder, r.add
  h, kvh, dh = spec.heads, spec.kv_heads, spec.head_dim
  dec, t = ("decoder", "layers"), "language_model.model.layers.{i}."
  add("language_model.model.tok_embeddings.weight", [("wte", "embedding")], same())
  add("language_model.output.weight", [("lm_head", "kernel")], linear())
  add(t + "attention.wqkv.weight", qkv_paths(dec + ("attn",), "kernel"), _internlm2_wqkv(h, kvh, dh), "decoder")
  add(t + "attention.wo.weight", [dec + ("attn", "o", "kernel")], linear(in_shape=(h, dh)), "decoder")
  if spec.qkv_bias:
    raise ValueError("InternLM2 with biases is not supported (no released InternVL uses it)")
  for hf_name, ours in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
    add(t + f"feed_forward.{hf_name}.weight", [dec + ("mlp", ours, "kernel")], linear(), "decoder")
  add(t + "attention_norm.weight", [dec + ("ln_1", "scale")], same(), "decoder")
  add(t + "ffn_norm.weight", [dec + ("ln_2", "scale")], same(), "decoder")
  add("language_model.model.norm.weight", [("decoder", "ln_f", "scale")], same())


def rules(cfg: InternVLConfig) -> RuleTable:
  r = RuleTable()
  fmt = cfg.checkpoint_format
  (_vision_native if fmt == "native" else _vision_original)(r, cfg)
  if fmt == "original_internlm2":
    _internlm2(r, cfg)
    return r
  r.add("language_model.model.embed_tokens.weight", [("wte", "embedding")], same())
  if not cfg.tie_word_embeddings:
    r.add("language_model.lm_head.weight", [("lm_head", "kernel")], linear())
  add_decoder_rules(r, "language_model.model.", cfg.decoder)
  return r


def hf_slots(cfg: InternVLConfig) -> dict[str, Slot]:
  """HF key -> Slot for every tensor of a checkpoint of `cfg` in its `checkpoint_format`."""
  return expand(rules(cfg).rules, {"decoder": cfg.num_hidden_layers, "vision": cfg.vision.num_hidden_layers})


def export_config(cfg: InternVLConfig) -> InternVLConfig:
  """The config whose name map export writes: always the native layout."""
  return cfg if cfg.checkpoint_format == "native" else cfg.replace(checkpoint_format="native")

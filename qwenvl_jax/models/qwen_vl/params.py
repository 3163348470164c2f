"""Qwen-VL (v1) <-> the official Hugging Face checkpoint: the name map and per-tensor layout changes.

Layouts beyond the common ones of `models/rules.py`:
  * decoder `c_attn` [3D, D] = [q | k | v] blocks       <-> q/k/v kernels [D, H, Dh]
  * ViT `attn.in_proj` [3W, W] packed per head [h: q,k,v] <-> q/k/v kernels [W, H, Dh]
  * resampler `attn.in_proj_weight` [3D, D] = [q; k; v]  <-> q/k/v kernels [D, H, Dh]
  * `conv1` [W, 3, p, p] <-> patch kernel [p, p, 3, W];   `visual.proj` is used as x @ proj: kept as is
"""

from __future__ import annotations

import re

from qwenvl_jax.models.qwen_vl.config import QwenVLConfig
from qwenvl_jax.models.rules import RuleTable, Slot, conv2d, expand, fused_blocks, linear, qkv_paths, same

# Buffers some official checkpoints carry that the model recomputes; skipped on import.
IGNORED_HF_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.h\.\d+\.attn\.(bias|masked_bias))$")


def _per_head_packed(heads: int, head_dim: int):
  """[H * (q,k,v) * Dh, Din] packed per head <-> three kernels [Din, H, Dh]; biases -> [H, Dh]."""
  import numpy as np

  def to_ours(w):
    if w.ndim == 1:
      r = w.reshape(heads, 3, head_dim)
      return tuple(r[:, j] for j in range(3))
    r = w.reshape(heads, 3, head_dim, -1)
    return tuple(r[:, j].transpose(2, 0, 1) for j in range(3))
  def to_hf(q, k, v):
    if q.ndim == 2:
      return np.stack([q, k, v], axis=1).reshape(-1)
    return np.stack([p.transpose(1, 2, 0) for p in (q, k, v)], axis=1).reshape(3 * heads * head_dim, -1)
  return to_ours, to_hf


def rules(cfg: QwenVLConfig) -> RuleTable:
  c, v = cfg, cfg.visual
  h, dh, rh = c.num_attention_heads, c.head_dim, v.resampler_heads
  r = RuleTable()
  add = r.add

  add("lm_head.weight", [("lm_head", "kernel")], linear())
  dec = ("decoder", "layers")
  t = "transformer.h.{i}."
  add(t + "attn.c_attn.bias", qkv_paths(dec + ("attn",), "bias"), fused_blocks(h, dh), "decoder")
  add(t + "attn.c_attn.weight", qkv_paths(dec + ("attn",), "kernel"), fused_blocks(h, dh), "decoder")
  if not c.no_bias:
    add(t + "attn.c_proj.bias", [dec + ("attn", "o", "bias")], same(), "decoder")
  add(t + "attn.c_proj.weight", [dec + ("attn", "o", "kernel")], linear(in_shape=(h, dh)), "decoder")
  add(t + "ln_1.weight", [dec + ("ln_1", "scale")], same(), "decoder")
  add(t + "ln_2.weight", [dec + ("ln_2", "scale")], same(), "decoder")
  for hf_name, ours in (("c_proj", "down"), ("w1", "up"), ("w2", "gate")):
    if not c.no_bias:
      add(t + f"mlp.{hf_name}.bias", [dec + ("mlp", ours, "bias")], same(), "decoder")
    add(t + f"mlp.{hf_name}.weight", [dec + ("mlp", ours, "kernel")], linear(), "decoder")
  add("transformer.ln_f.weight", [("decoder", "ln_f", "scale")], same())

  p, rs = "transformer.visual.attn_pool.", ("resampler",)
  add(p + "attn.in_proj_bias", qkv_paths(rs + ("attn",), "bias"), fused_blocks(rh, c.hidden_size // rh))
  add(p + "attn.in_proj_weight", qkv_paths(rs + ("attn",), "kernel"), fused_blocks(rh, c.hidden_size // rh))
  add(p + "attn.out_proj.bias", [rs + ("attn", "out", "bias")], same())
  add(p + "attn.out_proj.weight", [rs + ("attn", "out", "kernel")], linear(in_shape=(rh, c.hidden_size // rh)))
  add(p + "kv_proj.weight", [rs + ("kv_proj", "kernel")], linear())
  for ln in ("ln_kv", "ln_q"):
    add(p + f"{ln}.bias", [rs + (ln, "bias")], same())
    add(p + f"{ln}.weight", [rs + (ln, "scale")], same())
  add(p + "pos_embed", [rs + ("pos_embed",)], same())
  add(p + "query", [rs + ("query",)], same())

  vis, vl = "transformer.visual.", ("visual", "layers")
  add(vis + "conv1.weight", [("visual", "patch_embed")], conv2d())
  add(vis + "ln_post.bias", [rs + ("ln_post", "bias")], same())
  add(vis + "ln_post.weight", [rs + ("ln_post", "scale")], same())
  add(vis + "ln_pre.bias", [("visual", "ln_pre", "bias")], same())
  add(vis + "ln_pre.weight", [("visual", "ln_pre", "scale")], same())
  add(vis + "positional_embedding", [("visual", "pos_embed")], same())
  add(vis + "proj", [rs + ("proj",)], same())
  b = vis + "transformer.resblocks.{i}."
  add(b + "attn.in_proj.bias", qkv_paths(vl + ("attn",), "bias"), _per_head_packed(v.heads, v.head_dim), "visual")
  add(b + "attn.in_proj.weight", qkv_paths(vl + ("attn",), "kernel"), _per_head_packed(v.heads, v.head_dim),
      "visual")
  add(b + "attn.out_proj.bias", [vl + ("attn", "out", "bias")], same(), "visual")
  add(b + "attn.out_proj.weight", [vl + ("attn", "out", "kernel")], linear(in_shape=(v.heads, v.head_dim)),
      "visual")
  for ln in ("ln_1", "ln_2"):
    add(b + f"{ln}.bias", [vl + (ln, "bias")], same(), "visual")
    add(b + f"{ln}.weight", [vl + (ln, "scale")], same(), "visual")
  for hf_name, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
    add(b + f"mlp.{hf_name}.bias", [vl + ("mlp", ours, "bias")], same(), "visual")
    add(b + f"mlp.{hf_name}.weight", [vl + ("mlp", ours, "kernel")], linear(), "visual")
  add("transformer.wte.weight", [("wte", "embedding")], same())
  return r


def hf_slots(cfg: QwenVLConfig) -> dict[str, Slot]:
  """HF key -> Slot for every tensor of the official checkpoint of `cfg`."""
  return expand(rules(cfg).rules, {"decoder": cfg.num_hidden_layers, "visual": cfg.visual.layers})

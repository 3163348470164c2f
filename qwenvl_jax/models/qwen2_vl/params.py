"""Qwen2-VL <-> Hugging Face checkpoints: the name map (hub layout, which transformers' save_pretrained also writes).

  model.embed_tokens / model.layers.N.* / model.norm / lm_head (absent when tied)   decoder
  visual.patch_embed.proj [W, C, T, p, p]  <-> patch_embed [C, T, p, p, W]
  visual.blocks.N.attn.qkv [3W, W] = [q; k; v] <-> q/k/v kernels [W, H, Dh];  attn.proj <-> attn/out
  visual.merger.ln_q, visual.merger.mlp.{0,2} <-> merger/ln_q, merger/mlp/{fc1,fc2}
Keys as transformers 5 names them in memory (`model.language_model.*`, `model.visual.*`) are read too.
"""

from __future__ import annotations

import re

from qwenvl_jax.models.qwen2_vl.config import Qwen2VLConfig
from qwenvl_jax.models.rules import RuleTable, Slot, add_decoder_rules, expand, fused_blocks, linear, qkv_paths, same

IGNORED_HF_KEYS = re.compile(r"rotary_emb\.inv_freq$")
_ALIASES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."),
            (re.compile(r"^model\.lm_head\."), "lm_head."))


def peft_module_name(name: str) -> str:
  """Checkpoint module name -> transformers 5's module tree (`model.language_model.*`, `model.visual.*`)."""
  if name.startswith("visual."):
    return "model." + name
  return re.sub(r"^model\.", "model.language_model.", name)


def hf_key_alias(key: str) -> str:
  for pattern, repl in _ALIASES:
    key = pattern.sub(repl, key)
  return key


def rules(cfg: Qwen2VLConfig) -> RuleTable:
  c, v = cfg, cfg.vision
  r = RuleTable()
  add = r.add
  add("model.embed_tokens.weight", [("wte", "embedding")], same())
  if not c.tie_word_embeddings:
    add("lm_head.weight", [("lm_head", "kernel")], linear())
  add_decoder_rules(r, "model.", c.decoder)

  add("visual.patch_embed.proj.weight", [("visual", "patch_embed")],
      ((lambda w: (w.transpose(1, 2, 3, 4, 0),)), (lambda k: k.transpose(4, 0, 1, 2, 3))))
  vb, b = ("visual", "layers"), "visual.blocks.{i}."
  vh, vdh = v.num_heads, v.head_dim
  add(b + "attn.qkv.weight", qkv_paths(vb + ("attn",), "kernel"), fused_blocks(vh, vdh), "visual")
  add(b + "attn.qkv.bias", qkv_paths(vb + ("attn",), "bias"), fused_blocks(vh, vdh), "visual")
  add(b + "attn.proj.weight", [vb + ("attn", "out", "kernel")], linear(in_shape=(vh, vdh)), "visual")
  add(b + "attn.proj.bias", [vb + ("attn", "out", "bias")], same(), "visual")
  for hf_name, ours in (("norm1", "ln_1"), ("norm2", "ln_2")):
    add(b + f"{hf_name}.weight", [vb + (ours, "scale")], same(), "visual")
    add(b + f"{hf_name}.bias", [vb + (ours, "bias")], same(), "visual")
  for name in ("fc1", "fc2"):
    add(b + f"mlp.{name}.weight", [vb + ("mlp", name, "kernel")], linear(), "visual")
    add(b + f"mlp.{name}.bias", [vb + ("mlp", name, "bias")], same(), "visual")
  m = ("merger",)
  add("visual.merger.ln_q.weight", [m + ("ln_q", "scale")], same())
  add("visual.merger.ln_q.bias", [m + ("ln_q", "bias")], same())
  for hf_idx, ours in (("0", "fc1"), ("2", "fc2")):
    add(f"visual.merger.mlp.{hf_idx}.weight", [m + ("mlp", ours, "kernel")], linear())
    add(f"visual.merger.mlp.{hf_idx}.bias", [m + ("mlp", ours, "bias")], same())
  return r


def hf_slots(cfg: Qwen2VLConfig) -> dict[str, Slot]:
  """HF key -> Slot for every tensor of the checkpoint of `cfg`."""
  return expand(rules(cfg).rules, {"decoder": cfg.num_hidden_layers, "visual": cfg.vision.depth})

"""Qwen-VL (v1) <-> official Hugging Face checkpoint: the name map and per-tensor layout changes.

Each `Rule` maps one official tensor to one or more of our parameters and back. Layouts:
  * torch Linear weight [out, in] <-> our kernel [in, ...out]
  * decoder `c_attn` [3D, D] = [q | k | v] blocks       <-> q/k/v kernels [D, H, Dh]
  * ViT `attn.in_proj` [3W, W] packed per head [h: q,k,v] <-> q/k/v kernels [W, H, Dh]
  * resampler `attn.in_proj_weight` [3D, D] = [q; k; v]  <-> q/k/v kernels [D, H, Dh]
  * `conv1` [W, 3, p, p] <-> patch kernel [p, p, 3, W];   `visual.proj` is used as x @ proj: kept as is
Layered rules use `{i}`; our side then has a `layers` module stacked on axis 0 (scan) or `layers_{i}`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from qwenvl_jax.config import QwenVLConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                     # official key, `{i}` for the layer index
  ours: tuple[Path, ...]      # our parameter paths, `layers` standing for the layer module
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  stack: str | None = None    # 'decoder' | 'visual' when `{i}` runs over that tower's layers


def _same():
  return (lambda w: (w,)), (lambda w: w)


def _linear(out_shape: tuple[int, ...] | None = None, in_shape: tuple[int, ...] | None = None):
  """torch [out, in] <-> kernel [*in_shape, *out_shape] (default: plain transpose)."""
  def to_ours(w):
    k = w.T
    if in_shape or out_shape:
      k = k.reshape(*(in_shape or k.shape[:1]), *(out_shape or k.shape[1:]))
    return (k,)
  def to_hf(k):
    n_in = len(in_shape) if in_shape else 1
    return k.reshape(int(np.prod(k.shape[:n_in])), -1).T
  return to_ours, to_hf


def _fused_blocks(heads: int, head_dim: int):
  """[3*H*Dh, Din] as [q; k; v] blocks <-> three kernels [Din, H, Dh]; 1-D biases likewise -> [H, Dh]."""
  def to_ours(w):
    parts = np.split(w, 3, axis=0)
    if w.ndim == 1:
      return tuple(p.reshape(heads, head_dim) for p in parts)
    return tuple(p.T.reshape(-1, heads, head_dim) for p in parts)
  def to_hf(q, k, v):
    if q.ndim == 2:
      return np.concatenate([p.reshape(-1) for p in (q, k, v)])
    return np.concatenate([p.reshape(p.shape[0], -1).T for p in (q, k, v)], axis=0)
  return to_ours, to_hf


def _per_head_packed(heads: int, head_dim: int):
  """[H * (q,k,v) * Dh, Din] packed per head <-> three kernels [Din, H, Dh]; biases -> [H, Dh]."""
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


def _conv():
  return (lambda w: (w.transpose(2, 3, 1, 0),)), (lambda k: k.transpose(3, 2, 0, 1))


def _qkv_paths(prefix: Path, leaf: str) -> tuple[Path, ...]:
  return tuple(prefix + (n, leaf) for n in ("q", "k", "v"))


def rules(cfg: QwenVLConfig) -> list[Rule]:
  """All rules for `cfg` (grouped by module; `expand` orders the expanded keys)."""
  c, v = cfg, cfg.visual
  h, dh, rh = c.num_attention_heads, c.head_dim, v.resampler_heads
  r: list[Rule] = []

  def add(hf, ours, fns, stack=None):
    r.append(Rule(hf, tuple(ours), fns[0], fns[1], stack))

  add("lm_head.weight", [("lm_head", "kernel")], _linear())
  dec = ("decoder", "layers")
  t = "transformer.h.{i}."
  add(t + "attn.c_attn.bias", _qkv_paths(dec + ("attn",), "bias"), _fused_blocks(h, dh), "decoder")
  add(t + "attn.c_attn.weight", _qkv_paths(dec + ("attn",), "kernel"), _fused_blocks(h, dh), "decoder")
  if not c.no_bias:
    add(t + "attn.c_proj.bias", [dec + ("attn", "o", "bias")], _same(), "decoder")
  add(t + "attn.c_proj.weight", [dec + ("attn", "o", "kernel")], _linear(in_shape=(h, dh)), "decoder")
  add(t + "ln_1.weight", [dec + ("ln_1", "scale")], _same(), "decoder")
  add(t + "ln_2.weight", [dec + ("ln_2", "scale")], _same(), "decoder")
  for hf_name, ours in (("c_proj", "down"), ("w1", "up"), ("w2", "gate")):
    if not c.no_bias:
      add(t + f"mlp.{hf_name}.bias", [dec + ("mlp", ours, "bias")], _same(), "decoder")
    add(t + f"mlp.{hf_name}.weight", [dec + ("mlp", ours, "kernel")], _linear(), "decoder")
  add("transformer.ln_f.weight", [("decoder", "ln_f", "scale")], _same())

  p, rs = "transformer.visual.attn_pool.", ("resampler",)
  add(p + "attn.in_proj_bias", _qkv_paths(rs + ("attn",), "bias"), _fused_blocks(rh, c.hidden_size // rh))
  add(p + "attn.in_proj_weight", _qkv_paths(rs + ("attn",), "kernel"), _fused_blocks(rh, c.hidden_size // rh))
  add(p + "attn.out_proj.bias", [rs + ("attn", "out", "bias")], _same())
  add(p + "attn.out_proj.weight", [rs + ("attn", "out", "kernel")], _linear(in_shape=(rh, c.hidden_size // rh)))
  add(p + "kv_proj.weight", [rs + ("kv_proj", "kernel")], _linear())
  for ln in ("ln_kv", "ln_q"):
    add(p + f"{ln}.bias", [rs + (ln, "bias")], _same())
    add(p + f"{ln}.weight", [rs + (ln, "scale")], _same())
  add(p + "pos_embed", [rs + ("pos_embed",)], _same())
  add(p + "query", [rs + ("query",)], _same())

  vis, vl = "transformer.visual.", ("visual", "layers")
  add(vis + "conv1.weight", [("visual", "patch_embed")], _conv())
  add(vis + "ln_post.bias", [rs + ("ln_post", "bias")], _same())
  add(vis + "ln_post.weight", [rs + ("ln_post", "scale")], _same())
  add(vis + "ln_pre.bias", [("visual", "ln_pre", "bias")], _same())
  add(vis + "ln_pre.weight", [("visual", "ln_pre", "scale")], _same())
  add(vis + "positional_embedding", [("visual", "pos_embed")], _same())
  add(vis + "proj", [rs + ("proj",)], _same())
  b = vis + "transformer.resblocks.{i}."
  add(b + "attn.in_proj.bias", _qkv_paths(vl + ("attn",), "bias"), _per_head_packed(v.heads, v.head_dim), "visual")
  add(b + "attn.in_proj.weight", _qkv_paths(vl + ("attn",), "kernel"), _per_head_packed(v.heads, v.head_dim),
      "visual")
  add(b + "attn.out_proj.bias", [vl + ("attn", "out", "bias")], _same(), "visual")
  add(b + "attn.out_proj.weight", [vl + ("attn", "out", "kernel")], _linear(in_shape=(v.heads, v.head_dim)),
      "visual")
  for ln in ("ln_1", "ln_2"):
    add(b + f"{ln}.bias", [vl + (ln, "bias")], _same(), "visual")
    add(b + f"{ln}.weight", [vl + (ln, "scale")], _same(), "visual")
  for hf_name, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
    add(b + f"mlp.{hf_name}.bias", [vl + ("mlp", ours, "bias")], _same(), "visual")
    add(b + f"mlp.{hf_name}.weight", [vl + ("mlp", ours, "kernel")], _linear(), "visual")
  add("transformer.wte.weight", [("wte", "embedding")], _same())
  return r


# Buffers some official checkpoints carry that the model recomputes; skipped on import.
IGNORED_HF_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.h\.\d+\.attn\.(bias|masked_bias))$")


@dataclasses.dataclass(frozen=True)
class Slot:
  """One official tensor, resolved: which rule, which layer (or None)."""
  rule: Rule
  layer: int | None


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expand(cfg: QwenVLConfig) -> dict[str, Slot]:
  """Official key -> Slot for every tensor of the official checkpoint of `cfg`, naturally sorted so each
  layer's tensors are adjacent (that is how they are packed into shards)."""
  out: dict[str, Slot] = {}
  n_layers = {"decoder": cfg.num_hidden_layers, "visual": cfg.visual.layers}
  for rule in rules(cfg):
    if rule.stack is None:
      out[rule.hf] = Slot(rule, None)
    else:
      for i in range(n_layers[rule.stack]):
        out[rule.hf.format(i=i)] = Slot(rule, i)
  return {k: out[k] for k in sorted(out, key=_natural_key)}


def param_location(path: Path, layer: int | None, scan: bool) -> tuple[Path, int | None]:
  """Our path with the layer resolved -> (tree path, index on the stacked axis or None)."""
  if layer is None:
    return path, None
  j = path.index("layers")
  if scan:
    return path, layer
  return path[:j] + (f"layers_{layer}",) + path[j + 1:], None

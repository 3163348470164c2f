"""The vocabulary of a family's two-way Hugging Face name map (each family's `params.py` writes its table in it).

A `Rule` maps one HF tensor to one or more of our parameters and back. Layered rules use `{i}` in the HF name;
our side then has a `layers` module stacked on axis 0 (scanned) or `layers_{i}` modules (unrolled). Common layout
changes live here: torch Linear [out, in] <-> our kernel [in, ...out], fused [q; k; v] blocks <-> three kernels.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                     # HF key, `{i}` for the layer index
  ours: tuple[Path, ...]      # our parameter paths, `layers` standing for the layer module
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  stack: str | None = None    # which tower's layers `{i}` runs over (a key of `expand`'s n_layers)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor, resolved: which rule, which layer (or None)."""
  rule: Rule
  layer: int | None


class RuleTable:
  """Collects rules: `add(hf_name, our_paths, (to_ours, to_hf), stack)`."""

  def __init__(self):
    self.rules: list[Rule] = []

  def add(self, hf: str, ours, fns, stack: str | None = None) -> None:
    self.rules.append(Rule(hf, tuple(ours), fns[0], fns[1], stack))


def same():
  return (lambda w: (w,)), (lambda w: w)


def linear(out_shape: tuple[int, ...] | None = None, in_shape: tuple[int, ...] | None = None):
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


def reshaped(shape: tuple[int, ...]):
  """A 1-D HF tensor (e.g. a bias [H * Dh]) <-> ours of `shape` (e.g. [H, Dh])."""
  return (lambda w: (w.reshape(shape),)), (lambda b: b.reshape(-1))


def fused_blocks(heads: int, head_dim: int):
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


def qkv_paths(prefix: Path, leaf: str) -> tuple[Path, ...]:
  return tuple(prefix + (n, leaf) for n in ("q", "k", "v"))


def conv2d():
  """torch Conv2d weight [W, C, p, p] <-> our patch kernel [p, p, C, W]."""
  return (lambda w: (w.transpose(2, 3, 1, 0),)), (lambda k: k.transpose(3, 2, 0, 1))


def add_decoder_rules(r: RuleTable, prefix: str, spec, stack: str = "decoder") -> None:
  """The transformers decoder layout (Qwen2 / LLaMA: `{prefix}layers.{i}.self_attn.{q,k,v,o}_proj`,
  `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, then `{prefix}norm`) <-> our `decoder`
  for a `DecoderSpec` (its biases say which bias tensors exist)."""
  h, kvh, dh = spec.heads, spec.kv_heads, spec.head_dim
  dec, t = ("decoder", "layers"), prefix + "layers.{i}."
  for name, heads in (("q", h), ("k", kvh), ("v", kvh)):
    r.add(t + f"self_attn.{name}_proj.weight", [dec + ("attn", name, "kernel")], linear(out_shape=(heads, dh)),
          stack)
    if spec.qkv_bias:
      r.add(t + f"self_attn.{name}_proj.bias", [dec + ("attn", name, "bias")], reshaped((heads, dh)), stack)
  r.add(t + "self_attn.o_proj.weight", [dec + ("attn", "o", "kernel")], linear(in_shape=(h, dh)), stack)
  if spec.out_bias:
    r.add(t + "self_attn.o_proj.bias", [dec + ("attn", "o", "bias")], same(), stack)
  for name in ("gate", "up", "down"):
    r.add(t + f"mlp.{name}_proj.weight", [dec + ("mlp", name, "kernel")], linear(), stack)
  r.add(t + "input_layernorm.weight", [dec + ("ln_1", "scale")], same(), stack)
  r.add(t + "post_attention_layernorm.weight", [dec + ("ln_2", "scale")], same(), stack)
  r.add(prefix + "norm.weight", [("decoder", "ln_f", "scale")], same())


def natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expand(rules: list[Rule], n_layers: dict[str, int]) -> dict[str, Slot]:
  """HF key -> Slot for every tensor of the checkpoint, naturally sorted so each layer's tensors are adjacent
  (that is how they are packed into shards)."""
  out: dict[str, Slot] = {}
  for rule in rules:
    if rule.stack is None:
      out[rule.hf] = Slot(rule, None)
    else:
      for i in range(n_layers[rule.stack]):
        out[rule.hf.format(i=i)] = Slot(rule, i)
  return {k: out[k] for k in sorted(out, key=natural_key)}


def param_location(path: Path, layer: int | None, scan: bool) -> tuple[Path, int | None]:
  """Our path with the layer resolved -> (tree path, index on the stacked axis or None)."""
  if layer is None:
    return path, None
  j = path.index("layers")
  if scan:
    return path, layer
  return path[:j] + (f"layers_{layer}",) + path[j + 1:], None

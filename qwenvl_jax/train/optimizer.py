"""AdamW with warmup + cosine decay, ViT layer-wise LR decay, and per-stage freezing by regex on parameter paths.

Parameter paths are slash-joined tree keys, e.g. `visual/layers/attn/q/kernel` (scanned: leading layer axis) or
`visual/layers_3/attn/q/kernel` (unscanned). Which paths are the ViT, the adapter and the LLM comes from the family's
`ParamGroups` (`models/groups.py`); nothing here names a family's modules.

Layer-wise LR decay (BEiT convention): ViT block i of L (0 = closest to the pixels) gets decay ** (L - i); the
ViT's embeddings (the group's `vit_embeddings`) get decay ** (L + 1); everything else (adapter, LLM) gets 1.
Frozen parameters (the `freeze` regexes) go through `optax.set_to_zero` and therefore
carry no optimizer state.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenvl_jax.models.groups import ParamGroups


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then cosine decay to min_lr at total_steps."""
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), min_lr)


def lr_multiplier(path: str, shape: tuple[int, ...], groups: ParamGroups, decay: float, vision_scale: float = 1.0):
  """LR factor for one parameter: vision_scale for the ViT and the adapter, times the ViT layer-wise decay;
  a scalar, or [L, 1, ...] for scanned ViT blocks."""
  scale = vision_scale if groups.group_of(path) in ("vision", "adapter") else 1.0
  return scale * _layer_decay(path, shape, groups, decay)


def _layer_decay(path: str, shape: tuple[int, ...], groups: ParamGroups, decay: float):
  if decay == 1.0 or groups.group_of(path) != "vision":
    return 1.0
  n = groups.vit_layers
  if re.search(groups.vit_embeddings, path):
    return decay ** (n + 1)
  block = groups.block_index(path)
  if isinstance(block, int):
    return decay ** (n - block)
  if block == "stacked":
    factors = decay ** (n - np.arange(n, dtype=np.float64))
    return jnp.asarray(factors, jnp.float32).reshape((n,) + (1,) * (len(shape) - 1))
  return 1.0


def scale_by_layer_decay(groups: ParamGroups, decay: float, vision_scale: float = 1.0) -> optax.GradientTransformation:
  """Multiply each update by its `lr_multiplier` (works on masked trees inside `optax.multi_transform`)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * lr_multiplier(path_str(p), u.shape, groups, decay, vision_scale), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def labels(params, freeze: Sequence[str]):
  """'frozen' for parameters whose path matches any regex in `freeze`, else 'train'."""
  pats = [re.compile(f) for f in freeze]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if any(r.search(path_str(p)) for r in pats) else "train", params)


def decay_mask(params, no_decay: str):
  return jax.tree_util.tree_map_with_path(lambda p, _: re.search(no_decay, path_str(p)) is None, params)


def make_optimizer(*, lr: float, min_lr: float, warmup_steps: int, total_steps: int, groups: ParamGroups,
                   b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6, weight_decay: float = 0.05,
                   clip_norm: float = 1.0, layer_decay: float = 1.0, vision_lr_scale: float = 1.0,
                   freeze: Sequence[str] = ()):
  """-> (optax transformation, schedule). groups: the family's parameter groups (`family.param_groups(cfg)`);
  vision_lr_scale multiplies the LR of the ViT and the adapter; clip_norm 0 turns clipping off (optax would scale
  every update to 0)."""
  if not clip_norm >= 0:
    raise ValueError(f"clip_norm {clip_norm}: >= 0 (0 turns clipping off)")
  sched = schedule(lr, min_lr, warmup_steps, total_steps)
  train = optax.chain(
      # identity keeps the chain's (empty) state layout, so a run may resume with clipping turned on or off
      optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=lambda p: decay_mask(p, groups.no_decay)),
      scale_by_layer_decay(groups, layer_decay, vision_lr_scale),
      optax.scale_by_learning_rate(sched),
  )
  tx = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, lambda p: labels(p, freeze))
  return tx, sched

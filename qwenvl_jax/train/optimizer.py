"""AdamW with warmup + cosine decay, ViT layer-wise LR decay, and per-stage freezing by regex on parameter paths.

Parameter paths are slash-joined tree keys, e.g. `visual/layers/attn/q/kernel` (scanned: leading layer axis) or
`visual/layers_3/attn/q/kernel` (unscanned), `decoder/layers/mlp/up/kernel`, `resampler/pos_embed`, `wte/embedding`.

Layer-wise LR decay (BEiT convention): ViT block i of L (0 = closest to the pixels) gets decay ** (L - i); the
patch embedding, position table and ln_pre get decay ** (L + 1); everything else (resampler, LLM) gets 1.
Frozen parameters go through `optax.set_to_zero` and therefore carry no optimizer state.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Parameters without weight decay: norms, biases and position tables.
NO_DECAY = r"(/bias$|/scale$|pos_embed$)"
VIT_EMBEDDINGS = r"^visual/(patch_embed|pos_embed|ln_pre/)"


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then cosine decay to min_lr at total_steps."""
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), min_lr)


def lr_multiplier(path: str, shape: tuple[int, ...], vit_layers: int, decay: float, vision_scale: float = 1.0):
  """LR factor for one parameter: vision_scale for the ViT and the adapter, times the ViT layer-wise decay;
  a scalar, or [L, 1, ...] for scanned ViT blocks."""
  scale = vision_scale if path.startswith(("visual/", "resampler/")) else 1.0
  return scale * _layer_decay(path, shape, vit_layers, decay)


def _layer_decay(path: str, shape: tuple[int, ...], vit_layers: int, decay: float):
  if decay == 1.0 or not path.startswith("visual/"):
    return 1.0
  if re.match(VIT_EMBEDDINGS, path):
    return decay ** (vit_layers + 1)
  m = re.match(r"^visual/layers_(\d+)/", path)
  if m:
    return decay ** (vit_layers - int(m.group(1)))
  if path.startswith("visual/layers/"):
    factors = decay ** (vit_layers - np.arange(vit_layers, dtype=np.float64))
    return jnp.asarray(factors, jnp.float32).reshape((vit_layers,) + (1,) * (len(shape) - 1))
  return 1.0


def scale_by_layer_decay(vit_layers: int, decay: float, vision_scale: float = 1.0) -> optax.GradientTransformation:
  """Multiply each update by its `lr_multiplier` (works on masked trees inside `optax.multi_transform`)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * lr_multiplier(path_str(p), u.shape, vit_layers, decay, vision_scale), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def labels(params, freeze: Sequence[str]):
  """'frozen' for parameters whose path matches any regex in `freeze`, else 'train'."""
  pats = [re.compile(f) for f in freeze]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if any(r.search(path_str(p)) for r in pats) else "train", params)


def decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda p, _: re.search(NO_DECAY, path_str(p)) is None, params)


def make_optimizer(*, lr: float, min_lr: float, warmup_steps: int, total_steps: int, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-6, weight_decay: float = 0.05, clip_norm: float = 1.0,
                   vit_layers: int = 0, layer_decay: float = 1.0, vision_lr_scale: float = 1.0,
                   freeze: Sequence[str] = ()):
  """-> (optax transformation, schedule). vision_lr_scale multiplies the LR of the ViT and the adapter."""
  sched = schedule(lr, min_lr, warmup_steps, total_steps)
  train = optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      scale_by_layer_decay(vit_layers, layer_decay, vision_lr_scale),
      optax.scale_by_learning_rate(sched),
  )
  tx = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, lambda p: labels(p, freeze))
  return tx, sched

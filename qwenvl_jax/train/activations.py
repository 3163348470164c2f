"""An estimate of the activation memory of one train step per device, for the `--dry_run` plan.

What the backward pass keeps, per transformer stack (decoder, ViT), for n tokens per device, width D, H query /
K key-value heads of size Dh, MLP width F, tensor parallelism t, b bytes per activation (the compute dtype):

    saved per layer   remat none / dots_*: n * b * (4D + (H + 2K) * Dh / t + 3F / t) + 2 * H/t * n_q * n_k * 4
                      (the masked scores and their softmax, float32)
                      remat full:          n * b * D (the layer's input; one layer is recomputed at a time)
    working set       twice one layer's "none" amount (the layer being differentiated and its gradients)

Attention scores are float32 and dense per attention call: the decoder's [L, L] per row, the Qwen2-VL ViT's
[P, P] per row (one block-diagonal mask over the row's patches), the Qwen-VL ViT's per image. The loss adds
one chunk of float32 logits and their gradient (rows x loss_chunk x vocab x 8 bytes). dots_* policies keep
fewer elementwise results than counted here: an upper bound for them. Rows per device = batch_size / grad_accum /
(data x fsdp); the vision tower shards with the rows.
"""

from __future__ import annotations

import jax.numpy as jnp


def _stack(n_tokens: float, scores: float, d: int, heads: int, kv_heads: int, head_dim: int, mlp: int, layers: int,
           remat: str, itemsize: int, tensor: int) -> float:
  """Bytes a stack of `layers` layers keeps over `n_tokens` tokens with `scores` (query, key) pairs per head."""
  full = n_tokens * itemsize * (4 * d + (heads + 2 * kv_heads) * head_dim / tensor + 3 * mlp / tensor)
  full += 2 * heads / tensor * scores * 4  # the masked scores and their softmax
  saved = n_tokens * itemsize * d if remat == "full" else full
  return layers * saved + 2 * full  # the working layer: its activations and their gradients


def activation_bytes(c, cfg, processor) -> dict:
  """Per-device bytes {decoder, vision, loss, total} of config `c` (model `cfg`, the stage's `processor`)."""
  from qwenvl_jax.models.registry import family_of
  d, o = c.data, c.optim
  shards = c.mesh.data * c.mesh.fsdp
  rows = d.batch_size / o.grad_accum / shards
  itemsize = jnp.dtype(cfg.dtype).itemsize
  spec, remat = cfg.decoder, cfg.remat_policy
  out = {"decoder": _stack(rows * d.seq_len, rows * d.seq_len * d.seq_len, spec.hidden, spec.heads, spec.kv_heads,
                           spec.head_dim, spec.mlp_dim, spec.num_layers, remat, itemsize, c.mesh.tensor)}
  v = cfg.vit
  if family_of(cfg).sample_encoder is not None:  # any resolution: patch_budget patches per row
    patches, pairs = rows * d.patch_budget, rows * d.patch_budget ** 2
  else:                                          # fixed spans: max_images images per row
    n = processor.patches_per_image
    patches, pairs = rows * d.max_images * n, rows * d.max_images * n * n
  out["vision"] = _stack(patches, pairs, v.width, v.heads, v.heads, v.head_dim, v.mlp_dim, v.layers, remat, itemsize,
                         c.mesh.tensor) if patches else 0.0
  out["loss"] = rows * min(o.loss_chunk, d.seq_len) * cfg.vocab_size * 8
  out["total"] = sum(out.values())
  return out

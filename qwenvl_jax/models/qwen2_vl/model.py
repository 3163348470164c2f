"""The Qwen2-VL composition: embed text, encode images and videos, put them at their placeholders, decode.

    input_ids [B, S] --wte--> embeddings --features at <|image_pad|> / <|video_pad|>--> decoder (M-RoPE) --> logits
    pixel_values [P, C*T*p*p] (images, then videos, packed; bucket padding at the end)
        --vision tower--> [P, W] --merger--> features [P / 4, D]

Feature row k goes to the k-th `<|image_pad|>` (counted batch-major); video features follow the images'
(`n_image_tokens` rows later). Packed training batches give each row its own patches instead ([B, P, ...], with
`n_image_tokens` [B]; `data/patch_packing.py`): row b's features go to row b's placeholders.
Positions [3, B, S] (temporal, height, width) come from the host
(`positions.rope_index`); without them every token is text (1-D positions continued from the cache).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.data.packing import segment_lengths
from qwenvl_jax.models.qwen2_vl.config import Qwen2VLConfig
from qwenvl_jax.models.qwen2_vl.vision import PatchMerger, VisionTower
from qwenvl_jax.nn.attention import KVCache
from qwenvl_jax.nn.decoder import Decoder, StepInputs, decoder_masks, updated_cache
from qwenvl_jax.nn.layers import as_dtype, dense
from qwenvl_jax.nn.rotary import inv_frequencies, mrope_angles
from qwenvl_jax.nn.vlm import scatter_placeholders


class Qwen2VL(nn.Module):
  """Flax module of the whole model. Pure: `apply(params, ...)`.

  Methods: `__call__` (tokens -> logits), `encode_images` (patches -> LLM-width features), `vit` (patches -> ViT
  tokens), `project` (hidden -> logits).
  """
  cfg: Qwen2VLConfig

  def setup(self):
    c = self.cfg
    kw = dict(dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
    self.wte = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
    self.visual = VisionTower(c)
    self.merger = PatchMerger(c)
    self.decoder = Decoder(c.decoder)
    if not c.tie_word_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False, **kw)

  def vit(self, patches, rows_cols, segments) -> jax.Array:
    """[P, C*T*p*p] -> [P, embed_dim]."""
    return self.visual(patches, rows_cols, segments)

  def encode_images(self, patches, rows_cols, segments) -> jax.Array:
    """[P, C*T*p*p] patches (+ [P, 2] rows/columns, [P] segments) -> [P / merge^2, hidden_size]."""
    return self.merger(self.visual(patches, rows_cols, segments))

  def pooled_vit(self, pixel_values, vision_rows_cols, vision_segments, deterministic: bool = True) -> jax.Array:
    """Images of one size as rows: [N, P, C*T*p*p], [N, P, 2], [N, P] -> [N, embed_dim], each image's ViT tokens
    averaged over its patches (segments > 0) (the contrastive stage's image feature; this ViT has no stochastic
    part, so `deterministic` changes nothing)."""
    del deterministic
    x = self.visual(pixel_values, vision_rows_cols, vision_segments)
    w = (vision_segments > 0).astype(x.dtype)[..., None]
    return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1)

  def project(self, hidden: jax.Array) -> jax.Array:
    """[..., D] final hidden states -> [..., vocab] logits (the embedding matrix when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.wte.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               pixel_values: jax.Array | None = None, vision_rows_cols: jax.Array | None = None,
               vision_segments: jax.Array | None = None, n_image_tokens: jax.Array | int = 0,
               cache: KVCache | None = None, inference: bool = True, return_hidden: bool = False):
    """input_ids: [B, S] -> logits [B, S, vocab] (or hidden [B, S, D]); with a cache, also the new cache.

    attention_mask: [B, S] 1 = real token. positions: [3, B, S] M-RoPE ids, or [B, S] (the same on all three axes);
    default: text positions counting real tokens, continuing after the cache's. segment_ids: [B, S] packed samples.
    pixel_values: [P, C*T*p*p] with vision_rows_cols [P, 2] and vision_segments [P] (see `vision.VisionTower`);
    the first n_image_tokens merged rows are image features, the following ones video features. Or per row:
    [B, P, C*T*p*p], [B, P, 2], [B, P] and n_image_tokens [B].
    """
    del inference  # no inference-only behaviour in Qwen2-VL
    c = self.cfg
    b, s = input_ids.shape
    valid = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
      if cache is not None:
        positions = positions + cache.next_pos[:, None]
    if positions.ndim == 2:
      positions = jnp.broadcast_to(positions[None], (3, b, s))
    x = self.wte(input_ids)
    if pixel_values is not None:
      feats = self.encode_images(pixel_values, vision_rows_cols, vision_segments)
      ids = jnp.where(valid, input_ids, -1)  # padding never takes a feature row
      x = scatter_placeholders(x, ids, feats, c.image_token_id)
      x = scatter_placeholders(x, ids, feats, c.video_token_id, offset=n_image_tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    mask, cache_start, key_valid = decoder_masks(valid, segment_ids, cache)
    rope = mrope_angles(positions, inv_frequencies(c.head_dim, c.rope_theta), c.mrope_section)
    io = StepInputs(rope=rope, mask=mask, query_scale=None, cache_start=cache_start)
    hidden, new_kv = self.decoder(x, io, cache)
    out = hidden if return_hidden else self.project(hidden)
    if cache is None:
      return out
    # next position per row: 1 + the largest id among its real tokens (rows without new tokens keep theirs)
    top = jnp.max(jnp.where(valid, positions.max(axis=0), -1), axis=1)
    next_pos = jnp.where(top >= 0, top + 1, cache.next_pos).astype(jnp.int32)
    return out, updated_cache(cache, new_kv, key_valid, s, next_pos)


def example_call(cfg: Qwen2VLConfig) -> tuple[tuple, dict]:
  """Arguments of a call that reaches every parameter (for init and for quantization's abstract pass)."""
  v = cfg.vision
  n = v.spatial_merge_size ** 2
  return (jnp.zeros((1, 4), jnp.int32),), dict(
      pixel_values=jnp.zeros((n, v.patch_dim), jnp.float32), vision_rows_cols=jnp.zeros((n, 2), jnp.int32),
      vision_segments=jnp.ones((n,), jnp.int32))


def vision_flops(cfg: Qwen2VLConfig, patches: int, attention_pairs: int | None = None) -> float:
  """Forward matmul FLOPs of the vision path over `patches` patches, attention over `attention_pairs` (query, key)
  pairs (the sum of squared segment lengths; default: one segment of all patches): patch embedding 2*P*Cin*W;
  per block 8*P*W^2 + 4*M*P*W + 4*pairs*W; merger 2*(P/4)*(4W)^2 + 2*(P/4)*4W*D."""
  v = cfg.vision
  p, w, m = patches, v.embed_dim, v.mlp_dim
  pairs = patches * patches if attention_pairs is None else attention_pairs
  flops = 2 * p * v.patch_dim * w + v.depth * (8 * p * w * w + 4 * m * p * w + 4 * pairs * w)
  merged = p // v.spatial_merge_size ** 2
  flops += 2 * merged * v.merge_dim * v.merge_dim + 2 * merged * v.merge_dim * cfg.hidden_size
  return float(flops)


def batch_vision_flops(cfg: Qwen2VLConfig, batch: dict) -> float:
  """Vision FLOPs of what a packed batch feeds (`data/patch_packing.py`): its real patches, attention within each
  image / frame pair (padding patches are computed but not counted)."""
  lengths = segment_lengths(batch["vision_segments"])
  return vision_flops(cfg, int(lengths.sum()), int(np.square(lengths).sum()))


def image_flops(cfg: Qwen2VLConfig, processor) -> float:
  """Vision FLOPs of one image at the processor's largest budget (a square image of max_pixels): an upper bound,
  since images keep their own size."""
  side = int(processor.max_pixels ** 0.5)
  _, h, w = processor.image_grid(side, side)
  return vision_flops(cfg, h * w)

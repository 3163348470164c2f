"""The InternVL composition: embed text, encode tiles, put them at the `<IMG_CONTEXT>` placeholders, decode.

    input_ids [B, S] --wte--> embeddings --features at <IMG_CONTEXT>--> decoder (1-D RoPE) --> lm_head --> logits
    pixel_values [N, 3, S, S] (the tiles of every image, batch-major; bucket padding at the end)
        --InternViT--> [N, 1 + g*g, W] --class token dropped, pixel shuffle, projector--> [N, (g/2)^2, D]

Feature row k of the flattened tiles goes to the k-th `<IMG_CONTEXT>` counted batch-major (as transformers'
masked_scatter and the original chat model); `<img>` / `</img>` are ordinary tokens. Positions count each row's
real tokens from 0, so left padding shifts nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.models.internvl.config import InternVLConfig
from qwenvl_jax.models.internvl.vision import InternViT, Projector, pixel_shuffle
from qwenvl_jax.nn.attention import KVCache
from qwenvl_jax.nn.decoder import Decoder, StepInputs, decoder_masks, updated_cache
from qwenvl_jax.nn.layers import as_dtype, dense
from qwenvl_jax.nn.rotary import inv_frequencies, rope_angles
from qwenvl_jax.nn.vlm import scatter_placeholders


class InternVL(nn.Module):
  """Flax module of the whole model. Pure: `apply(params, ...)`.

  Methods: `__call__` (tokens -> logits), `encode_images` (tiles -> LLM-width features), `vit` (tiles -> ViT
  tokens), `project` (hidden -> logits).
  """
  cfg: InternVLConfig

  def setup(self):
    c = self.cfg
    kw = dict(dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
    self.wte = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
    self.vision = InternViT(c)
    self.projector = Projector(c)
    self.decoder = Decoder(c.decoder)
    if not c.tie_word_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False, **kw)

  def vit(self, pixel_values: jax.Array) -> jax.Array:
    """[N, 3, S, S] -> [N, 1 + g*g, W]."""
    return self.vision(pixel_values)

  def encode_images(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
    """[N, 3, S, S] normalised tiles -> [N, tokens_per_tile, hidden_size]."""
    vit = self.vision(pixel_values, deterministic=deterministic)
    return self.projector(pixel_shuffle(vit[:, 1:], self.cfg.merge))

  def pooled_vit(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
    """[N, 3, S, S] -> [N, W]: the patch tokens averaged, class token left out (the contrastive stage's image
    feature; InternViT's `use_mean_pooling`). deterministic=False: drop path as configured."""
    return self.vision(pixel_values, deterministic=deterministic)[:, 1:].mean(axis=1)

  def project(self, hidden: jax.Array) -> jax.Array:
    """[..., D] final hidden states -> [..., vocab] logits (the embedding matrix when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.wte.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               pixel_values: jax.Array | None = None, cache: KVCache | None = None, inference: bool = True,
               return_hidden: bool = False):
    """input_ids: [B, S] -> logits [B, S, vocab] (or hidden [B, S, D]); with a cache, also the new cache.

    attention_mask: [B, S] 1 = real token. positions: [B, S] (default: each row's real tokens counted from 0,
    continuing after the cache's). segment_ids: [B, S] packed samples. pixel_values: [N, 3, S, S] tiles whose
    features fill the `<IMG_CONTEXT>` tokens in order (extra tiles, e.g. bucket padding, are never read).
    inference=False (training): InternViT's drop path as configured (the 'dropout' rng).
    """
    c = self.cfg
    b, s = input_ids.shape
    valid = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
      if cache is not None:
        positions = positions + cache.next_pos[:, None]
    x = self.wte(input_ids)
    if pixel_values is not None:
      feats = self.encode_images(pixel_values, deterministic=inference)  # training: drop path as configured
      ids = jnp.where(valid, input_ids, -1)  # padding never takes a feature row
      x = scatter_placeholders(x, ids, feats.reshape(-1, feats.shape[-1]), c.image_token_id)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    mask, cache_start, key_valid = decoder_masks(valid, segment_ids, cache)
    rope = rope_angles(positions, inv_frequencies(c.head_dim, c.rope_theta))
    io = StepInputs(rope=rope, mask=mask, query_scale=None, cache_start=cache_start)
    hidden, new_kv = self.decoder(x, io, cache)
    out = hidden if return_hidden else self.project(hidden)
    if cache is None:
      return out
    next_pos = cache.next_pos + jnp.sum(valid, axis=1).astype(jnp.int32)
    return out, updated_cache(cache, new_kv, key_valid, s, next_pos)


def example_call(cfg: InternVLConfig) -> tuple[tuple, dict]:
  """Arguments of a call that reaches every parameter (for init and for quantization's abstract pass)."""
  s = cfg.vision.image_size
  return (jnp.zeros((1, 4), jnp.int32),), dict(pixel_values=jnp.zeros((1, 3, s, s), jnp.float32))


def image_flops(cfg: InternVLConfig, processor=None) -> float:
  """Forward matmul FLOPs of one tile's vision path (at the processor's tile size; default the config's): patch
  embedding 2*P*Cin*W; per block 8*T*W^2 + 4*M*T*W + 4*T^2*W (T = P + 1 tokens with the class token); projector
  2*Q*4W*D + 2*Q*D^2 (Q = P / 4 tokens per tile)."""
  v = cfg.vision
  grid = (processor.image_size if processor is not None else v.image_size) // v.patch_size
  p, w, m = grid ** 2, v.hidden_size, v.intermediate_size
  t = p + 1
  flops = 2 * p * v.num_channels * v.patch_size ** 2 * w
  flops += v.num_hidden_layers * (8 * t * w * w + 4 * m * t * w + 4 * t * t * w)
  q = p // cfg.merge ** 2
  flops += 2 * q * cfg.projector_in * cfg.hidden_size + 2 * q * cfg.hidden_size ** 2
  return float(flops)

"""The Qwen-VL composition: embed text, encode images, splice them in, decode.

    input_ids [B, S] --wte--> embeddings --splice(image features)--> decoder --> lm_head --> logits
    pixel_values [N, 3, H, W] --ViT--> [N, P, width] --resampler--> features [N, n_queries, D]

Image i (counted batch-major, then by position) fills the n_queries slots strictly between the i-th `<img>`
and its `</img>`; the tag tokens keep their own embeddings.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.models.qwen_vl.config import QwenVLConfig
from qwenvl_jax.models.qwen_vl.resampler import Resampler
from qwenvl_jax.models.qwen_vl.vision import VisionTransformer
from qwenvl_jax.nn.attention import KVCache
from qwenvl_jax.nn.decoder import Decoder, StepInputs, decoder_masks, updated_cache
from qwenvl_jax.nn.layers import as_dtype, dense
from qwenvl_jax.nn.rotary import inv_frequencies, logn_scale, ntk_alpha, rope_angles
from qwenvl_jax.nn.vlm import splice_spans


class QwenVL(nn.Module):
  """Flax module of the whole model. Pure: `apply(params, ...)`.

  Methods: `__call__` (tokens -> logits), `encode_images` (pixels -> features), `vit` (pixels -> ViT tokens),
  `project` (hidden -> logits, for chunked losses).
  """
  cfg: QwenVLConfig

  def setup(self):
    c = self.cfg
    kw = dict(dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
    self.wte = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
    self.visual = VisionTransformer(c)
    self.resampler = Resampler(c.visual, **kw)
    self.decoder = Decoder(c.decoder)
    self.lm_head = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False, **kw)

  def vit(self, pixel_values: jax.Array) -> jax.Array:
    """[N, 3, H, W] -> [N, P, width]."""
    return self.visual(pixel_values)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """[N, 3, H, W] normalised pixels -> [N, n_queries, hidden_size]."""
    return self.resampler(self.visual(pixel_values))

  def pooled_vit(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
    """[N, 3, H, W] -> [N, width]: the ViT tokens averaged (the contrastive stage's image feature; this ViT has no
    stochastic part, so `deterministic` changes nothing)."""
    del deterministic
    return self.visual(pixel_values).mean(axis=1)

  def project(self, hidden: jax.Array) -> jax.Array:
    """[..., D] final hidden states -> [..., vocab] logits."""
    return self.lm_head(hidden)

  def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               pixel_values: jax.Array | None = None, image_features: jax.Array | None = None,
               cache: KVCache | None = None, ntk_alpha_value=None, inference: bool = True,
               return_hidden: bool = False):
    """input_ids: [B, S] -> logits [B, S, vocab] (or hidden [B, S, D]); with a cache, also the new cache.

    attention_mask: [B, S] 1 = real token (default all real). positions: [B, S] RoPE positions (default
    cumsum(mask) - 1, so left padding does not shift a row). segment_ids: [B, S] packed-sample ids (no
    attention across segments). Images come as `pixel_values` [N, 3, H, W] | [B, M, 3, H, W] or precomputed
    `image_features` [N, Q, D] | [B, M, Q, D] (see `nn.vlm.splice_spans`). `inference=True` enables the official
    inference-only behaviours (dynamic NTK, logn) when the config enables them; `ntk_alpha_value` overrides the
    NTK alpha (cached decoding keeps the prefill's).
    """
    c = self.cfg
    b, s = input_ids.shape
    valid = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
      if cache is not None:  # continue after the real tokens already cached in each row
        positions = positions + cache.next_pos[:, None]
    x = self.wte(input_ids)
    if pixel_values is not None:
      if pixel_values.ndim == 5:  # [B, M, 3, H, W]: M image slots per (packed) row
        feats = self.encode_images(pixel_values.reshape((-1,) + pixel_values.shape[2:]))
        image_features = feats.reshape(pixel_values.shape[:2] + feats.shape[1:])
      else:
        image_features = self.encode_images(pixel_values)
    if image_features is not None:
      x = splice_spans(x, input_ids, image_features, c.visual.image_start_id, c.visual.image_end_id,
                       segment_ids=segment_ids)
    # Constrain at the block boundary: left to propagation, the splice's sharding (image features come out
    # split over 'tensor') gave wrong logits under jax.set_mesh on jax 0.10.2 (tests/sharded_forward.py).
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    mask, cache_start, key_valid = decoder_masks(valid, segment_ids, cache)
    use_ntk = inference and c.use_dynamic_ntk
    if ntk_alpha_value is None:  # a prefill: the official alpha comes from the new tokens' count
      ntk_alpha_value = ntk_alpha(s, c.seq_length) if use_ntk else 1.0
    io = StepInputs(
        rope=rope_angles(positions, inv_frequencies(c.rotary_dim, c.rotary_emb_base, ntk_alpha_value)), mask=mask,
        query_scale=logn_scale(positions, c.seq_length) if (inference and c.use_logn_attn) else None,
        cache_start=cache_start)
    hidden, new_kv = self.decoder(x, io, cache)
    out = hidden if return_hidden else self.lm_head(hidden)
    if cache is None:
      return out
    next_pos = cache.next_pos + jnp.sum(valid, axis=1).astype(jnp.int32)
    return out, updated_cache(cache, new_kv, key_valid, s, next_pos)


def example_call(cfg: QwenVLConfig) -> tuple[tuple, dict]:
  """Arguments of a call that reaches every parameter (for init and for quantization's abstract pass)."""
  v = cfg.visual
  ids = jnp.zeros((1, v.n_queries + 2), jnp.int32)
  pixels = jnp.zeros((1, 3, v.image_size, v.image_size), jnp.float32)
  return (ids,), {"pixel_values": pixels, "inference": False}


def image_flops(cfg: QwenVLConfig, processor) -> float:
  """Forward matmul FLOPs of one image at the processor's resolution (P patches of width W, MLP width M, Q queries):
  patch embedding 2*P*3p^2*W; per ViT block 8*P*W^2 + 4*M*P*W + 4*P^2*W; resampler kv_proj 2*P*W*D, k/v 4*P*D^2,
  q/out/proj 6*Q*D^2, attention 4*Q*P*D."""
  v, d = cfg.visual, cfg.hidden_size
  p, w, m, q = processor.patches_per_image, v.width, v.mlp_dim, processor.tokens_per_image
  flops = 2 * p * 3 * v.patch_size ** 2 * w
  flops += v.layers * (8 * p * w * w + 4 * m * p * w + 4 * p * p * w)
  flops += 2 * p * w * d + 4 * p * d * d + 6 * q * d * d + 4 * q * p * d
  return float(flops)

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

from qwenvl_jax.adapters import Resampler
from qwenvl_jax.config import QwenVLConfig, as_dtype
from qwenvl_jax.decoder import Decoder, StepInputs
from qwenvl_jax.nn.attention import KVCache, make_attention_mask
from qwenvl_jax.nn.layers import dense
from qwenvl_jax.nn.rotary import inv_frequencies, logn_scale, ntk_alpha
from qwenvl_jax.vision import VisionTransformer


def splice_images(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, start_id: int,
                  end_id: int) -> jax.Array:
  """Overwrite image-slot embeddings with image features.

  embeds: [B, S, D]; input_ids: [B, S]. features: [N, Q, D] consumed batch-major (image k fills the k-th span
  counted row by row), or [B, M, Q, D] with M image slots per row (packed rows: row b's k-th span takes
  features[b, k]). Spans must be well formed (checked on the host by `qwenvl_jax.api.find_image_spans`);
  unused features are ignored.
  """
  b, s = input_ids.shape
  is_start = input_ids == start_id
  depth = jnp.cumsum(is_start, axis=1) - jnp.cumsum(input_ids == end_id, axis=1)
  inside = (depth > 0) & ~is_start
  t = jnp.arange(s)
  last_start = jax.lax.cummax(jnp.where(is_start, t, -1), axis=1)
  q = features.shape[-2]
  slot = jnp.clip(t - last_start - 1, 0, q - 1)
  if features.ndim == 4:
    m = features.shape[1]
    image_index = jnp.clip(jnp.cumsum(is_start, axis=1) - 1, 0, m - 1)
    picked = features[jnp.arange(b)[:, None], image_index, slot]
  else:
    n = features.shape[0]
    image_index = jnp.clip(jnp.cumsum(is_start.reshape(-1)).reshape(b, s) - 1, 0, n - 1)
    picked = features[image_index, slot]
  return jnp.where(inside[..., None], picked.astype(embeds.dtype), embeds)


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
    self.visual = VisionTransformer(c.visual, scan_layers=c.scan_layers, remat_policy=c.remat_policy, **kw)
    self.resampler = Resampler(c.visual, **kw)
    self.decoder = Decoder(c)
    self.lm_head = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False, **kw)

  def vit(self, pixel_values: jax.Array) -> jax.Array:
    """[N, 3, H, W] -> [N, P, width]."""
    return self.visual(pixel_values)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """[N, 3, H, W] normalised pixels -> [N, n_queries, hidden_size]."""
    return self.resampler(self.visual(pixel_values))

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
    `image_features` [N, Q, D] | [B, M, Q, D] (see `splice_images`). `inference=True` enables the official inference-only behaviours (dynamic NTK, logn) when the
    config enables them; `ntk_alpha_value` overrides the NTK alpha (cached decoding keeps the prefill's).
    """
    c = self.cfg
    b, s = input_ids.shape
    valid = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
      if cache is not None:
        # continue after the real tokens already cached in each row
        positions = positions + jnp.sum(cache.valid, axis=1, keepdims=True)
    x = self.wte(input_ids)
    if pixel_values is not None:
      if pixel_values.ndim == 5:  # [B, M, 3, H, W]: M image slots per (packed) row
        feats = self.encode_images(pixel_values.reshape((-1,) + pixel_values.shape[2:]))
        image_features = feats.reshape(pixel_values.shape[:2] + feats.shape[1:])
      else:
        image_features = self.encode_images(pixel_values)
    if image_features is not None:
      x = splice_images(x, input_ids, image_features, c.visual.image_start_id, c.visual.image_end_id)
    # Constrain at the block boundary: left to propagation, the splice's sharding (image features come out
    # split over 'tensor') gave wrong logits under jax.set_mesh on jax 0.10.2 (tests/sharded_forward.py).
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    if cache is None:
      q_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
      mask = make_attention_mask(q_slots, valid, segment_ids, segment_ids)
      cache_start, key_len = None, s
    else:
      cache_start = cache.length
      q_slots = jnp.broadcast_to(cache_start + jnp.arange(s), (b, s))
      key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache_start, axis=1)
      mask = make_attention_mask(q_slots, key_valid)
      key_len = s  # a prefill: the official alpha comes from the new tokens' count

    use_ntk = inference and c.use_dynamic_ntk
    if ntk_alpha_value is None:
      ntk_alpha_value = ntk_alpha(key_len, c.seq_length) if use_ntk else 1.0
    io = StepInputs(
        positions=positions, mask=mask,
        inv_freq=inv_frequencies(c.rotary_dim, c.rotary_emb_base, ntk_alpha_value),
        query_scale=logn_scale(positions, c.seq_length) if (inference and c.use_logn_attn) else None,
        cache_start=cache_start)
    hidden, new_kv = self.decoder(x, io, cache)
    out = hidden if return_hidden else self.lm_head(hidden)
    if cache is None:
      return out
    new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=key_valid, length=cache.length + s)
    return out, new_cache


def _init_inputs(cfg: QwenVLConfig):
  v = cfg.visual
  ids = jnp.zeros((1, v.n_queries + 2), jnp.int32)
  pixels = jnp.zeros((1, 3, v.image_size, v.image_size), jnp.float32)
  return ids, pixels


def init_params(cfg: QwenVLConfig, rng: jax.Array, boxed: bool = False):
  """Random parameters (official-style initialisers). `boxed=True` keeps the logical-axis metadata."""
  ids, pixels = _init_inputs(cfg)
  variables = QwenVL(cfg).init(rng, ids, pixel_values=pixels, inference=False)
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)


def abstract_params(cfg: QwenVLConfig, boxed: bool = False):
  """Shapes and dtypes of every parameter (a tree of ShapeDtypeStruct); nothing is allocated."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=boxed))


def count_params(cfg: QwenVLConfig) -> int:
  """Number of parameters (the resampler's fixed sin-cos table included, as in the official checkpoint)."""
  return sum(int(x.size) for x in jax.tree.leaves(abstract_params(cfg)))

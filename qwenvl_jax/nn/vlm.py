"""Putting image features into token embeddings: the two ways the families mark where they go.

  * spans (Qwen-VL): a fixed number of slots strictly between `<img>` and `</img>` per image;
  * placeholders (Qwen2-VL, InternVL): every `<|image_pad|>` (or `<IMG_CONTEXT>`) token takes the next feature row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def splice_spans(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, start_id: int,
                 end_id: int, segment_ids: jax.Array | None = None) -> jax.Array:
  """Overwrite image-slot embeddings with image features.

  embeds: [B, S, D]; input_ids: [B, S]. features: [N, Q, D] consumed batch-major (image k fills the k-th span
  counted row by row), or [B, M, Q, D] with M image slots per row (packed rows: row b's k-th span takes
  features[b, k]). Spans must be well formed (checked on the host before the call); unused features are ignored.
  segment_ids [B, S] (packed rows): a span never reaches past its sample, so a stray tag in one sample cannot
  take the image slots of the next.
  """
  b, s = input_ids.shape
  is_start = input_ids == start_id
  step = is_start.astype(jnp.int32) - (input_ids == end_id).astype(jnp.int32)
  depth = jnp.cumsum(step, axis=1)
  t = jnp.arange(s)
  if segment_ids is not None:  # restart the depth at each sample's first token
    first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    seg_start = jax.lax.cummax(jnp.where(first, t, 0), axis=1)
    depth = depth - jnp.take_along_axis(depth - step, seg_start, axis=1)
  inside = (depth > 0) & ~is_start
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


def scatter_placeholders(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, token_id: int,
                         offset: jax.Array | int = 0) -> jax.Array:
  """Every `token_id` in input_ids takes the next row of features, starting at `offset`.

  embeds: [B, S, D]; input_ids: [B, S]. features: [N, D] consumed batch-major (offset: a scalar), or [B, N, D]
  with each row's own features (packed training rows; offset: [B] or a scalar). Rows beyond the placeholders (e.g.
  padding) are ignored; the count must match (checked on the host before the call).
  """
  b, s = input_ids.shape
  is_ph = input_ids == token_id
  if features.ndim == 3:
    index = jnp.cumsum(is_ph, axis=1) - 1 + jnp.reshape(jnp.asarray(offset), (-1, 1))
    index = jnp.clip(index, 0, features.shape[1] - 1)
    picked = jnp.take_along_axis(features, index[..., None], axis=1)
  else:
    index = jnp.cumsum(is_ph.reshape(-1)).reshape(b, s) - 1 + offset
    picked = features[jnp.clip(index, 0, features.shape[0] - 1)]
  return jnp.where(is_ph[..., None], picked.astype(embeds.dtype), embeds)

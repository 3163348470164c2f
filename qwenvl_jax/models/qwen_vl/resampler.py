"""The Qwen-VL adapter: a position-aware cross-attention resampler.

ViT tokens [N, P, width] -> kv_proj (no bias) -> ln_kv; n_queries learned queries -> ln_q;
queries + fixed 2-D sin-cos positions attend to keys (+ the same table bicubic-resized to the ViT grid)
and values (no positions) -> ln_post -> x @ proj -> [N, n_queries, output_dim].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.models.qwen_vl.config import VisionConfig
from qwenvl_jax.nn.attention import MultiHeadAttention
from qwenvl_jax.nn.layers import LayerNorm, cast, dense
from qwenvl_jax.nn.positions import resize_square_table, sincos_2d


def identity_qk_init(key, shape, dtype=jnp.float32):
  """q/k kernels [d, heads, head_dim] that start as the identity (heads * head_dim == d): a fresh resampler's
  attention logits are then led by the dot products of the shared 2-D positions, so each query starts on its own
  part of the image. With random q/k kernels a resampler trained from scratch starts with every query averaging
  all the ViT tokens (the values carry no positions): images that differ in where things are give nearly the same
  features, and nothing spatial (positions, boxes, words) reaches the LLM. A checkpoint replaces this init."""
  del key
  d, heads, head_dim = shape
  return jnp.eye(d, heads * head_dim, dtype=dtype).reshape(shape)


class Resampler(nn.Module):
  """`pos_embed` is a parameter (it is in the official checkpoint) that the training recipe keeps frozen."""
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, P, width] -> [N, n_queries, output_dim]."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, nq = c.output_dim, c.n_queries
    grid = int(round(nq ** 0.5))
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        lambda *_: jnp.asarray(sincos_2d(d, grid), self.param_dtype), ("queries", "embed")), (nq, d))
    query = self.param("query", nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                             ("queries", "embed")), (nq, d), self.param_dtype)
    kv = dense(d, ("vit_embed", "embed"), name="kv_proj", use_bias=False, **kw)(x)
    kv = LayerNorm(c.layer_norm_eps, "embed", name="ln_kv", **kw)(kv)
    q = LayerNorm(c.layer_norm_eps, "embed", name="ln_q", **kw)(query)
    q = (q + pos.astype(self.dtype))[None].repeat(x.shape[0], axis=0)
    k = kv + resize_square_table(pos, x.shape[1]).astype(self.dtype)
    out = MultiHeadAttention(c.resampler_heads, d // c.resampler_heads, d, "embed", "heads", "embed",
                             qk_init=identity_qk_init, name="attn", **kw)(q, k, kv)
    self.sow("intermediates", "attn_out", out)
    out = LayerNorm(c.layer_norm_eps, "embed", name="ln_post", **kw)(out)
    proj = self.param("proj", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5),
                                                           ("embed", "embed_out")), (d, d), self.param_dtype)
    return out @ cast(proj, self.dtype)

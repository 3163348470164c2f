"""The Qwen (v1) decoder stack: pre-RMSNorm blocks with RoPE self-attention and a SwiGLU MLP.

Official conventions kept here: q/k/v carry a bias, c_proj and the MLP do not (`no_bias`); the MLP is
down(up(x) * silu(gate(x))) where the official `w1` is `up` and `w2` is `gate`.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.config import QwenVLConfig, as_dtype
from qwenvl_jax.nn.attention import KVCache, cached_attention, dot_product_attention
from qwenvl_jax.nn.layers import RMSNorm, apply_layers, dense
from qwenvl_jax.nn.rotary import apply_rope


@flax.struct.dataclass
class StepInputs:
  """What every decoder layer needs besides its own activations and cache slice.

  positions: [B, S] RoPE positions; mask: [B, 1, S, T] bool; inv_freq: [rotary_dim / 2];
  query_scale: [B, S] logn multipliers or None; cache_start: [] slot where new keys are written.
  """
  positions: jax.Array
  mask: jax.Array
  inv_freq: jax.Array
  query_scale: jax.Array | None
  cache_start: jax.Array | None


class SelfAttention(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x, io: StepInputs, layer_cache):
    c = self.cfg
    kw = dict(dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
    h, dh = c.num_attention_heads, c.head_dim
    q, k, v = (dense((h, dh), ("embed", "heads", "kv"), name=n, use_bias=True, **kw)(x) for n in "qkv")
    q = apply_rope(q, io.positions, io.inv_freq)
    k = apply_rope(k, io.positions, io.inv_freq)
    if io.query_scale is not None:
      q = (q.astype(jnp.float32) * io.query_scale[:, :, None, None]).astype(q.dtype)
    new_cache = None
    if layer_cache is None:
      out = dot_product_attention(q, k, v, io.mask)
    else:
      ck, cv = layer_cache  # [B, H, T, Dh]
      ck = jax.lax.dynamic_update_slice_in_dim(ck, k.swapaxes(1, 2).astype(ck.dtype), io.cache_start, axis=2)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, v.swapaxes(1, 2).astype(cv.dtype), io.cache_start, axis=2)
      new_cache = (ck, cv)
      out = cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), io.mask)
    out = dense(c.hidden_size, ("heads", "kv", "embed"), name="o", use_bias=not c.no_bias, contract=2,
                **kw)(out)
    return out, new_cache


class MLP(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    kw = dict(use_bias=not c.no_bias, dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
    gate = dense(c.mlp_dim, ("embed", "mlp"), name="gate", **kw)(x)
    up = dense(c.mlp_dim, ("embed", "mlp"), name="up", **kw)(x)
    return dense(c.hidden_size, ("mlp", "embed"), name="down", **kw)(up * nn.silu(gate))


class DecoderBlock(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x, io: StepInputs, layer_cache=None):
    c = self.cfg
    kw = dict(dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
    h = RMSNorm(c.layer_norm_epsilon, name="ln_1", **kw)(x)
    h, new_cache = SelfAttention(c, name="attn")(h, io, layer_cache)
    x = x + h
    h = RMSNorm(c.layer_norm_epsilon, name="ln_2", **kw)(x)
    x = x + MLP(c, name="mlp")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


class Decoder(nn.Module):
  """Blocks + final norm. Embedding and lm_head live in the VLM so images can be spliced in between."""
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, x: jax.Array, io: StepInputs, cache: KVCache | None = None):
    """x: [B, S, D] input embeddings -> (hidden [B, S, D] after ln_f, updated (k, v) in the cache's form, or None)."""
    c = self.cfg
    layer_caches = None
    if cache is not None:
      layer_caches = list(zip(cache.k, cache.v)) if isinstance(cache.k, tuple) else (cache.k, cache.v)
    x, new_kv = apply_layers(DecoderBlock, dict(cfg=c), x, (io,), layer_caches, length=c.num_hidden_layers,
                             scan=c.scan_layers, remat=c.remat_policy)
    if isinstance(new_kv, list):  # per-layer buffers
      new_kv = (tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv))
    x = RMSNorm(c.layer_norm_epsilon, name="ln_f", dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))(x)
    return x, new_kv

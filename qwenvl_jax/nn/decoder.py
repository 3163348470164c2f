"""The decoder stack shared by the families: pre-RMSNorm blocks, rotary self-attention (MHA or grouped-query),
SwiGLU MLP, a final RMSNorm. Embedding and LM head stay in each family's model, so images are spliced in between.

Qwen (v1): q/k/v biased, out projection and MLP without bias (`no_bias`), H key/value heads, 1-D RoPE with dynamic
NTK and logn. Qwen2 / Qwen2-VL: q/k/v biased, nothing else, K < H key/value heads, 1-D RoPE or M-RoPE. The rotary
variant is the family's business: blocks receive the angles (`StepInputs.rope`) computed once per forward.
Parameter names: layers/{ln_1, attn/{q,k,v,o}, ln_2, mlp/{gate,up,down}}, ln_f.
"""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.nn.attention import KVCache, cached_attention, dot_product_attention, make_attention_mask
from qwenvl_jax.nn.layers import RMSNorm, SwiGLU, apply_layers, as_dtype, dense
from qwenvl_jax.nn.rotary import apply_rotary


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """Everything the decoder stack needs; each family's config derives one (`cfg.decoder`)."""
  num_layers: int
  hidden: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp_dim: int
  eps: float = 1e-6
  qkv_bias: bool = True
  out_bias: bool = False
  mlp_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan: bool = True
  remat: str = "none"

  @property
  def kw(self) -> dict:
    return dict(dtype=as_dtype(self.dtype), param_dtype=as_dtype(self.param_dtype))


@flax.struct.dataclass
class StepInputs:
  """What every decoder layer needs besides its own activations and cache slice.

  rope: [B, S, R/2] rotation angles; mask: [B, 1, S, T] bool; query_scale: [B, S] logn multipliers or None;
  cache_start: [] slot where new keys are written (None without a cache).
  """
  rope: jax.Array
  mask: jax.Array
  query_scale: jax.Array | None
  cache_start: jax.Array | None


class SelfAttention(nn.Module):
  spec: DecoderSpec

  @nn.compact
  def __call__(self, x, io: StepInputs, layer_cache):
    c = self.spec
    def proj(name, heads):
      axes = ("embed", "heads" if heads == c.heads else "kv_heads", "kv")
      return dense((heads, c.head_dim), axes, name=name, use_bias=c.qkv_bias, **c.kw)(x)
    q, k, v = proj("q", c.heads), proj("k", c.kv_heads), proj("v", c.kv_heads)
    q, k = apply_rotary(q, io.rope), apply_rotary(k, io.rope)
    if io.query_scale is not None:
      q = (q.astype(jnp.float32) * io.query_scale[:, :, None, None]).astype(q.dtype)
    new_cache = None
    if layer_cache is None:
      out = dot_product_attention(q, k, v, io.mask)
    else:
      ck, cv = layer_cache  # [B, K, T, Dh]
      ck = jax.lax.dynamic_update_slice_in_dim(ck, k.swapaxes(1, 2).astype(ck.dtype), io.cache_start, axis=2)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, v.swapaxes(1, 2).astype(cv.dtype), io.cache_start, axis=2)
      new_cache = (ck, cv)
      out = cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), io.mask)
    out = dense(c.hidden, ("heads", "kv", "embed"), name="o", use_bias=c.out_bias, contract=2, **c.kw)(out)
    return out, new_cache


class DecoderBlock(nn.Module):
  spec: DecoderSpec

  @nn.compact
  def __call__(self, x, io: StepInputs, layer_cache=None):
    c = self.spec
    h = RMSNorm(c.eps, name="ln_1", **c.kw)(x)
    h, new_cache = SelfAttention(c, name="attn")(h, io, layer_cache)
    x = x + h
    h = RMSNorm(c.eps, name="ln_2", **c.kw)(x)
    x = x + SwiGLU(c.mlp_dim, c.hidden, use_bias=c.mlp_bias, name="mlp", **c.kw)(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


class Decoder(nn.Module):
  """Blocks + final norm."""
  spec: DecoderSpec

  @nn.compact
  def __call__(self, x: jax.Array, io: StepInputs, cache: KVCache | None = None):
    """x: [B, S, D] input embeddings -> (hidden [B, S, D] after ln_f, updated (k, v) in the cache's form, or None)."""
    c = self.spec
    layer_caches = None
    if cache is not None:
      layer_caches = list(zip(cache.k, cache.v)) if isinstance(cache.k, tuple) else (cache.k, cache.v)
    x, new_kv = apply_layers(DecoderBlock, dict(spec=c), x, (io,), layer_caches, length=c.num_layers,
                             scan=c.scan, remat=c.remat)
    if isinstance(new_kv, list):  # per-layer buffers
      new_kv = (tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv))
    x = RMSNorm(c.eps, name="ln_f", **c.kw)(x)
    return x, new_kv


def decoder_masks(valid: jax.Array, segment_ids: jax.Array | None, cache: KVCache | None):
  """Attention mask and cache bookkeeping of one forward.

  valid: [B, S] real tokens of this call -> (mask [B, 1, S, T], cache_start or None, key_valid [B, T]).
  Without a cache keys are this call's tokens (segments keep packed samples apart); with one, the new tokens are
  written at `cache.length` and attend to every valid cached slot before them.
  """
  b, s = valid.shape
  if cache is None:
    q_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    return make_attention_mask(q_slots, valid, segment_ids, segment_ids), None, valid
  start = cache.length
  q_slots = jnp.broadcast_to(start + jnp.arange(s), (b, s))
  key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, start, axis=1)
  return make_attention_mask(q_slots, key_valid), start, key_valid


def updated_cache(cache: KVCache, new_kv, key_valid: jax.Array, new_tokens: int, next_pos: jax.Array) -> KVCache:
  """The cache after a forward that wrote `new_tokens` slots; next_pos: [B] position of each row's next token."""
  return KVCache(k=new_kv[0], v=new_kv[1], valid=key_valid, length=cache.length + new_tokens, next_pos=next_pos)

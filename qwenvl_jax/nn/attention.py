"""Attention masks, the KV cache, the attention kernel calls (MHA and grouped-query), and multi-head attention.

Masks are boolean [B, 1, S, T] (True = may attend), built once per forward and shared by all layers:
  query i (cache slot q_slot[i]) may see key slot t  iff  t <= q_slot[i]  (causal)
                                                     and key_valid[t]     (padding / unfilled cache)
                                                     and segment[t] == segment[i]  (packed samples)
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.nn.layers import Initializer, RMSNorm, dense
from qwenvl_jax.nn.rotary import apply_rotary


@flax.struct.dataclass
class KVCache:
  """Decoder KV cache; every row's tokens sit at the same slots (prompts are left-padded).

  k, v:     [L, B, K, T, Dh] keys after RoPE, values (scanned layers), or tuples of L arrays [B, K, T, Dh]
            (unrolled layers: each layer's buffers are updated in place); K = key/value heads. Heads before slots,
            so both attention products read the cache as stored (batch dims leading) instead of transposing all
            of it every step.
  valid:    [B, T] bool     slot holds a real (non-padding) token
  length:   [] int32        number of slots filled so far (same for all rows)
  next_pos: [B] int32       RoPE position of the row's next token (the real tokens so far for 1-D RoPE; for
                            M-RoPE, 1 + the largest position id so far)
  """
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array
  length: jax.Array
  next_pos: jax.Array

  @classmethod
  def empty(cls, num_layers: int, batch: int, max_len: int, heads: int, head_dim: int, dtype,
            per_layer: bool = False) -> "KVCache":
    """heads: key/value heads (fewer than query heads under grouped-query attention)."""
    valid, length = jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32)
    next_pos = jnp.zeros((batch,), jnp.int32)
    if per_layer:
      shape = (batch, heads, max_len, head_dim)
      k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)) for _ in range(2))
      return cls(k=k, v=v, valid=valid, length=length, next_pos=next_pos)
    shape = (num_layers, batch, heads, max_len, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), valid=valid, length=length, next_pos=next_pos)

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


def make_attention_mask(q_slots: jax.Array, key_valid: jax.Array, q_segments: jax.Array | None = None,
                   k_segments: jax.Array | None = None) -> jax.Array:
  """q_slots: [B, S] int slot index of each query; key_valid: [B, T] bool -> mask [B, 1, S, T]."""
  t = jnp.arange(key_valid.shape[1])
  mask = (t[None, None, :] <= q_slots[:, :, None]) & key_valid[:, None, :]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          scale: float | None = None) -> jax.Array:
  """q: [B, S, H, Dh], k/v: [B, T, K, Dh] (K divides H: grouped-query attention, query head h reads key/value
  head h // (H / K)), mask: [B, 1, S, T] bool or None -> [B, S, H, Dh].

  Scores and softmax in float32 (jax.nn.dot_product_attention does so for low-precision inputs); XLA may
  pick a fused kernel on TPU/GPU.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Attention over a KV cache in its heads-major layout.

  q: [B, S, H, Dh]; k/v: [B, K, T, Dh] with K dividing H (grouped-query); mask: [B, 1, S, T] bool -> [B, S, H, Dh].
  Scores and softmax in float32, scaled by Dh^-0.5 as `dot_product_attention`.
  """
  b, s, h, d = q.shape
  kv_heads = k.shape[1]
  if kv_heads == h:  # plain multi-head: the 4-D products (XLA lowers them without the group axis' transposes)
    scores = jnp.einsum("bshd,bhtd->bhst", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bhtd->bshd", probs, v)
  qg = q.reshape(b, s, kv_heads, h // kv_heads, d)  # query head h = kv head * group + g
  scores = jnp.einsum("bskgd,bktd->bkgst", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgst,bktd->bskgd", probs, v).reshape(b, s, h, d)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with biased out projection and (by default) biased q/k/v (ViT blocks, resampler),
  optional rotary angles, optional RMS normalisation of q and k over all heads (`qk_norm`: InternViT-6B).

  Kernels: q/k/v [in, heads, head_dim] named (in_axis, heads_axis, 'kv'); out [heads, head_dim, out].
  """
  heads: int
  head_dim: int
  out_features: int
  in_axis: str
  heads_axis: str
  out_axis: str
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  qk_norm: bool = False
  qkv_bias: bool = True
  qk_init: Initializer | None = None  # the q and k kernels' initializer (None: the default of every kernel)

  @nn.compact
  def __call__(self, x_q: jax.Array, x_k: jax.Array, x_v: jax.Array, mask: jax.Array | None = None,
               rope: jax.Array | None = None):
    """x_q: [B, S, Din], x_k/x_v: [B, T, Din] -> [B, S, out_features]. rope: [B, S, R/2] angles rotating queries
    and keys (self-attention only)."""
    def proj(name, x):
      init = {} if self.qk_init is None or name == "v" else {"kernel_init": self.qk_init}
      return dense((self.heads, self.head_dim), (self.in_axis, self.heads_axis, "kv"), name=name,
                   use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, **init)(x)
    q, k, v = proj("q", x_q), proj("k", x_k), proj("v", x_v)
    if self.qk_norm:  # over the whole width (all heads), as InternViT: [B, S, H, Dh] -> [B, S, H*Dh] and back
      def norm(name, t):
        flat = t.reshape(*t.shape[:-2], -1)
        return RMSNorm(1e-6, self.in_axis, name=name, dtype=self.dtype, param_dtype=self.param_dtype)(
            flat).reshape(t.shape)
      q, k = norm("q_norm", q), norm("k_norm", k)
    if rope is not None:
      q, k = apply_rotary(q, rope), apply_rotary(k, rope)
    out = dot_product_attention(q, k, v, mask)
    return dense(self.out_features, (self.heads_axis, "kv", self.out_axis), name="out", use_bias=True,
                 contract=2, dtype=self.dtype, param_dtype=self.param_dtype)(out)

"""Rotary position embeddings (rotate-half form), dynamic NTK scaling and logn attention scaling.

Formulas follow the official Qwen(-VL) code:
  * NTK alpha for a context of n tokens: alpha = max(2 ** ceil(log2(n / seq_length) + 1) - 1, 1);
    the RoPE base becomes base * alpha ** (d / (d - 2)), d = rotary dimension.
  * logn: the query at absolute position p is multiplied by log(p + 1) / log(seq_length) once p + 1 > seq_length.
Both are inference-only behaviours; training uses alpha = 1 and no logn.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def ntk_alpha(context_len: int, seq_length: int) -> float:
  """Dynamic-NTK alpha for a context of `context_len` tokens (host-side, as the official code)."""
  context_value = math.log(context_len / seq_length, 2) + 1
  return float(max(2 ** math.ceil(context_value) - 1, 1))


def inv_frequencies(dim: int, base: float, alpha: jax.Array | float = 1.0) -> jax.Array:
  """[dim // 2] float32 inverse frequencies for a (possibly traced) NTK alpha."""
  alpha = jnp.asarray(alpha, jnp.float32)
  scaled_base = base * alpha ** (dim / (dim - 2))
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  return 1.0 / (scaled_base ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate the first 2*len(inv_freq) channels of each head.

  x: [B, S, H, Dh]; positions: [B, S] int; inv_freq: [R/2]. Computed in float32, returned in x.dtype.
  """
  rot = 2 * inv_freq.shape[0]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [B, S, R/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, S, 1, R]
  xf = x.astype(jnp.float32)
  xr, xpass = xf[..., :rot], xf[..., rot:]
  x1, x2 = jnp.split(xr, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = xr * jnp.cos(angles) + rotated * jnp.sin(angles)
  return jnp.concatenate([out, xpass], axis=-1).astype(x.dtype)


def logn_scale(positions: jax.Array, seq_length: int) -> jax.Array:
  """[B, S] float32 query multipliers: log(p + 1) / log(seq_length) beyond the training context, else 1."""
  p1 = positions.astype(jnp.float32) + 1.0
  return jnp.where(p1 > seq_length, jnp.log(p1) / math.log(seq_length), 1.0)

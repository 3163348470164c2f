"""Rotary position embeddings (rotate-half form): 1-D, M-RoPE and 2-D vision angles; dynamic NTK and logn scaling.

Every variant reduces to rotation angles [..., R/2] (one per frequency) that `apply_rotary` applies to the first R
channels of each head, the same angle on both rotate-half halves:
  * 1-D (Qwen, Qwen2):  angle[j] = position * inv_freq[j]
  * M-RoPE (Qwen2-VL):  angle[j] = position[axis(j)] * inv_freq[j], axis(j) = t, h or w by `mrope_section`
  * 2-D vision RoPE (Qwen2-VL ViT): angles = [row * f, col * f] with f over head_dim / 4 frequencies

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
import numpy as np


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


def rope_angles(positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """positions [...] int -> angles [..., R/2] float32."""
  return positions.astype(jnp.float32)[..., None] * inv_freq


def mrope_angles(positions: jax.Array, inv_freq: jax.Array, sections: tuple[int, ...]) -> jax.Array:
  """M-RoPE: positions [3, B, S] (temporal, height, width) -> angles [B, S, R/2].

  Frequency j takes its position from axis k where j falls in the k-th block of `sections` (e.g. (16, 24, 24):
  the first 16 frequencies rotate by the temporal position, the next 24 by the row, the last 24 by the column).
  """
  if sum(sections) != inv_freq.shape[0]:
    raise ValueError(f"mrope_section {tuple(sections)} does not sum to the {inv_freq.shape[0]} rotary frequencies")
  axis = np.repeat(np.arange(len(sections)), sections)   # [R/2]: the position axis of each frequency
  per_freq = jnp.moveaxis(positions[axis], 0, -1)          # [B, S, R/2]
  return per_freq.astype(jnp.float32) * inv_freq


def vision_rope_angles(rows_cols: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
  """2-D RoPE of the Qwen2-VL ViT: rows_cols [..., 2] int (patch row, patch column) -> angles [..., head_dim / 2].

  head_dim / 4 frequencies 1 / theta^(2i / (head_dim / 2)); the first half of the angles comes from the row, the
  second half from the column.
  """
  inv_freq = inv_frequencies(head_dim // 2, theta)
  return jnp.concatenate([rope_angles(rows_cols[..., 0], inv_freq), rope_angles(rows_cols[..., 1], inv_freq)], -1)


def apply_rotary(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotate the first 2 * angles.shape[-1] channels of each head.

  x: [B, S, H, Dh]; angles: [B, S, R/2] float32 (or broadcastable). Computed in float32, returned in x.dtype.
  """
  rot = 2 * angles.shape[-1]
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [B, S, 1, R]
  xf = x.astype(jnp.float32)
  xr, xpass = xf[..., :rot], xf[..., rot:]
  x1, x2 = jnp.split(xr, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = xr * jnp.cos(angles) + rotated * jnp.sin(angles)
  return jnp.concatenate([out, xpass], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """1-D RoPE: x [B, S, H, Dh], positions [B, S] int, inv_freq [R/2] -> x with its first R channels rotated."""
  return apply_rotary(x, rope_angles(positions, inv_freq))


def logn_scale(positions: jax.Array, seq_length: int) -> jax.Array:
  """[B, S] float32 query multipliers: log(p + 1) / log(seq_length) beyond the training context, else 1."""
  p1 = positions.astype(jnp.float32) + 1.0
  return jnp.where(p1 > seq_length, jnp.log(p1) / math.log(seq_length), 1.0)

"""PyTorch-compatible bicubic resizing and fixed 2-D sin-cos tables for square position grids."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic-convolution weights for the 4 taps at offsets -1, 0, 1, 2 of a fractional position t."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] float32 matrix of torch `interpolate(mode='bicubic', align_corners=False)`.

  Matches torch's CPU kernel: float32 source coordinates (dst + 0.5) * in/out - 0.5, 4 taps with
  border-clamped indices, no antialiasing (also when shrinking).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.floor(src)
  t = (src - base).astype(np.float32)
  w = _cubic_weights(t, np.float32(a)).astype(np.float32)  # [out, 4]
  m = np.zeros((out_size, in_size), np.float32)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), w[:, k])
  return m


def resize_square_table(table: jax.Array, out_tokens: int) -> jax.Array:
  """Bicubic-resize a [n*n, C] table laid out on an n x n grid to [m*m, C] (m*m = out_tokens), in float32."""
  n = int(round(table.shape[0] ** 0.5))
  m = int(round(out_tokens ** 0.5))
  if n == m:
    return table
  w = jnp.asarray(bicubic_matrix(n, m))
  grid = table.astype(jnp.float32).reshape(n, n, -1)
  out = jnp.einsum("yi,xj,ijc->yxc", w, w, grid, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(m * m, -1).astype(table.dtype)


def sincos_2d(embed_dim: int, grid: int) -> np.ndarray:
  """[grid*grid, embed_dim] float32 table (row-major grid): first half encodes the column, second the row.

  Computed in float32 like the official numpy code, so a fresh table equals the checkpoint's bit for bit.
  """
  coords = np.arange(grid, dtype=np.float32)
  cols, rows = np.meshgrid(coords, coords)

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(embed_dim // 2, cols), one_d(embed_dim // 2, rows)], axis=1).astype(np.float32)

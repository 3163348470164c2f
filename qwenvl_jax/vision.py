"""The Qwen-VL vision transformer (OpenCLIP ViT-bigG/14 layout).

pixels [N, 3, H, W] -> patch embedding (conv without bias, as an einsum over patches)
  -> + learned 16x16 position table bicubic-resized to the patch grid -> ln_pre
  -> pre-LN blocks (MHA, exact-GELU MLP) -> tokens [N, grid*grid, width].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.config import VisionConfig
from qwenvl_jax.nn.attention import MultiHeadAttention
from qwenvl_jax.nn.layers import LayerNorm, apply_layers, dense
from qwenvl_jax.nn.resize import resize_square_table


class VisionMLP(nn.Module):
  cfg: VisionConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.cfg.mlp_dim, ("vit_embed", "vit_mlp"), name="fc1", **kw)(x)
    x = nn.gelu(x, approximate=False)
    return dense(self.cfg.width, ("vit_mlp", "vit_embed"), name="fc2", **kw)(x)


class VisionBlock(nn.Module):
  """Pre-LN transformer block; signature fits `apply_layers` (no per-layer inputs/outputs)."""
  cfg: VisionConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, _layer_in=None):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(c.layer_norm_eps, "vit_embed", name="ln_1", **kw)(x)
    h = MultiHeadAttention(c.heads, c.head_dim, c.width, "vit_embed", "vit_heads", "vit_embed",
                           name="attn", **kw)(h, h, h)
    x = x + h
    h = LayerNorm(c.layer_norm_eps, "vit_embed", name="ln_2", **kw)(x)
    x = x + VisionMLP(c, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "vit_embed"))
    return x, None


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
  """[N, C, H, W] -> [N, gh, gw, p, p, C] (patch rows, patch cols, pixel row, pixel col, channel)."""
  n, c, h, w = pixels.shape
  x = pixels.reshape(n, c, h // patch, patch, w // patch, patch)
  return x.transpose(0, 2, 4, 3, 5, 1)


class VisionTransformer(nn.Module):
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels: [N, 3, H, W] normalised -> ViT tokens [N, (H/p)*(W/p), width]."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
      raise ValueError(f"pixel_values must be [N, 3, H, W], got shape {tuple(pixels.shape)}")
    if pixels.shape[2] % c.patch_size or pixels.shape[3] % c.patch_size:
      raise ValueError(f"image size {pixels.shape[2:]} is not a multiple of the patch size {c.patch_size}")
    kernel = self.param(
        "patch_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("patch_h", "patch_w", "channels", "vit_embed")),
        (c.patch_size, c.patch_size, 3, c.width), self.param_dtype)
    patches = patchify(pixels.astype(self.dtype), c.patch_size)
    x = jnp.einsum("nyxhwc,hwcd->nyxd", patches, kernel.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, c.width)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(c.width ** -0.5),
                                                               ("pos", "vit_embed")),
                     (c.pos_table_size, c.width), self.param_dtype)
    x = x + resize_square_table(pos, x.shape[1]).astype(self.dtype)
    x = LayerNorm(c.layer_norm_eps, "vit_embed", name="ln_pre", **kw)(x)
    x, _ = apply_layers(VisionBlock, dict(cfg=c, **kw), x, length=c.layers, scan=self.scan_layers,
                        remat=self.remat_policy)
    return x

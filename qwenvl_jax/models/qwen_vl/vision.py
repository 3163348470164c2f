"""The Qwen-VL vision transformer (OpenCLIP ViT-bigG/14 layout).

pixels [N, 3, H, W] -> patch embedding (conv without bias, as an einsum over patches)
  -> + learned 16x16 position table bicubic-resized to the patch grid -> ln_pre
  -> the shared ViT trunk (exact-GELU MLP) -> tokens [N, grid*grid, width].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.models.qwen_vl.config import QwenVLConfig
from qwenvl_jax.nn.layers import LayerNorm, cast
from qwenvl_jax.nn.positions import resize_square_table
from qwenvl_jax.nn.vit import patchify, vit_trunk


class VisionTransformer(nn.Module):
  cfg: QwenVLConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels: [N, 3, H, W] normalised -> ViT tokens [N, (H/p)*(W/p), width]."""
    spec, c = self.cfg.vit, self.cfg.visual
    if pixels.ndim != 4 or pixels.shape[1] != 3:
      raise ValueError(f"pixel_values must be [N, 3, H, W], got shape {tuple(pixels.shape)}")
    if pixels.shape[2] % c.patch_size or pixels.shape[3] % c.patch_size:
      raise ValueError(f"image size {pixels.shape[2:]} is not a multiple of the patch size {c.patch_size}")
    dtype, param_dtype = spec.kw["dtype"], spec.kw["param_dtype"]
    kernel = self.param(
        "patch_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("patch_h", "patch_w", "channels", "vit_embed")),
        (c.patch_size, c.patch_size, 3, c.width), param_dtype)
    patches = patchify(pixels.astype(dtype), c.patch_size)
    x = jnp.einsum("nyxhwc,hwcd->nyxd", patches, cast(kernel, dtype))
    x = x.reshape(x.shape[0], -1, c.width)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(c.width ** -0.5),
                                                               ("pos", "vit_embed")),
                     (c.pos_table_size, c.width), param_dtype)
    x = x + resize_square_table(pos, x.shape[1]).astype(dtype)
    x = LayerNorm(c.layer_norm_eps, "vit_embed", name="ln_pre", **spec.kw)(x)
    return vit_trunk(spec, x)

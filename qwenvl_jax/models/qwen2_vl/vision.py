"""The Qwen2-VL vision tower and patch merger.

patches [P, C*T*p*p] (the processor's rows, any number of images and videos packed), or [B, P, C*T*p*p]
(training: each row of a packed batch its own patches, attention never across rows)
  -> Conv3d patch embedding (kernel = stride = (T, p, p), no bias) as one einsum -> [(B,) P, W]
  -> the shared ViT trunk: QuickGELU MLP, 2-D RoPE from each patch's (row, column), attention only within the
     patch's own segment (an image, or one temporal slice of a video): one block-diagonal mask, no padding waste
  -> merger: LayerNorm, each 2x2 window (4 consecutive rows) concatenated, Linear, exact GELU, Linear
     -> [(B,) P/4, D].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.models.qwen2_vl.config import Qwen2VLConfig
from qwenvl_jax.nn.layers import MLP, LayerNorm, cast
from qwenvl_jax.nn.rotary import vision_rope_angles
from qwenvl_jax.nn.vit import vit_trunk


class VisionTower(nn.Module):
  cfg: Qwen2VLConfig

  @nn.compact
  def __call__(self, patches: jax.Array, rows_cols: jax.Array, segments: jax.Array) -> jax.Array:
    """patches: [(B,) P, C*T*p*p]; rows_cols: [(B,) P, 2] int; segments: [(B,) P] int (0 = padding)
    -> [(B,) P, embed_dim]."""
    v, spec = self.cfg.vision, self.cfg.vit
    dtype, param_dtype = spec.kw["dtype"], spec.kw["param_dtype"]
    c, t, p = v.in_channels, v.temporal_patch_size, v.patch_size
    kernel = self.param("patch_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("channels", "patch_t", "patch_h", "patch_w", "vit_embed")),
        (c, t, p, p, v.embed_dim), param_dtype)
    unbatched = patches.ndim == 2
    if unbatched:
      patches, rows_cols, segments = patches[None], rows_cols[None], segments[None]
    x = patches.astype(dtype).reshape(*patches.shape[:2], c, t, p, p)
    x = jnp.einsum("bnctyx,ctyxd->bnd", x, cast(kernel, dtype))                 # [B, P, W]
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]              # [B, 1, P, P]
    rope = vision_rope_angles(rows_cols, v.head_dim, v.rope_theta)              # [B, P, head_dim / 2]
    x = vit_trunk(spec, x, mask, rope)
    return x[0] if unbatched else x


class PatchMerger(nn.Module):
  cfg: Qwen2VLConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [(B,) P, embed_dim] (P a multiple of merge^2) -> [(B,) P / merge^2, hidden_size]."""
    v, kw = self.cfg.vision, self.cfg.vit.kw
    x = LayerNorm(v.layer_norm_eps, "vit_embed", name="ln_q", **kw)(x)
    x = x.reshape(*x.shape[:-2], -1, v.merge_dim)
    return MLP(v.merge_dim, v.hidden_size, "gelu", in_axis="vit_embed", hidden_axis="vit_mlp", out_axis="embed",
               name="mlp", **kw)(x)

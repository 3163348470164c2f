"""InternViT and the connector to the LLM.

tiles [N, 3, S, S] normalised
  -> Conv2d patch embedding (kernel = stride = p, with bias) as an einsum -> [N, g*g, W] (row-major patch grid)
  -> class token first, + learned position table ([1 + 16*16, W] at 448 px; its patch part resized bicubically when
     the grid differs) -> the shared ViT trunk (layer scale, exact GELU; LayerNorm or RMSNorm; optional q/k norm)
     [-> LayerNorm when the config has no mean pooling]  -> [N, 1 + g*g, W]
connector: class token dropped -> pixel shuffle (each 2x2 window of patches -> one token of 4W channels, in the
  order (r, c), (r, c+1), (r+1, c), (r+1, c+1)) -> LayerNorm (eps 1e-5) -> Linear -> GELU -> Linear
  -> [N, (g/2)^2, D].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.models.internvl.config import InternVLConfig
from qwenvl_jax.nn.layers import MLP, LayerNorm, cast
from qwenvl_jax.nn.positions import resize_square_table
from qwenvl_jax.nn.vit import patchify, vit_trunk

PROJECTOR_LN_EPS = 1e-5  # the projector's LayerNorm keeps torch's default eps (the ViT's is 1e-6)


class InternViT(nn.Module):
  cfg: InternVLConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, deterministic: bool = True) -> jax.Array:
    """pixels: [N, 3, H, W] normalised tiles -> [N, 1 + (H/p)*(W/p), W] (class token first). deterministic=False:
    stochastic depth at the config's drop_path_rate (the 'dropout' rng)."""
    v, spec = self.cfg.vision, self.cfg.vit
    if pixels.ndim != 4 or pixels.shape[1] != v.num_channels:
      raise ValueError(f"pixel_values must be [N, {v.num_channels}, H, W], got shape {tuple(pixels.shape)}")
    if pixels.shape[2] != pixels.shape[3] or pixels.shape[2] % v.patch_size:
      raise ValueError(f"tiles must be square multiples of the patch size {v.patch_size}; got {pixels.shape[2:]}")
    dtype, param_dtype = spec.kw["dtype"], spec.kw["param_dtype"]
    p, w = v.patch_size, v.hidden_size
    kernel = self.param("patch_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("patch_h", "patch_w", "channels", "vit_embed")), (p, p, v.num_channels, w),
        param_dtype)
    bias = self.param("patch_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vit_embed",)),
                      (w,), param_dtype)
    x = jnp.einsum("nyxhwc,hwcd->nyxd", patchify(pixels.astype(dtype), p), cast(kernel, dtype))
    x = x.reshape(x.shape[0], -1, w) + bias.astype(dtype)
    cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vit_embed",)), (w,),
                     param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, w)), x], axis=1)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "vit_embed")),
                     (1 + v.grid ** 2, w), param_dtype)
    table = jnp.concatenate([pos[:1], resize_square_table(pos[1:], x.shape[1] - 1)], axis=0)
    x = vit_trunk(spec, x + table.astype(dtype), deterministic=deterministic)
    if not v.use_mean_pooling:
      x = LayerNorm(v.layer_norm_eps, "vit_embed", name="ln_post", **spec.kw)(x)
    return x


def pixel_shuffle(x: jax.Array, merge: int) -> jax.Array:
  """[N, g*g, C] patch tokens (row-major grid) -> [N, (g/m)^2, m*m*C]: each m x m window becomes one token, its
  patches concatenated row by row (InternVL's pixel shuffle, `ps_version` v2)."""
  n, t, c = x.shape
  g = int(round(t ** 0.5))
  x = x.reshape(n, g // merge, merge, g // merge, merge, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (g // merge) ** 2, merge * merge * c)


class Projector(nn.Module):
  """LayerNorm -> Linear -> GELU -> Linear: pixel-shuffled ViT tokens into the LLM width."""
  cfg: InternVLConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., 4W] -> [..., D]."""
    c, kw = self.cfg, self.cfg.vit.kw
    x = LayerNorm(PROJECTOR_LN_EPS, "vit_embed", name="ln", **kw)(x)
    return MLP(c.hidden_size, c.hidden_size, c.projector_hidden_act, in_axis="vit_embed", hidden_axis="mlp",
               out_axis="embed", name="mlp", **kw)(x)


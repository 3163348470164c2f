"""The ViT trunk shared by the families: pre-LN blocks x + attn(ln_1(x)), x + mlp(ln_2(x)).

Qwen-VL: exact-GELU MLP, no positions inside the blocks (a learned table is added before the trunk). Qwen2-VL:
QuickGELU MLP, 2-D rotary angles in every block, attention confined to each image (a block-diagonal mask over one
packed sequence). InternViT: layer scale on both branches (x + ls1 * attn(ln_1(x)), x + ls2 * mlp(ln_2(x))),
LayerNorm or RMSNorm, optional RMS q/k normalisation over all heads, optional q/k/v bias.
Parameter names: layers/{ln_1, attn/{q,k,v,out[,q_norm,k_norm]}, ln_2, mlp/{fc1,fc2}[, ls1, ls2]}.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.nn.attention import MultiHeadAttention
from qwenvl_jax.nn.layers import MLP, LayerNorm, RMSNorm, apply_layers, as_dtype


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  width: int
  layers: int
  heads: int
  mlp_dim: int
  activation: str = "gelu"   # gelu | quick_gelu | gelu_tanh
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan: bool = True
  remat: str = "none"
  norm: str = "layer_norm"   # layer_norm | rms_norm
  layer_scale: float = 0.0   # > 0: learned per-channel scales ls1 / ls2 on the two branches, initialised to this
  qk_norm: bool = False      # RMSNorm of q and k over all heads before attention
  qkv_bias: bool = True
  drop_path: float = 0.0     # stochastic depth in training: block i of L drops its branches with p = rate * i / (L-1)

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def kw(self) -> dict:
    return dict(dtype=as_dtype(self.dtype), param_dtype=as_dtype(self.param_dtype))


class ViTBlock(nn.Module):
  """Pre-LN transformer block; signature fits `apply_layers` (mask and rope broadcast; per layer: its drop-path
  rate when training with one)."""
  spec: ViTSpec
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask=None, rope=None, drop_rate=None):
    c = self.spec
    norm = {"layer_norm": LayerNorm, "rms_norm": RMSNorm}[c.norm]
    h = norm(c.eps, "vit_embed", name="ln_1", **c.kw)(x)
    h = MultiHeadAttention(c.heads, c.head_dim, c.width, "vit_embed", "vit_heads", "vit_embed", qk_norm=c.qk_norm,
                           qkv_bias=c.qkv_bias, name="attn", **c.kw)(h, h, h, mask=mask, rope=rope)
    x = x + self._dropped(self._scaled("ls1", h), drop_rate)
    h = norm(c.eps, "vit_embed", name="ln_2", **c.kw)(x)
    x = x + self._dropped(self._scaled("ls2", MLP(c.mlp_dim, c.width, c.activation, name="mlp", **c.kw)(h)),
                          drop_rate)
    x = nn.with_logical_constraint(x, ("batch", "length", "vit_embed"))
    return x, None

  def _dropped(self, h: jax.Array, rate) -> jax.Array:
    """Stochastic depth: each sample's branch is dropped with probability `rate`, kept ones scaled by 1 / (1 - rate)
    (timm's DropPath, as InternViT); the identity when deterministic."""
    if self.deterministic or rate is None:
      return h
    keep = 1.0 - rate
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, (h.shape[0],) + (1,) * (h.ndim - 1))
    return jnp.where(kept, h / keep, 0).astype(h.dtype)

  def _scaled(self, name: str, h: jax.Array) -> jax.Array:
    if not self.spec.layer_scale:
      return h
    init = nn.initializers.constant(self.spec.layer_scale)
    scale = self.param(name, nn.with_logical_partitioning(init, ("vit_embed",)),
                       (self.spec.width,), self.spec.kw["param_dtype"])
    return h * scale.astype(h.dtype)


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
  """[N, C, H, W] -> [N, gh, gw, p, p, C] (patch rows, patch cols, pixel row, pixel col, channel)."""
  n, c, h, w = pixels.shape
  x = pixels.reshape(n, c, h // patch, patch, w // patch, patch)
  return x.transpose(0, 2, 4, 3, 5, 1)


def vit_trunk(spec: ViTSpec, x: jax.Array, mask: jax.Array | None = None, rope: jax.Array | None = None,
              deterministic: bool = True):
  """Run the blocks; call from inside a parent's `nn.compact` method (parameters under `layers`).

  x: [N, P, width]; mask: [N, 1, P, P] bool or None; rope: [N, P, head_dim / 2] angles or None -> [N, P, width].
  deterministic=False with `spec.drop_path` > 0: stochastic depth (needs the 'dropout' rng).
  """
  training = not deterministic and spec.drop_path > 0
  rates = jnp.linspace(0.0, spec.drop_path, spec.layers) if training else None
  x, _ = apply_layers(ViTBlock, dict(spec=spec, deterministic=not training), x, (mask, rope), rates,
                      length=spec.layers, scan=spec.scan, remat=spec.remat)
  return x

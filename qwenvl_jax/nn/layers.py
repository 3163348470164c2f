"""Parameterised building blocks with logical axis names on every parameter.

Logical names used across the project (mapped to mesh axes by `qwenvl_jax.sharding.LOGICAL_RULES`):
  vocab, embed, heads, kv_heads, kv, mlp   decoder / adapter widths (kv_heads: grouped-query K/V heads)
  vit_embed, vit_heads, vit_mlp            ViT widths (kept apart: the ViT is narrower and sharded differently)
  queries, pos, patch_*, channels          tables and the patch-embedding kernel (never sharded)
  layers                                   the stacked leading axis added by `nn.scan`
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
default_kernel_init = nn.initializers.normal(stddev=0.02)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def as_dtype(name_or_dtype):
  """'bfloat16' | jnp.bfloat16 -> jnp dtype, with a clear error for anything else."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name_or_dtype]
  return jnp.dtype(name_or_dtype).type


def cast(w, dtype):
  """A weight in the compute dtype; one already in it is passed through untouched (a quantized weight stands in for
  the array there, and casting it would undo the quantization)."""
  return w if w.dtype == jnp.dtype(dtype) else w.astype(dtype)


class Dense(nn.Module):
  """y = x . kernel (+ bias), contracting the last `contract` dims of x.

  kernel: [*x.shape[-contract:], *features] with logical names `axes`; bias: [*features] with the output names.
  (Flax's DenseGeneral initialises multi-dim kernels through a flattened shape, which breaks logical
  sharding constraints under a mesh; this one initialises the real shape.)
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  contract: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(x.shape[-self.contract:]) + tuple(self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes), shape,
                        self.param_dtype)
    # lax.dot_general (what tensordot lowers to), so weight-quantization libraries that intercept it see the kernel
    n = self.contract
    dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
    y = jax.lax.dot_general(x.astype(self.dtype), cast(kernel, self.dtype), dims)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             self.axes[-len(self.features):]),
                        tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def dense(features: int | Sequence[int], axes: Sequence[str], *, name: str, use_bias: bool,
          dtype, param_dtype, contract: int = 1, kernel_init: Initializer = default_kernel_init) -> Dense:
  """A `Dense` layer; `axes` names every kernel dimension (contracted ones first)."""
  features = (features,) if isinstance(features, int) else tuple(features)
  return Dense(features, tuple(axes), contract, use_bias, dtype, param_dtype, kernel_init, name=name)


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics (two-pass variance, as torch) and a learned scale and bias."""
  epsilon: float = 1e-6
  axis_name: str = "embed"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
                      (d,), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """Qwen RMSNorm: normalise in float32, cast back, then multiply by the weight."""
  epsilon: float = 1e-6
  axis_name: str = "embed"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                       (d,), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x) (CLIP's approximation, used by the Qwen2-VL ViT)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": nn.silu,
}


class MLP(nn.Module):
  """fc2(act(fc1(x))) with biases: ViT blocks and projectors. Kernels named (in_axis, hidden_axis) and back."""
  hidden: int
  out: int
  activation: str = "gelu"
  in_axis: str = "vit_embed"
  hidden_axis: str = "vit_mlp"
  out_axis: str | None = None   # default: in_axis
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., Din] -> [..., out]."""
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.hidden, (self.in_axis, self.hidden_axis), name="fc1", **kw)(x)
    x = ACTIVATIONS[self.activation](x)
    return dense(self.out, (self.hidden_axis, self.out_axis or self.in_axis), name="fc2", **kw)(x)


class SwiGLU(nn.Module):
  """down(up(x) * silu(gate(x))): the Qwen / Qwen2 / LLaMA decoder MLP."""
  hidden: int
  out: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., out]."""
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(self.hidden, ("embed", "mlp"), name="gate", **kw)(x)
    up = dense(self.hidden, ("embed", "mlp"), name="up", **kw)(x)
    return dense(self.out, ("mlp", "embed"), name="down", **kw)(up * nn.silu(gate))


def remat_policy(name: str):
  """Config name -> `jax.checkpoint` policy (None = save nothing, i.e. full recompute)."""
  policies = {
      "full": None,
      "dots_saveable": jax.checkpoint_policies.dots_saveable,
      "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  return policies[name]


def apply_layers(block_cls: type[nn.Module], block_kwargs: dict, carry, broadcast: tuple = (),
                 scanned=None, *, length: int, scan: bool, remat: str = "none"):
  """Run `length` residual blocks in sequence; call from inside a parent's `nn.compact` method.

  The block's signature is `block(carry, *broadcast, scanned_slice) -> (carry, per_layer_out)`.
  `scanned` is a pytree whose leaves have a leading layer axis (e.g. the KV cache) or None;
  `per_layer_out` comes back stacked the same way. With `scan=True` the blocks share one compiled
  body under `nn.scan` and their parameters are stacked on a leading 'layers' axis (module name
  `layers`); otherwise the blocks are `layers_0 .. layers_{n-1}`.
  """
  if remat != "none":
    block_cls = nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=not scan)
  if scan:
    stacked = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(broadcast) + (0,), length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return stacked(**block_kwargs, name="layers")(carry, *broadcast, scanned)
  # Unrolled, `scanned` may also be a list with one entry per layer (then so is the output): separate per-layer
  # buffers (e.g. the decoding KV cache) are updated in place instead of being sliced out of and restacked into
  # one array at every call.
  per_layer = isinstance(scanned, list)
  outs = []
  for i in range(length):
    if per_layer:
      layer_in = scanned[i]
    else:
      layer_in = None if scanned is None else jax.tree.map(lambda a: a[i], scanned)
    carry, out = block_cls(**block_kwargs, name=f"layers_{i}")(carry, *broadcast, layer_in)
    outs.append(out)
  if per_layer or outs[0] is None:
    return carry, (outs if per_layer else None)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def unstack_layers(params: dict) -> dict:
  """Scanned parameters (a `layers` subtree with a leading layer axis) -> unrolled `layers_0 .. layers_{L-1}`."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == "layers" and isinstance(value, dict):
      n = jax.tree.leaves(value)[0].shape[0]
      for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = unstack_layers(value)
  return out


def stack_layers(params: dict) -> dict:
  """The inverse of `unstack_layers`: `layers_0 .. layers_{L-1}` -> one `layers` subtree with a leading axis."""
  if not isinstance(params, dict):
    return params
  out, layers = {}, {}
  for key, value in params.items():
    if key.startswith("layers_") and key[7:].isdigit():
      layers[int(key[7:])] = value
    else:
      out[key] = stack_layers(value)
  if layers:
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[layers[i] for i in range(len(layers))])
  return out

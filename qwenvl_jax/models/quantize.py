"""Weight-only int8 for inference through Qwix (Google's JAX quantization library), for every family.

Every linear kernel becomes int8 values with one scale per output channel (absmax over the contracted axes, Qwix's
PTQ); the token embedding (a lookup, and the LM head when tied), the patch embedding's position tables, norms and
biases stay in the parameter dtype. The module is Qwix's PTQ wrapper of the family's module: its matmuls take the
quantized weights and dequantize them on the fly, so nothing else changes (the KV cache, attention and norms run as
before).

Quantized models use unrolled layers (`scan_layers=False`): Qwix's scales of a kernel stacked on a scanned layer
axis do not follow the scan's slicing.

    q = Quantizer(cfg, "int8", mesh=None)        # cfg with scan_layers=False
    leaf = q.place(("decoder", "layers_0", "mlp", "w1", "kernel"), x)   # host float array -> int8 + scale, placed
    params = q.quantize_tree(float_params)       # a whole tree, one leaf at a time
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qwenvl_jax.models import registry
from qwenvl_jax.sharding import logical_to_sharding, put_tree_sharded

MODES = ("int8",)
# module paths whose weights stay in the parameter dtype: the embedding table (a gather, not a matmul)
KEEP = r"^(?!wte(/|$)).*"
# the module methods the API applies (VLModel.vit_tokens / encode_images / logits / generate)
METHODS = ("__call__", "vit", "encode_images", "project")


def check_mode(mode: str | None, cfg=None) -> None:
  """One-line errors for an unknown mode, or scanned layers with quantization."""
  if mode is not None and mode not in MODES:
    raise ValueError(f"quantize={mode!r}: supported modes are {list(MODES)} (or None)")
  if mode is not None and cfg is not None and cfg.scan_layers:
    raise ValueError(f"quantize={mode!r} needs unrolled layers (scan_layers=False)")


def quantized_module(cfg, mode: str = "int8"):
  """The family's Flax module with its linear layers' weights quantized (Qwix PTQ)."""
  import qwix
  check_mode(mode, cfg)
  rules = [qwix.QuantizationRule(module_path=KEEP, op_names=("dot_general",), weight_qtype=mode)]
  return qwix.quantize_model(registry.family_of(cfg).module(cfg), qwix.PtqProvider(rules), methods=METHODS)


def abstract_quantized(cfg, qmodule, boxed: bool = False):
  """Shapes, dtypes (and, boxed, logical axes) of the quantized parameter tree; nothing is allocated."""
  args, kw = registry.family_of(cfg).example_call(cfg)
  tree = jax.eval_shape(lambda: qmodule.init(jax.random.key(0), *args, **kw))["params"]
  return tree if boxed else nn.meta.unbox(tree)


def host_device():
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # a platform without a CPU client: quantize where the arrays are
    return jax.local_devices()[0]


class Quantizer:
  """Quantizes float parameters leaf by leaf (on the host CPU) and places each straight into its shards on `mesh`
  (or on this process's first device), so no device ever holds a float copy of the model."""

  def __init__(self, cfg, mode: str = "int8", mesh=None, module=None, boxed=None):
    """module: a Qwix-wrapped module whose quantized kernels to produce (default: `quantized_module(cfg, mode)`;
    Q-LoRA passes its adapted one, `models/lora.py`); boxed: that module's boxed abstract tree, when the caller
    has it (tracing a large model's init takes seconds)."""
    self.cfg, self.mode, self.mesh = cfg, mode, mesh
    self.module = quantized_module(cfg, mode) if module is None else module
    boxed = abstract_quantized(cfg, self.module, boxed=True) if boxed is None else boxed
    self.abstract = nn.meta.unbox(boxed)
    self.shardings = logical_to_sharding(boxed, mesh) if mesh is not None else None

  def place(self, tree_path: tuple, x) -> object:
    """One float parameter (host or device array) -> its leaf of the quantized tree (int8 + scale for a linear
    kernel, else the array), on the target devices."""
    want = _get(self.abstract, tree_path)
    x = np.asarray(x)
    if hasattr(want, "how"):  # a quantized kernel: int8 values + scales, computed on the host CPU
      x = _quantize_fn(want)(jax.device_put(x, host_device()))
    if self.shardings is None:
      return jax.device_put(x, jax.local_devices()[0])
    return put_tree_sharded(x, _get(self.shardings, tree_path))

  def quantize_tree(self, params: dict) -> dict:
    """A whole float tree (unrolled layers) -> the quantized tree; each float leaf is dropped once placed."""
    flat = flatten_dict(params)
    out = {}
    for path in list(flat):
      out[path] = self.place(path, flat.pop(path))
    return unflatten_dict(out)


_COMPILED: dict = {}


def _quantize_fn(abstract_leaf):
  """A compiled float -> quantized function for one kind of kernel (shape, dtype, how), shared by the kernels
  alike (one compilation instead of one per eager op per shape)."""
  import qwix
  key = (tuple(abstract_leaf.shape), str(abstract_leaf.dtype), repr(abstract_leaf.how))
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(lambda x: qwix.quantize_params({"w": x}, {"w": abstract_leaf})["w"])
  return _COMPILED[key]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def param_bytes(tree) -> int:
  """Bytes of a parameter tree (quantized or not): int8 values and their scales included."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

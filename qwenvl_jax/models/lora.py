"""LoRA adapters on linear layers, for every family, through Qwix (Google's JAX quantization library: its LoRA
provider intercepts the matmuls of the family's own module, so no layer is rewritten).

A targeted linear layer y = x W becomes y = x W + dropout(x) A B * alpha / rank, with A [in, rank] (He-uniform)
and B [rank, out] (zeros: at initialisation the adapted model is the base model exactly); multi-axis kernels
(q/k/v [D, H, Dh], o [H, Dh, D]) take A over the flattened contracted axes and B over the flattened output axes.
The adapters are parameters `kernel_lora_a` / `kernel_lora_b` beside the kernel they adapt. Targets are a regex
(full match) over module paths (`decoder/layers_3/attn/q`); each family's default follows its official fine-tuning
recipe (`lora_targets` in the family record). Layers must be unrolled (`scan_layers=False`), as for int8.

Q-LoRA (`LoraSpec(quantize="int8" | "int4" | "nf4")`): the linear kernels of the LLM's blocks are stored quantized
and dequantized on the fly (int8: one scale per output channel; int4 / nf4: one per block of QUANT_BLOCK contracted
weights, as QLoRA's NF4 blocks of 64), as in the official Int4 checkpoints whose GPTQ weights are the LLM's blocks
alone; the ViT, the adapter, the embedding and the LM head stay in float, and so do the adapters.

    spec = LoraSpec(rank=64, alpha=16, dropout=0.05)
    module = lora_module(cfg, spec, train=True)           # cfg.scan_layers False; dropout only when training
    adapters = init_adapters(cfg, spec, rng)              # fresh A, B (checked against the model's layers)
    params = with_adapters(base_params, adapters)         # the tree `module` applies
    merged = merge(params, spec)                          # kernels += A @ B * alpha / rank, adapters dropped
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qwenvl_jax.models import quantize, registry

SUFFIXES = ("kernel_lora_a", "kernel_lora_b")
METHODS = (*quantize.METHODS, "pooled_vit")  # the API's methods, and the contrastive stage's image features
QUANT_MODES = ("int8", "int4", "nf4")
QUANT_BLOCK = 64  # int4 / nf4: contracted weights per scale
QUANTIZED = r"decoder/layers_\d+/.*"  # Q-LoRA: the module paths whose kernels are quantized


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int = 64
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str | None = None   # regex over module paths; None: the family's default (`Family.lora_targets`)
  quantize: str | None = None  # Q-LoRA: the base's linear kernels as int8 | int4 | nf4 (None: float)

  def validate(self):
    if self.rank < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
      raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank={self.rank}, "
                       f"alpha={self.alpha}, dropout={self.dropout}")
    if self.quantize not in (None,) + QUANT_MODES:
      raise ValueError(f"Q-LoRA quantize={self.quantize!r}: one of {list(QUANT_MODES)} (or None for LoRA)")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def spec_from_config(section) -> LoraSpec | None:
  """A training config's `lora` section -> LoraSpec; None when its rank is 0 (or it has none: full fine-tuning)."""
  if section is None or not section.get("rank"):
    return None
  return LoraSpec(rank=int(section.rank), alpha=float(section.alpha), dropout=float(section.dropout),
                  targets=section.targets or None, quantize=section.quantize or None)


def targets_of(cfg, spec: LoraSpec) -> str:
  targets = spec.targets or registry.family_of(cfg).lora_targets
  if not targets:
    raise ValueError(f"no LoRA targets: the {registry.family_of(cfg).name} family names none; pass targets")
  try:
    re.compile(targets)
  except re.error as e:
    raise ValueError(f"LoRA targets {targets!r} is not a regular expression ({e})") from None
  return targets


def lora_module(cfg, spec: LoraSpec, train: bool = False):
  """The family's Flax module with adapters on the targeted linear layers (Qwix's LoRA provider) and, for Q-LoRA,
  quantized base kernels. train=True applies the adapters' dropout (needs a 'dropout' rng)."""
  import qwix
  spec.validate()
  if cfg.scan_layers:
    raise ValueError("LoRA needs unrolled layers (scan_layers=False): the adapters are per layer")
  q = dict(weight_qtype=spec.quantize, tile_size=QUANT_BLOCK if spec.quantize in ("int4", "nf4") else None)
  targets = targets_of(cfg, spec)
  lora = dict(rank=spec.rank, alpha=float(spec.alpha), dropout=float(spec.dropout) if train else 0.0)
  if not spec.quantize:
    rules = [qwix.LoraRule(module_path=targets, **lora)]
  else:  # first matching rule wins: adapted and quantized, adapted only (outside the LLM), quantized only
    rules = [qwix.LoraRule(module_path=f"(?=(?:{QUANTIZED})$)(?:{targets})", **lora, **q),
             qwix.LoraRule(module_path=targets, **lora),
             qwix.QuantizationRule(module_path=QUANTIZED, op_names=("dot_general",), **q)]
  return qwix.apply_lora_to_model(registry.family_of(cfg).module(cfg), qwix.LoraProvider(rules), methods=METHODS)


def _path(keys) -> str:
  return "/".join(keys)


def abstract_tree(cfg, spec: LoraSpec, boxed: bool = False) -> dict:
  """Shapes and dtypes (boxed: and logical axes) of the adapted module's parameters: the base's (quantized kernels
  as Qwix's `WithAux` leaves for Q-LoRA) with the adapters beside the targeted kernels. Nothing is allocated."""
  module = lora_module(cfg, spec)
  args, kw = registry.family_of(cfg).example_call(cfg)
  tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kw))["params"]
  return tree if boxed else nn.meta.unbox(tree)


def adapter_shapes(cfg, spec: LoraSpec, flat_abstract: dict | None = None) -> dict:
  """{adapter path tuple: ShapeDtypeStruct} of the adapted tree (`flat_abstract`: its flattened `abstract_tree`,
  when the caller has it), checked: the targets must match a linear layer and the rank must not exceed a layer's
  input or output width (one-line ValueErrors)."""
  flat = flatten_dict(abstract_tree(cfg, spec)) if flat_abstract is None else flat_abstract
  shapes = {p: x for p, x in flat.items() if p[-1] in SUFFIXES}
  if not shapes:
    names = sorted({_path(p[:-1]) for p in flat if p[-1] == "kernel"})
    raise ValueError(f"LoRA targets {targets_of(cfg, spec)!r} match no linear layer; layers are e.g. "
                     f"{', '.join(names[:4])}")
  for p, a in shapes.items():
    if p[-1] == "kernel_lora_a":
      b = shapes[p[:-1] + ("kernel_lora_b",)]
      width_in, width_out = int(np.prod(a.shape[:-1])), int(np.prod(b.shape[1:]))
      if spec.rank > min(width_in, width_out):
        raise ValueError(f"LoRA rank {spec.rank} exceeds the width of {_path(p[:-1])} (in {width_in}, "
                         f"out {width_out})")
  return shapes


def trained_paths(flat_abstract: dict, trainable: str = "") -> set:
  """Of a flattened adapted tree: the adapters' paths and those of the base parameters `trainable` (a regex
  searched in 'a/b/c' paths; '' = none) names. ValueError when `trainable` is no regex, matches nothing, or matches
  a quantized kernel (Q-LoRA trains adapters on those, not them)."""
  try:
    pattern = re.compile(trainable) if trainable else None
  except re.error as e:
    raise ValueError(f"lora.trainable {trainable!r} is not a regular expression ({e})") from None
  trained = {p for p in flat_abstract
             if p[-1] in SUFFIXES or (pattern is not None and pattern.search(_path(p)))}
  if pattern is not None and not any(p[-1] not in SUFFIXES for p in trained):
    raise ValueError(f"lora.trainable {trainable!r} matches no parameter; paths are e.g. "
                     f"{', '.join(_path(p) for p in list(flat_abstract)[:3])}")
  quantized = {p for p, x in flat_abstract.items() if hasattr(x, "how")} & trained
  if quantized:
    raise ValueError(f"lora.trainable {trainable!r} matches quantized kernels (e.g. {_path(sorted(quantized)[0])}): "
                     "Q-LoRA trains adapters on them, not them")
  return trained


def init_adapters(cfg, spec: LoraSpec, rng, shapes: dict | None = None) -> dict:
  """Fresh adapters (a nested dict of `kernel_lora_a` / `kernel_lora_b` leaves): A He-uniform, B zeros, so the
  adapted model starts as the base model exactly. Only the adapters are allocated (not a second base). `shapes`:
  `adapter_shapes`' result, when the caller has it."""
  init_a = jax.nn.initializers.he_uniform()
  out = {}
  for i, (p, x) in enumerate(sorted((shapes or adapter_shapes(cfg, spec)).items())):
    out[p] = (init_a(jax.random.fold_in(rng, i), x.shape, x.dtype) if p[-1] == "kernel_lora_a"
              else jnp.zeros(x.shape, x.dtype))
  return unflatten_dict(out)


def with_adapters(base: dict, adapters: dict) -> dict:
  """The base parameters with the adapters beside their kernels (the tree `lora_module` applies)."""
  return unflatten_dict({**flatten_dict(base), **flatten_dict(adapters)})


def split(params: dict) -> tuple[dict, dict]:
  """-> (base parameters, adapters)."""
  flat = flatten_dict(params)
  return (unflatten_dict({p: x for p, x in flat.items() if p[-1] not in SUFFIXES}),
          unflatten_dict({p: x for p, x in flat.items() if p[-1] in SUFFIXES}))


def dequantized(tree: dict) -> dict:
  """Q-LoRA's quantized kernels (Qwix `WithAux` leaves) back to float arrays of their original dtype: the base the
  adapters were trained against, into which a merge folds them."""
  import qwix
  return jax.tree.map(lambda x: qwix.dequantize(x.array) if hasattr(x, "how") else x, tree,
                      is_leaf=lambda x: hasattr(x, "how"))


def merge(params: dict, spec: LoraSpec) -> dict:
  """Adapted parameters -> plain ones: each adapted kernel += (A @ B) * alpha / rank (in float32, cast back to the
  kernel's dtype); the adapters are dropped. The result runs in the family's own module."""
  flat = flatten_dict(params)
  out = {p: x for p, x in flat.items() if p[-1] not in SUFFIXES}
  scale = spec.scale
  for p, a in flat.items():
    if p[-1] != "kernel_lora_a":
      continue
    kernel = p[:-1] + ("kernel",)
    b = flat[p[:-1] + ("kernel_lora_b",)]
    w = out[kernel]
    delta = (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)).reshape(w.shape) * scale
    out[kernel] = (jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)
  return unflatten_dict(out)

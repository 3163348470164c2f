"""LoRA and Q-LoRA runs of train.py: what trains, where the frozen base lives, what a checkpoint holds.

With `lora.rank > 0` the TrainState holds only what trains -- the adapters (`models/lora.py`) and the base
parameters whose path matches `lora.trainable` (e.g. the official LoRA recipe's `wte|lm_head`) -- with their
optimizer state. The rest of the base is a separate frozen tree (quantized for Q-LoRA) given to every step as an
argument: no gradient, no optimizer state, never checkpointed. A resumed run rebuilds it from `init`, so a
checkpoint is the adapters + optimizer state alone (`bench/lora.py` prints its size against a full one).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qwenvl_jax.models import lora
from qwenvl_jax.models import quantize as quantization
from qwenvl_jax.sharding import logical_to_sharding, put_tree_sharded


def spec_of(c) -> lora.LoraSpec | None:
  """The run's adapters (`lora` section of the training config); None when lora.rank is 0 (full fine-tuning)."""
  return lora.spec_from_config(c.get("lora"))


def plan_of(c, cfg, mesh) -> LoraPlan | None:
  """The run's LoraPlan on `mesh`; None for full fine-tuning."""
  spec = spec_of(c)
  return LoraPlan(cfg, spec, mesh, c.lora.trainable) if spec else None


class LoraPlan:
  """The split of the adapted model's parameters into trained and frozen, with shapes and shardings on `mesh`
  (a Mesh, or an AbstractMesh for --dry_run). Trees are nested dicts as the module takes them."""

  def __init__(self, cfg, spec: lora.LoraSpec, mesh, trainable: str = ""):
    self.cfg, self.spec, self.mesh = cfg, spec, mesh
    self.boxed = lora.abstract_tree(cfg, spec, boxed=True)  # traced once: the checks, shardings and Q-LoRA use it
    abstract = flatten_dict(nn.meta.unbox(self.boxed))
    # one-line errors: targets matching nothing, rank beyond a layer's width
    self.adapter_shapes = lora.adapter_shapes(cfg, spec, abstract)
    self.trained = lora.trained_paths(abstract, trainable)
    self.abstract, self.shardings = abstract, flatten_dict(logical_to_sharding(self.boxed, mesh))
    self.module = lora.lora_module(cfg, spec)              # inference: no dropout
    self.train_module = lora.lora_module(cfg, spec, train=True)

  def part(self, flat: dict, trained: bool) -> dict:
    return unflatten_dict({p: x for p, x in flat.items() if (p in self.trained) == trained})

  def trained_abstract(self):
    return self.part(self.abstract, True), self.part(self.shardings, True)

  def frozen_abstract(self):
    return self.part(self.abstract, False), self.part(self.shardings, False)

  def frozen(self, base: dict) -> dict:
    """The frozen part of float base parameters (host or device arrays, unrolled layers), placed in its shards
    and, for Q-LoRA, quantized leaf by leaf on the host as it is placed (no float copy on the devices)."""
    flat = {p: x for p, x in flatten_dict(base).items() if p not in self.trained}
    if self.spec.quantize:
      q = quantization.Quantizer(self.cfg, self.spec.quantize, self.mesh, module=self.module, boxed=self.boxed)
      return unflatten_dict({p: q.place(p, flat.pop(p)) for p in list(flat)})
    return put_tree_sharded(unflatten_dict(flat), self.part(self.shardings, False))

  def initial_trained(self, base: dict, rng) -> dict:
    """Fresh adapters plus the trained base parameters' initial values, placed."""
    flat = {p: x for p, x in flatten_dict(base).items() if p in self.trained}
    flat.update(flatten_dict(lora.init_adapters(self.cfg, self.spec, rng, self.adapter_shapes)))
    return put_tree_sharded(unflatten_dict(flat), self.part(self.shardings, True))


def nbytes(tree, shardings=None) -> float:
  """Bytes of a tree of arrays / ShapeDtypeStructs (per device with `shardings`); int4 / nf4 values count half a
  byte, as accelerators pack them."""
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
  total = 0.0
  for x, s in zip(leaves, shards):
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    bits = 4 if str(x.dtype) in ("int4", "uint4", "float4_e2m1fn") else np.dtype(x.dtype).itemsize * 8
    total += int(np.prod(shape)) * bits / 8
  return total

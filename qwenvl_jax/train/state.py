"""Creating the train state directly sharded on a mesh, and the per-device memory plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.models import registry
from qwenvl_jax.sharding import logical_to_sharding
from qwenvl_jax.train.optimizer import path_str
from qwenvl_jax.train.step import TrainState


def _suffix_match_shardings(abstract_tree, param_shardings: dict[str, object], default):
  """Sharding of each optimizer-state leaf: that of the parameter whose path ends its path (same shape)."""
  def pick(path, leaf):
    p = path_str(path)
    for name, (shape, sh) in param_shardings.items():
      if p.endswith(name) and tuple(leaf.shape) == shape:
        return sh
    return default
  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def init_params(cfg, rng, head=None, boxed: bool = False):
  """The trained parameters: the family's, plus `contrastive/` for a contrastive stage's `head`."""
  fam = registry.family_of(cfg)
  params = fam.init_params(cfg, rng, boxed=boxed)
  if head is None:
    return params
  from qwenvl_jax.train.contrastive import init_head
  return {**params, "contrastive": init_head(head, cfg.vit.width, cfg.decoder.hidden, jax.random.fold_in(rng, 1),
                                             boxed=boxed)}


def abstract_params(cfg, head=None, boxed: bool = False):
  if head is None:
    return registry.family_of(cfg).abstract_params(cfg, boxed=boxed)
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), head, boxed=boxed))


def state_shardings(cfg, tx, mesh, head=None, plan=None) -> tuple[TrainState, TrainState]:
  """-> (abstract TrainState, matching tree of NamedShardings). Nothing is allocated. `head`: the contrastive
  stage's projections, trained with the model (`train/contrastive.py`); `plan`: a LoRA run's `LoraPlan`, whose
  state holds the trained part alone (`train/lora.py`)."""
  if plan is not None:
    params_abs, params_sh = plan.trained_abstract()
  else:
    params_abs = abstract_params(cfg, head)
    params_sh = logical_to_sharding(abstract_params(cfg, head, boxed=True), mesh)
  flat = {path_str(p): (tuple(x.shape), s) for (p, x), s in
          zip(jax.tree_util.tree_leaves_with_path(params_abs), jax.tree.leaves(params_sh))}
  flat = dict(sorted(flat.items(), key=lambda kv: -len(kv[0])))  # longest path first
  opt_abs = jax.eval_shape(tx.init, params_abs)
  rep = NamedSharding(mesh, PartitionSpec())
  opt_sh = _suffix_match_shardings(opt_abs, flat, rep)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abs, opt_state=opt_abs,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return abstract, TrainState(step=rep, params=params_sh, opt_state=opt_sh, rng=rep)


def create_state(cfg, tx, mesh, seed: int, params=None, head=None, plan=None) -> TrainState:
  """A fresh state created directly with its shardings (jit out_shardings: no full host copy). `params` (host or
  device arrays) replaces the random initialisation, e.g. weights imported from Hugging Face; with a contrastive
  `head`, the family's params (the head starts fresh); with a LoRA `plan`, the trained part (required)."""
  _, sh = state_shardings(cfg, tx, mesh, head, plan)
  rng = jax.random.PRNGKey(seed)
  if params is None:
    def init(key):
      p = init_params(cfg, key, head)
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=key)
    return jax.jit(init, out_shardings=sh)(rng)
  if head is not None:
    fresh = jax.jit(lambda key: init_params(cfg, key, head)["contrastive"], out_shardings=sh.params["contrastive"])
    params = {**params, "contrastive": fresh(rng)}
  params = jax.device_put(params, sh.params)
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sh.step), params=params, opt_state=opt_state,
                    rng=jax.device_put(rng, sh.rng))


def bytes_per_device(abstract: TrainState, shardings: TrainState) -> dict[str, int]:
  """Bytes each device holds for params and optimizer state under `shardings` (works with an AbstractMesh)."""
  def total(tree, sh_tree):
    n = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh_tree)):
      n += int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    return n
  return {"params": total(abstract.params, shardings.params),
          "opt_state": total(abstract.opt_state, shardings.opt_state),
          "params_total": sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract.params))}

"""Training checkpoints: Orbax CheckpointManager over the train state (params, optimizer state, step, RNG) and the
Grain iterator state, saved together per step; async saves, keep-N, resume from the latest. Reading only the params
of a workdir (to start the next stage, or `qv.load`) is `qwenvl_jax.convert.checkpoint.load_training_params`."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from qwenvl_jax.train.optimizer import path_str
from qwenvl_jax.train.step import TrainState


class CheckpointIncompatible(ValueError):
  """A checkpoint that does not fit the current model / optimizer configuration."""


class TrainCheckpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict | None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointIncompatible(f"checkpoint {self.directory}/{step} does not match the configured model or "
                                   f"optimizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if jax.tree.structure(out.state) != jax.tree.structure(abstract):
      # Orbax fills arrays the checkpoint lacks (e.g. optimizer moments of parameters it had frozen) with None.
      missing = [path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(out.state, is_leaf=lambda x: x is None)
                 if x is None]
      raise CheckpointIncompatible(f"checkpoint {self.directory}/{step} does not match the configured model or "
                                   f"optimizer ({len(missing)} arrays missing"
                                   f"{', e.g. ' + missing[0] if missing else ''})")
    return out.state, dict(out.data or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

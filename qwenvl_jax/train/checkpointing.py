"""Training checkpoints: Orbax CheckpointManager over the train state (params, optimizer state, step, RNG) and the
Grain iterator state, saved together per step; async saves, keep-N, resume from the latest. Reading only the params
of a workdir (to start the next stage, or `qv.load`) is `qwenvl_jax.convert.checkpoint.load_training_params`."""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from qwenvl_jax.train.optimizer import path_str
from qwenvl_jax.train.step import TrainState

log = logging.getLogger("qwenvl_jax.train")
DAMAGED_SUFFIX = ".damaged"  # a damaged step folder is renamed <step>.damaged (kept for a look, never read again)


class CheckpointIncompatible(ValueError):
  """A checkpoint that does not fit the current model / optimizer configuration."""


class NoIntactCheckpoint(ValueError):
  """Checkpoints exist but none of them can be read."""


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

  def restore_latest(self, abstract: TrainState, shardings: TrainState) -> tuple[int, TrainState, dict] | None:
    """The newest checkpoint that reads back -> (step, state, data state); None when there is none. Newer steps that
    do not read back (a truncated or zeroed file, a deleted item, an empty step folder) are set aside as
    `<step>.damaged` with a warning naming them; if none reads back, one error naming the newest's problem (a
    checkpoint of another model reads back nowhere: CheckpointIncompatible, unchanged)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state, data = self.restore(step, abstract, shardings)
      except Exception as e:  # noqa: BLE001 - Orbax / tensorstore / json raise many types for damaged files
        failures.append((step, e))
        continue
      if failures:
        self._set_aside([s for s, _ in failures], state_of=step)
      return step, state, data
    if not failures:
      return None
    step, e = failures[0]
    if all(isinstance(f, CheckpointIncompatible) for _, f in failures):
      raise e
    raise NoIntactCheckpoint(f"no checkpoint in {self.directory} reads back ({len(steps)} tried; step {step}: "
                             f"{type(e).__name__}: {' '.join(str(e).split())[:200]})") from None

  def _set_aside(self, damaged: list[int], state_of: int) -> None:
    for step in damaged:
      log.warning("checkpoint %s/%d is damaged (it does not read back): set aside as %d%s; resuming from step %d",
                  self.directory, step, step, DAMAGED_SUFFIX, state_of)
    if jax.process_index() == 0:
      for step in damaged:
        os.replace(os.path.join(self.directory, str(step)),
                   os.path.join(self.directory, f"{step}{DAMAGED_SUFFIX}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoints set aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

"""Training checkpoints: Orbax CheckpointManager over the train state (params, optimizer state, step, RNG) and the
Grain iterator state, saved together per step; async saves, keep-N, resume from the latest. Reading only the params
of a workdir (to start the next stage, or `qv.load`) is `qwenvl_jax.convert.checkpoint.load_training_params`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

import jax
import orbax.checkpoint as ocp

from qwenvl_jax.train.optimizer import path_str
from qwenvl_jax.train.step import TrainState

log = logging.getLogger("qwenvl_jax.train")
DAMAGED_SUFFIX = ".damaged"  # a damaged step folder is renamed <step>.damaged (kept for a look, never read again)


# What a failed save (a full disk) or read (a damaged checkpoint) leaves behind besides its error, which is raised in
# the main thread and reported as one line: Orbax runs the array writes / reads as asyncio tasks on an event loop of
# its own and stops at the first failure. The others then fail or finish on their own: TensorStore reports each
# completion on the closed loop as an unraisable `RuntimeError: Event loop is closed`, coroutines left unfinished
# raise while being collected ("Exception ignored in: <coroutine ...>"), asyncio logs each failed task nobody awaited
# ("Task exception was never retrieved"), and Orbax logs the failure from each of its threads with a traceback.
_ORBAX = f"{os.sep}orbax{os.sep}"


def _in_orbax(tb) -> bool:
  while tb is not None:
    if _ORBAX in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _orbax_leftover(unraisable) -> bool:
  if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
    return unraisable.object is None
  code = getattr(unraisable.object, "cr_code", None)  # a coroutine being collected
  return (unraisable.object is None or code is not None and _ORBAX in code.co_filename) and \
      _in_orbax(unraisable.exc_traceback)


class _OrbaxNoise(logging.Filter):
  """On the asyncio logger: drops the never-awaited failures of Orbax's tasks (and of their gathering) and of
  TensorStore's futures (whose messages name the OCDBT store and carry no Orbax frame); on absl's: keeps Orbax's
  lines, not their tracebacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio":
      unretrieved = "exception was never retrieved" in str(record.msg).split("\n", 1)[0]
      message = record.getMessage()
      return not (unretrieved and (_ORBAX in message or "OCDBT" in message or "TensorStore" in message or
                                   _in_orbax(record.exc_info[2] if record.exc_info else None)))
    if record.exc_info and _ORBAX in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


_NOISE = _OrbaxNoise()


def _quiet_orbax_failures() -> None:
  """Installed by every TrainCheckpointer, once (a test runner may swap the unraisable hook in between): Orbax's
  leftovers of a failed save or read are dropped, every other unraisable exception is reported as before."""
  for name in ("asyncio", "absl"):
    if _NOISE not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_NOISE)
  if getattr(sys.unraisablehook, "_qwenvl_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _orbax_leftover(unraisable):
      previous(unraisable)
  hook._qwenvl_quiet = True
  sys.unraisablehook = hook


def _short_cause(e: BaseException) -> str:
  """A failed write's message on one line, at most ~400 characters. TensorStore's messages carry the OS error only
  as `os_error_code=N` after a long spec whose length depends on the path, so the OS error is named first."""
  why = " ".join(str(e).split())
  why = why if len(why) <= 400 else f"{why[:150]} ... {why[-200:]}"  # TensorStore's cause comes last
  found = re.search(r"os_error_code\W*(\d+)", str(e))
  code = getattr(e, "errno", None) or (found and found.group(1))
  name = os.strerror(int(code)) if code else ""
  return f"{name}: {why}" if name and name not in why else why


class CheckpointIncompatible(ValueError):
  """A checkpoint that does not fit the current model / optimizer configuration."""


class NoIntactCheckpoint(ValueError):
  """Checkpoints exist but none of them can be read."""


class CheckpointSaveFailed(OSError):
  """A checkpoint could not be written (a full disk, a file size limit, an I/O error); earlier ones are intact."""


class TrainCheckpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    _quiet_orbax_failures()
    self._in_flight: int | None = None  # the step of an async save not yet waited for
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict | None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    self.wait()  # Orbax waits for the save before anyway; here its failure is reported as that step's
    self._in_flight = step
    with self._failures():
      saved = self.manager.save(step, args=args, force=force)
    self._in_flight = step if saved else None
    return saved

  @contextlib.contextmanager
  def _failures(self):
    try:
      yield
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise ValueError, OSError, ... for a failed write
      step = self._in_flight
      self._in_flight = None
      complete = [s for s in self._complete_steps() if step is None or s < step]
      why = _short_cause(e)
      raise CheckpointSaveFailed(
          f"checkpoint {self.directory}/{step if step is not None else '?'} was not saved ({why}); the newest "
          f"complete checkpoint is {f'step {complete[-1]}' if complete else 'none'}") from None

  def _complete_steps(self) -> list[int]:
    """Steps whose folders Orbax has finished (an unfinished save is a `<step>.orbax-checkpoint-tmp*` folder)."""
    names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
    return sorted(int(n) for n in names if n.isdigit())

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
    with self._failures():
      self.manager.wait_until_finished()
    self._in_flight = None

  def close(self) -> None:
    """Wait for a save in flight (its failure raises CheckpointSaveFailed) and release Orbax's threads, in that
    order even when the wait fails, so that nothing of a failed save runs on at exit."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 - the failed save again; the wait above reported it
        pass

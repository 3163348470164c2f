"""train.py with a fault injected in-process, for tests/test_faults.py:

    python tests/fault_worker.py MODE --config=CONFIG --workdir=DIR [--config.key=value ...]

MODE:
  startup            SIGTERM arrives while the train state is being created (start-up: nothing trained yet)
  data=K             the data stalls after K batches and SIGTERM arrives while the loop waits for batch K + 1
  kill-in-save=K     SIGKILL as soon as the async save of step K is under way (its arrays still being written)
  kill-in-commit=K   SIGKILL when step K is written and Orbax is about to rename its folder into place
  kill-in-delete     SIGKILL while Orbax deletes an old step (keep-N): one of its files already gone
  kill-in-restore    SIGKILL while Orbax reads the checkpoint being resumed
The SIGKILL modes print what is on disk first (`checkpoints: [...]`), so the test can see the moment.
"""

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
mode = sys.argv.pop(1)

import train  # noqa: E402 - its SIGTERM handler goes in first, as when run as a script
from qwenvl_jax.train import loop  # noqa: E402


def _sigterm_self():
  os.kill(os.getpid(), signal.SIGTERM)


def _sigkill_self(what: str, directory):
  print(f"SIGKILL {what}; checkpoints: {sorted(os.listdir(directory))}", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


class _Stalling:
  """An iterator over the first `k` batches of a pipeline, then a wait that only a signal ends."""

  def __init__(self, pipeline, k: int):
    self._it, self._k, self._n = iter(pipeline), k, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self._n == self._k:
      print(f"data stalls after {self._k} batches", flush=True)
      _sigterm_self()
      threading.Event().wait()
    self._n += 1
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


if mode == "startup":
  real_create_state = loop.create_state

  def create_state(*args, **kw):
    _sigterm_self()
    return real_create_state(*args, **kw)
  loop.create_state = create_state
elif mode.startswith("data="):
  k = int(mode.partition("=")[2])
  real_data_pipeline = loop.data_pipeline

  def data_pipeline(*args, **kw):
    pipeline, tasks = real_data_pipeline(*args, **kw)
    return type("Stalled", (), {"__iter__": lambda self: _Stalling(pipeline, k)})(), tasks
  loop.data_pipeline = data_pipeline
elif mode.startswith("kill-in-save="):
  from qwenvl_jax.train import checkpointing
  k = int(mode.partition("=")[2])
  real_save = checkpointing.TrainCheckpointer.save

  def save(self, step, *args, **kw):
    saved = real_save(self, step, *args, **kw)
    if step == k:
      _sigkill_self(f"during the async save of step {k}", self.directory)
    return saved
  checkpointing.TrainCheckpointer.save = save
elif mode.startswith("kill-in-commit="):
  from orbax.checkpoint._src.path import atomicity
  k = int(mode.partition("=")[2])
  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kw):
    if self._final_path.name == str(k):  # the step folder (its items are renamed first)
      _sigkill_self(f"before step {k}'s folder is renamed into place", self._final_path.parent)
    return await real_finalize(self, *args, **kw)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
elif mode == "kill-in-delete":
  from orbax.checkpoint._src.path import deleter

  def delete_step_permanently(self, step, target):
    files = [os.path.join(d, f) for d, _, names in os.walk(str(target)) for f in names]
    os.remove(max(files, key=os.path.getsize))  # deletion under way
    _sigkill_self(f"while deleting step {step}", str(target.parent))
  deleter.StandardCheckpointDeleter._delete_step_permanently = delete_step_permanently
elif mode == "kill-in-restore":
  import orbax.checkpoint as ocp
  real_restore = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kw):
    threading.Timer(0.2, _sigkill_self, (f"while restoring step {step}", str(self.directory))).start()
    real_restore(self, step, *args, **kw)  # a small state reads back within the 0.2 s: wait for the kill
    threading.Event().wait()
  ocp.CheckpointManager.restore = restore
else:
  raise SystemExit(f"unknown mode {mode!r}")

sys.exit(train.main(train.parse_flags_or_exit(sys.argv)))

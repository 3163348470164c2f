"""train.py with a fault injected in-process, for tests/test_faults.py:

    python tests/fault_worker.py MODE --config=CONFIG --workdir=DIR [--config.key=value ...]

MODE:
  startup   SIGTERM arrives while the train state is being created (start-up: nothing trained yet)
  data=K    the data stalls after K batches and SIGTERM arrives while the loop waits for batch K + 1
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
else:
  raise SystemExit(f"unknown mode {mode!r}")

sys.exit(train.main(train.parse_flags_or_exit(sys.argv)))

"""SIGTERM in a training run: what a preempted TPU VM or a scheduler sends, always ending in exit 0.

    guard = SigtermGuard()            # interruptible from here: start-up (tokenizer, restore, compile) can take minutes
    with guard:
      ...                             # start-up: SIGTERM raises Interrupted (nothing new to save)
      guard.hold()                    # a step or a save is running: SIGTERM only sets `requested`
      with guard.waiting():           # waiting for data: SIGTERM raises Interrupted at once
        batch = next(data_iter)

The loop checks `requested` after each step (save, exit). `Interrupted` derives from BaseException so that no
`except Exception` on the way swallows it. Outside the main thread (signals go to it only) the guard does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(BaseException):
  """SIGTERM arrived while the run was starting up or waiting for data."""


class SigtermGuard:
  def __init__(self):
    self.requested = False
    self.interruptible = True
    self._previous = None
    self._installed = False

  def __enter__(self) -> "SigtermGuard":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    if self.interruptible:
      raise Interrupted()

  def hold(self) -> None:
    """From here SIGTERM only sets `requested` (a step or a save is running). A SIGTERM that already came raises
    Interrupted now: its own Interrupted may have been swallowed, raised inside a gc callback (jax registers one)."""
    if self.requested:
      raise Interrupted()
    self.interruptible = False

  @contextlib.contextmanager
  def waiting(self):
    """A phase SIGTERM may cut short (nothing is half-done in it)."""
    if self.requested:
      raise Interrupted()
    self.interruptible = True
    try:
      yield
    finally:
      self.interruptible = False

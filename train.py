"""Train Qwen-VL: python train.py --config=configs/<name>.py --workdir=DIR [--config.key=value ...] [--dry_run]

Each config's docstring says how to run it and what it should reach. A run resumes from the latest checkpoint in
its workdir; SIGTERM finishes the current step, saves and exits 0.
"""

import os
import signal
import sys


def _exit_on_sigterm(signum, frame):
  """Until the training loop installs its own handler (imports and flag parsing): nothing to save yet. os._exit,
  not sys.exit: the handler may run inside a gc callback (jax registers one), where a raised SystemExit is only
  reported as unraisable and the run would go on training after saying it exits."""
  print("SIGTERM during start-up: exiting, nothing new saved", flush=True)
  sys.stderr.flush()
  os._exit(0)


signal.signal(signal.SIGTERM, _exit_on_sigterm)  # before the imports below, which take seconds

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the resolved config")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build shapes only and print per-device bytes of params + optimizer "
                             "state for the configured mesh")


def one_line(e: BaseException) -> str:
  """An exception message on one line (first and last lines of a multi-line message)."""
  while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps the KeyError of an unknown key
    e = e.args[0]
  msg = f"unknown key {e.args[0]}" if isinstance(e, KeyError) and e.args else str(e)
  lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def main(argv):
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint step at INFO
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    return 2
  from qwenvl_jax.train.checkpointing import CheckpointIncompatible
  from qwenvl_jax.train.dry_run import dry_run
  from qwenvl_jax.train.loop import NonFiniteLoss, run
  try:
    if _DRY_RUN.value:
      from qwenvl_jax.train.config import validate
      validate(_CONFIG.value, dry_run=True)
      dry_run(_CONFIG.value)
      return 0
    if not _WORKDIR.value:
      raise ValueError("--workdir is required")
    if "://" in _WORKDIR.value:
      raise ValueError(f"--workdir {_WORKDIR.value}: the workdir is written with local file operations; mount the "
                       "bucket (Cloud Storage FUSE, docs/tpu.md) and pass the mounted path")
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, OSError, CheckpointIncompatible, NonFiniteLoss) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  return 0


def parse_flags_or_exit(argv):
  """Flag and config-override errors (unknown key, bad value, missing file) as one line, not a traceback."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise flags.IllegalFlagValueError("--config is required")
    if len(rest) > 1:
      raise flags.Error(f"unexpected arguments: {rest[1:]} (config values are --config.key=value)")
  except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many types; all mean bad input here
    print(f"error: bad flags or config: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  return rest


if __name__ == "__main__":
  # Flags are parsed once here (app.run would parse again, and config overrides cannot be defined twice).
  sys.exit(main(parse_flags_or_exit(sys.argv)))

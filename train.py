"""Train Qwen-VL: python train.py --config=configs/<name>.py --workdir=DIR [--config.key=value ...] [--dry_run]

Each config's docstring says how to run it and what it should reach. A run resumes from the latest checkpoint in
its workdir; SIGTERM finishes the current step, saves and exits 0.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the resolved config")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build shapes only and print per-device bytes of params + optimizer "
                             "state for the configured mesh")


def main(argv):
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint step at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from qwenvl_jax.train.checkpointing import CheckpointIncompatible
  from qwenvl_jax.train.loop import NonFiniteLoss, dry_run, run
  try:
    if _DRY_RUN.value:
      from qwenvl_jax.train.config import validate
      validate(_CONFIG.value, dry_run=True)
      dry_run(_CONFIG.value)
      return 0
    if not _WORKDIR.value:
      raise ValueError("--workdir is required")
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, OSError, CheckpointIncompatible, NonFiniteLoss) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: sys.exit(main(argv)))

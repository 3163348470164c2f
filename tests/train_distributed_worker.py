"""Subprocess helper of tests/test_train_distributed.py (each mode prints JSON lines prefixed with `RESULT `).

    python tests/train_distributed_worker.py mesh
        8 fake CPU devices: the same 3 train steps of a small model on a (data 2, fsdp 2, tensor 2) mesh and on a
        1-device mesh; prints losses, grad norms, the largest final parameter difference and per-device bytes.

    python tests/train_distributed_worker.py train --devices=N --record=DIR -- <train.py flags>
        The real entry point `train.py` (e.g. one process of a multi-host run). Test instrumentation only: every
        process prints its per-step loss at full precision, and process 0 saves each step's gathered global batch
        to DIR/batch_<step>.npz.

    python tests/train_distributed_worker.py replay --devices=N --record=DIR -- <train.py flags>
        `train.py` in one process, its data pipeline replaced by the global batches saved by a `train` run.

Devices are fake CPU devices: XLA_FLAGS is set before jax is imported.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emit(**kw):
  print("RESULT " + json.dumps(kw), flush=True)


def synthetic_batches(cfg, steps: int, batch: int, seq_len: int, max_images: int, num_tasks: int, seed: int = 0):
  """Packed batches shaped like the pipeline's: two samples per row, each with one image span, padding at the end."""
  import numpy as np
  rng = np.random.default_rng(seed)
  v = cfg.visual
  q, size = v.n_queries, v.image_size
  special = {v.image_start_id, v.image_end_id, v.image_pad_id}
  text = np.array([i for i in range(4, cfg.vocab_size) if i not in special], np.int32)
  out = []
  for _ in range(steps):
    b = {k: np.zeros((batch, seq_len), np.int32) for k in ("input_ids", "segment_ids", "positions", "loss_mask",
                                                            "task_ids")}
    b["pixel_values"] = np.zeros((batch, max_images, 3, size, size), np.float32)
    b["image_mask"] = np.zeros((batch, max_images), bool)
    for r in range(batch):
      t = 0
      for k in range(max_images):
        n = int(rng.integers(q + 8, (seq_len - 4) // max_images))
        prefix = int(rng.integers(1, 4))
        ids = rng.choice(text, n)
        ids[prefix], ids[prefix + 1 + q] = v.image_start_id, v.image_end_id
        ids[prefix + 1:prefix + 1 + q] = v.image_pad_id
        b["input_ids"][r, t:t + n] = ids
        b["segment_ids"][r, t:t + n] = k + 1
        b["positions"][r, t:t + n] = np.arange(n)
        b["loss_mask"][r, t + prefix + q + 2:t + n] = 1
        b["task_ids"][r, t:t + n] = int(rng.integers(1, num_tasks + 1))
        b["pixel_values"][r, k] = rng.standard_normal((3, size, size)).astype(np.float32)
        b["image_mask"][r, k] = True
        t += n
    out.append(b)
  return out


def mesh_mode():
  import flax.linen as nn
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from qwenvl_jax.models.qwen_vl.config import QWEN_VL_DEMO, STAGE_FREEZE, param_groups
  from qwenvl_jax.models.qwen_vl.model import QwenVL
  from qwenvl_jax.sharding import LOGICAL_RULES, make_mesh
  from qwenvl_jax.train.optimizer import make_optimizer
  from qwenvl_jax.train.state import bytes_per_device, create_state, state_shardings
  from qwenvl_jax.train.step import StepOptions, train_step

  assert jax.device_count() == 8, jax.devices()
  cfg = QWEN_VL_DEMO.replace(num_hidden_layers=2, visual={"layers": 2}, dtype="float32")
  tx, sched = make_optimizer(lr=1e-3, min_lr=1e-4, warmup_steps=0, total_steps=3, groups=param_groups(cfg),
                             layer_decay=0.9, freeze=STAGE_FREEZE["stage2"])
  opts = StepOptions(loss_chunk=64, num_tasks=3)
  batches = synthetic_batches(cfg, steps=3, batch=4, seq_len=96, max_images=2, num_tasks=opts.num_tasks)
  model = QwenVL(cfg)

  def run(mesh):
    t0 = time.perf_counter()
    abstract, sh = state_shardings(cfg, tx, mesh)
    state = create_state(cfg, tx, mesh, seed=0)
    planned = bytes_per_device(abstract, sh)
    measured = {}
    for name, tree in (("params", state.params), ("opt_state", state.opt_state)):
      per_dev = {d: 0 for d in mesh.devices.flat}
      for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
          per_dev[s.device] += s.data.nbytes
      measured[name] = sorted(set(per_dev.values()))
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    step_fn = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, schedule=sched, opts=opts),
                      in_shardings=(sh, batch_sh), out_shardings=(sh, None), donate_argnums=0)
    t1 = time.perf_counter()
    metrics = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      for b in batches:
        state, m = step_fn(state, jax.device_put(b, batch_sh))
        metrics.append(jax.device_get(m))
    q = state.params["decoder"]["layers"]["attn"]["q"]["kernel"]
    return {"losses": [float(m["loss"]) for m in metrics], "grad_norms": [float(m["grad_norm"]) for m in metrics],
            "task_loss_sum": [np.asarray(m["task_loss_sum"]).tolist() for m in metrics],
            "planned": planned, "measured": measured, "q_spec": str(q.sharding.spec),
            "seconds": {"init": t1 - t0, "steps": time.perf_counter() - t1}}, jax.device_get(state.params)

  sharded, p8 = run(make_mesh(2, 2, 2))
  single, p1 = run(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1))]
  emit(sharded=sharded, single=single, max_param_diff=max(diffs))


def train_mode(args, train_argv):
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from qwenvl_jax.train import loop

  global_batch, log_window = loop._global_batch, loop._log_window
  seen = {"n": 0}

  def recording_global_batch(local, sharding):
    batch = global_batch(local, sharding)
    full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch.items()}
    seen["n"] += 1
    if jax.process_index() == 0 and args.record:
      np.savez(os.path.join(args.record, f"batch_{seen['n']}.npz"), **full)
    emit(process=jax.process_index(), step=seen["n"], local_rows=len(local["input_ids"]),
         global_rows=len(full["input_ids"]))
    return batch

  def printing_log_window(w, m, step, *rest):
    emit(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(), step=step,
         loss=float(m["loss"]), grad_norm=float(m["grad_norm"]))
    return log_window(w, m, step, *rest)

  loop._global_batch, loop._log_window = recording_global_batch, printing_log_window
  run_train_py(train_argv)


def replay_mode(args, train_argv):
  import glob

  import numpy as np

  from qwenvl_jax.data.shapes import TASKS
  from qwenvl_jax.train import loop

  files = sorted(glob.glob(os.path.join(args.record, "batch_*.npz")), key=lambda p: int(p.rsplit("_", 1)[1][:-4]))
  assert files, f"no recorded batches in {args.record}"

  class Replay:
    def __init__(self):
      self.i = 0

    def __iter__(self):
      return self

    def __next__(self):
      self.i += 1
      with np.load(files[self.i - 1]) as f:
        return dict(f)

    def get_state(self):
      return {"i": self.i}

    def set_state(self, state):
      self.i = state["i"]

  loop.data_pipeline = lambda c, tok, seed_offset=0: (Replay(), TASKS)
  log_window = loop._log_window

  def printing_log_window(w, m, step, *rest):
    import jax
    emit(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(), step=step,
         loss=float(m["loss"]), grad_norm=float(m["grad_norm"]))
    return log_window(w, m, step, *rest)

  loop._log_window = printing_log_window
  run_train_py(train_argv)


def run_train_py(train_argv):
  import runpy
  sys.argv = [os.path.join(ROOT, "train.py")] + train_argv
  runpy.run_path(sys.argv[0], run_name="__main__")  # exits with train.py's status


def main():
  argv = sys.argv[1:]
  train_argv = []
  if "--" in argv:
    i = argv.index("--")
    argv, train_argv = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=("mesh", "train", "replay"))
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--record", default="")
  args = p.parse_args(argv)
  devices = 8 if args.mode == "mesh" else args.devices
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  sys.path.insert(0, ROOT)
  if args.mode == "mesh":
    mesh_mode()
  elif args.mode == "train":
    train_mode(args, train_argv)
  else:
    replay_mode(args, train_argv)


if __name__ == "__main__":
  main()

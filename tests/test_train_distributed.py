"""Distributed training: a sharded mesh and a 2-process (multi-host) run train like one device.

Both tests run subprocesses (tests/train_distributed_worker.py) on fake CPU devices (XLA_FLAGS is read when jax
is imported, and jax.distributed needs fresh processes). The multi-host test drives the real entry point train.py
through the launcher (`python -m qwenvl_jax.train.launch --local 2`): 2 processes x 2 CPU devices, a localhost
coordinator, jax 0.10.2's default CPU collectives (gloo), one global
(fsdp 2, tensor 2) mesh; each process feeds its half of each global batch (Qwen2-VL: its own rows, each with its
own patches).

Measured on jax 0.10.2 / CPU, float32: the (data 2, fsdp 2, tensor 2) mesh and one device give losses within
7e-8 relative (the first steps bit-identical) and final parameters within 3.1e-6; the 2-process run gives
bit-identical losses on both processes, within 2e-7 relative of one process on the same global batches. The tests
use rtol 1e-5 for losses and gradient norms, 1e-4 absolute for parameters after 3 AdamW steps at lr 1e-3.
Removing the block-boundary sharding constraint in model.py makes the mesh losses differ by 4.5e-3 relative.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_distributed_worker.py")
RTOL = 1e-5


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # the worker sets the device count
  return env


def _start(args, log_path):
  log = open(log_path, "w")  # noqa: SIM115 - closed by _wait_all once the process ends
  return subprocess.Popen([sys.executable, WORKER, *args], env=_env(), cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True), log


def _wait_all(procs, timeout):
  """Wait for every (process, log file) up to `timeout` seconds in all; once one fails or time is up, kill the
  process groups still running (a peer of a failed process would wait for it until jax's own timeout)."""
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      codes = [p.poll() for p, _ in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.2)
  finally:
    for p, log in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
      log.close()
  return [p.returncode for p, _ in procs]


def _results(log_path):
  with open(log_path) as f:
    text = f.read()
  return [json.loads(ln[len("RESULT "):]) for ln in text.splitlines() if ln.startswith("RESULT ")], text


def _run(args, log_path, timeout):
  rc = _wait_all([_start(args, log_path)], timeout)[0]
  results, text = _results(log_path)
  assert rc == 0, f"worker {args[0]} exited {rc}:\n{text[-4000:]}"
  return results


def test_sharded_mesh_trains_like_one_device(tmp_path):
  r = _run(["mesh"], tmp_path / "mesh.log", timeout=240)[-1]
  sharded, single = r["sharded"], r["single"]
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=RTOL)
  np.testing.assert_allclose(sharded["grad_norms"], single["grad_norms"], rtol=RTOL)
  np.testing.assert_allclose(sharded["task_loss_sum"], single["task_loss_sum"], rtol=RTOL)
  assert r["max_param_diff"] < 1e-4
  # the run is not degenerate: a fresh model starts near ln(vocab) and the updates change the loss
  assert abs(single["losses"][0] - np.log(1024)) < 0.5
  assert len(set(single["losses"])) == 3
  # every device holds the same bytes, exactly what the memory plan says, about a quarter of the model
  # (fsdp x tensor = 4-way: only norms, biases and small tables are replicated)
  for name in ("params", "opt_state"):
    assert sharded["measured"][name] == [sharded["planned"][name]], name
    assert single["measured"][name] == [single["planned"][name]], name
  total = single["planned"]["params_total"]
  assert sharded["planned"]["params_total"] == total == single["measured"]["params"][0]
  assert sharded["measured"]["params"][0] < 0.3 * total
  assert sharded["measured"]["opt_state"][0] < 0.3 * single["measured"]["opt_state"][0]
  assert sharded["q_spec"] == "P(None, 'fsdp', 'tensor', None)"


TINY_CONFIG = textwrap.dedent('''\
    """3 steps of the demo model on small shapes batches (tests/test_train_distributed.py)."""
    from qwenvl_jax.models.qwen_vl.config import STAGE_FREEZE
    from qwenvl_jax.train.config import base_config


    def get_config():
      c = base_config()
      c.model.name = "qwen_vl_demo"
      c.model.dtype = "float32"
      c.data.update(source="shapes", tokenizer="shapes", image_size=56, seq_len=128, max_images=2, batch_size=4,
                    num_records=256, packing_window=64, num_threads=1, mode="chat")
      c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=0, total_steps=3, loss_chunk=64,
                     freeze=STAGE_FREEZE["stage2"])
      c.mesh.update(data=1, fsdp=2, tensor=2)
      c.checkpoint.update(every=1000, keep=1, async_save=False)
      c.log.update(every=1, tensorboard=False, progress=False)
      c.peak_flops = 1e9
      return c
''')


QWEN2_CONFIG = textwrap.dedent('''\
    """3 steps of the tiny Qwen2-VL on any-resolution shapes batches (tests/test_train_distributed.py)."""
    from qwenvl_jax.train.config import base_config


    def get_config():
      c = base_config()
      c.model.update(name="qwen2_vl_tiny", dtype="float32")
      c.data.update(source="shapes", tokenizer={tokenizer!r}, image_sides="40,150", min_pixels=56 * 56,
                    max_pixels=112 * 112, seq_len=128, batch_size=4, patch_budget=192, num_records=256,
                    packing_window=64, num_threads=1)
      c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=0, total_steps=3, loss_chunk=64, freeze=())
      c.mesh.update(data=1, fsdp=2, tensor=2)
      c.checkpoint.update(every=1000, keep=1, async_save=False)
      c.log.update(every=1, tensorboard=False, progress=False)
      c.peak_flops = 1e9
      return c
''')


def _losses(results, process):
  rows = [r for r in results if r.get("process") == process and "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3], results
  return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], rows


@pytest.mark.parametrize("family", ["qwen_vl", "qwen2_vl_lora"])
def test_two_process_train_py_matches_one_process(tmp_path, family):
  """Qwen-VL: fixed image spans, full fine-tuning; Qwen2-VL: each host packs its own rows with their own patches
  (any resolution), and trains LoRA adapters on a base every process reads from a model checkpoint (the base and
  the adapters placed into shards that span both processes)."""
  config = tmp_path / "tiny.py"
  if family == "qwen_vl":
    config.write_text(TINY_CONFIG)
    tokenizer, vocab = "tokenizer.model", 1024
  else:
    from qwen2_tokenizer_fixture import build
    tokenizer, vocab = build(str(tmp_path / "tokenizer.json")), 512
    import qwenvl_jax as qv
    qv.VLModel.random("qwen2_vl_tiny", seed=3, dtype="float32").save(str(tmp_path / "base"))  # read by every process
    lora = f"  c.lora.rank = 4\n  c.init.update(source='checkpoint', path={str(tmp_path / 'base')!r})\n  return c\n"
    config.write_text(QWEN2_CONFIG.format(tokenizer=tokenizer).replace("  return c\n", lora))
  record, workdir = tmp_path / "batches", tmp_path / "multi"
  record.mkdir()
  # started as docs/tpu.md says, through the launcher (it adds the coordinator, process count and ids)
  log_path = tmp_path / "launch.log"
  with open(log_path, "w") as log:
    launcher = subprocess.Popen(
        [sys.executable, "-m", "qwenvl_jax.train.launch", "--local", "2", "--devices-per-process", "2", "--script",
         WORKER, "--", "train", "--devices=2", f"--record={record}", "--", f"--config={config}",
         f"--workdir={workdir}"], env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    rc = launcher.wait(timeout=300)
  text = log_path.read_text()
  assert rc == 0, text[-4000:]
  outs = []
  for i in range(2):  # each process's lines carry its [i] prefix
    own = [ln[len(f"[{i}] "):] for ln in text.splitlines() if ln.startswith(f"[{i}] ")]
    outs.append(([json.loads(ln[len("RESULT "):]) for ln in own if ln.startswith("RESULT ")], "\n".join(own)))

  loss0, gn0, rows0 = _losses(outs[0][0], 0)
  loss1, gn1, rows1 = _losses(outs[1][0], 1)
  assert all(r["processes"] == 2 and r["devices"] == 4 for r in rows0 + rows1)
  # each process fed its own half of each global batch of 4 rows
  fed = [r for i in range(2) for r in outs[i][0] if "local_rows" in r]
  assert len(fed) == 6 and all(r["local_rows"] == 2 and r["global_rows"] == 4 for r in fed)
  with np.load(record / "batch_1.npz") as b:
    pixels = (4, 2, 3, 56, 56) if family == "qwen_vl" else (4, 192, 1176)  # images per row / patches per row
    assert b["input_ids"].shape == (4, 128) and b["pixel_values"].shape == pixels
    assert not np.array_equal(b["input_ids"][:2], b["input_ids"][2:])  # the halves are different data
    assert not np.array_equal(b["pixel_values"][:2], b["pixel_values"][2:])
  # both processes see the same (replicated) loss, and process 0 logged it
  assert loss0 == loss1 and gn0 == gn1
  with open(workdir / "metrics.jsonl") as f:
    logged = [json.loads(ln) for ln in f]
  assert [m["step"] for m in logged] == [1, 2, 3]
  assert [m["last_loss"] for m in logged] == loss0
  assert os.path.isdir(workdir / "checkpoints" / "3")
  assert abs(loss0[0] - np.log(vocab)) < 0.5 and loss0[2] < loss0[0]
  if family.endswith("_lora"):  # the checkpoint holds the adapters alone (its tree read, not its arrays)
    import jax
    import orbax.checkpoint as ocp
    meta = ocp.PyTreeCheckpointer().metadata(str(workdir / "checkpoints" / "3" / "state"))
    tree = getattr(meta, "item_metadata", meta)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree["params"])]
    assert names and all(n.endswith(("'kernel_lora_a']", "'kernel_lora_b']")) for n in names), names

  # one process, one device, the same global batches
  single = _run(["replay", "--devices=1", f"--record={record}", "--", f"--config={config}",
                 f"--workdir={tmp_path / 'single'}", f"--config.data.tokenizer={workdir / tokenizer}",
                 "--config.mesh.fsdp=1", "--config.mesh.tensor=1"], tmp_path / "single.log", timeout=180)
  loss_s, gn_s, rows_s = _losses(single, 0)
  assert all(r["processes"] == 1 and r["devices"] == 1 for r in rows_s)
  np.testing.assert_allclose(loss0, loss_s, rtol=RTOL)
  np.testing.assert_allclose(gn0, gn_s, rtol=RTOL)

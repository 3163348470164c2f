"""Shared pieces of the train.py end-to-end tests (test_train_loop.py, test_train_cli.py): the tiny config and helpers
that run `python train.py` and read its workdir; conftest.py builds the session fixtures `root`, `env` and `reference`
(one uninterrupted 16-step run) from them.

Runs are shared through a session directory that pytest-xdist workers see too (`once`), and all subprocesses share a
persistent JAX compilation cache, so each distinct train step compiles once per session.
"""

import fcntl
import json
import os
import subprocess
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = '''
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen_vl_demo"
  c.model.dtype = "float32"
  c.data.update(source="shapes", tokenizer="shapes", image_size=56, seq_len=96, max_images=2, batch_size=4,
                num_records=400, packing_window=64)
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=16, loss_chunk=96)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=4, keep=5, async_save=True)
  c.log.update(every=1, progress=False, tensorboard=True)
  c.peak_flops = 1e12
  return c
'''
TOTAL = 16
BATCH, SEQ = 4, 96
# The reference run's command-line overrides (every run compared with it uses them too).
REF_OVERRIDES = ["--config.optim.weight_decay=0.01", "--config.data.packing_window=48"]


# --- helpers ------------------------------------------------------------------------------------------------------

def session_root(tmp_path_factory):
  """A directory all xdist workers of this session share (the base temp dir without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def subprocess_env(root) -> dict:
  """Environment of the train.py subprocesses: CPU, unbuffered, a compilation cache shared by the session."""
  cache = root / "jax_cache"
  cache.mkdir(exist_ok=True)
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  return e


def write_config(directory) -> str:
  path = os.path.join(str(directory), "tiny_config.py")
  with open(path, "w") as f:
    f.write(TINY_CONFIG)
  return path


def train(env, *args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def start(env, workdir, *args) -> subprocess.Popen:
  """A train.py process in the background; its stdout/stderr go to workdir/../<name>.{out,err}."""
  with open(f"{workdir}.out", "w") as out, open(f"{workdir}.err", "w") as err:
    return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *map(str, args)], cwd=ROOT,
                            env=env, stdout=out, stderr=err)


def describe(r) -> str:
  return f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def metrics(workdir) -> list[dict]:
  """Complete lines of workdir/metrics.jsonl (a line still being written is left out)."""
  path = os.path.join(str(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  return [json.loads(ln) for ln in text.split("\n")[:-1] if ln.strip()]


def checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoints (Orbax writes `<step>.orbax-checkpoint-tmp*` and renames it when complete)."""
  d = os.path.join(str(workdir), "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def partial_checkpoints(workdir) -> list[str]:
  d = os.path.join(str(workdir), "checkpoints")
  return [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(d) else []


def load_state(workdir, step) -> dict[str, np.ndarray]:
  """The saved train state of one checkpoint as {path: array} (params/..., opt_state/..., step, rng)."""
  import jax
  import orbax.checkpoint as ocp
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.PyTreeCheckpointer() as ck:
      tree = ck.restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def subtree(state: dict, prefix: str) -> dict:
  out = {k: v for k, v in state.items() if k.startswith(prefix)}
  assert out, f"nothing under {prefix}"
  return out


def assert_identical(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
  assert not different, f"{len(different)} arrays differ, e.g. {different[:3]}"


def error_line(stderr: str) -> str:
  """The single `error:` line train.py may print; library warnings (and their source lines) are ignored."""
  lines, skip_indented = [], False
  for ln in stderr.splitlines():
    if "Warning" in ln:
      skip_indented = True
      continue
    if skip_indented and ln.startswith(" "):
      continue
    skip_indented = False
    if ln.strip():
      lines.append(ln)
  assert "Traceback" not in stderr, stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  return lines[0]


def once(root, name, produce) -> dict:
  """produce(directory) -> JSON-able dict, run once per session even across xdist workers (a file lock)."""
  d = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = root / f"{name}.json"
    if not done.exists():
      d.mkdir(exist_ok=True)
      done.write_text(json.dumps(produce(d)))
    return json.loads(done.read_text())

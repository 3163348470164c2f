"""Shared fixtures: the golden Qwen-VL fixture folder and the model imported from it (loaded once), and the train.py
session runs (helpers in train_runs.py)."""

import os
import subprocess

import numpy as np
import pytest
from train_runs import REF_OVERRIDES, describe, metrics, once, session_root, subprocess_env, train, write_config

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_vl_tiny")
QWEN2_VL_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "qwen2_vl_tiny")
INTERNVL_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "internvl_tiny")
INTERNVL_ORIG_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "internvl_orig_tiny")


@pytest.fixture(scope="session")
def fixture_dir():
  return FIXTURE_DIR


@pytest.fixture(scope="session")
def case():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = dict(np.load(os.path.join(FIXTURE_DIR, f"case_{name}.npz")))
    return cache[name]
  return get


@pytest.fixture(scope="session")
def tiny_model():
  import qwenvl_jax as qv
  return qv.load(FIXTURE_DIR, dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_unrolled():
  """The fixture model with unrolled layers (per-layer KV cache buffers when decoding)."""
  import qwenvl_jax as qv
  return qv.load(FIXTURE_DIR, dtype="float32", scan_layers=False)


@pytest.fixture(scope="session")
def fixture_tensors():
  from safetensors.numpy import load_file
  return load_file(os.path.join(FIXTURE_DIR, "model.safetensors"))


# --- Qwen2-VL (tests/models/qwen2_vl) ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def q2_dir():
  return QWEN2_VL_DIR


@pytest.fixture(scope="session")
def q2_case():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = dict(np.load(os.path.join(QWEN2_VL_DIR, f"case_{name}.npz")))
    return cache[name]
  return get


@pytest.fixture(scope="session")
def q2_model():
  import qwenvl_jax as qv
  return qv.load(QWEN2_VL_DIR, dtype="float32")


# --- InternVL (tests/models/internvl) ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def iv_dir():
  return INTERNVL_DIR


@pytest.fixture(scope="session")
def iv_orig_dir():
  return INTERNVL_ORIG_DIR


@pytest.fixture(scope="session")
def iv_case():
  """iv_case(name, folder=None): case_<name>.npz of the native fixture, or of a folder under internvl_orig_tiny."""
  cache = {}

  def get(name, folder=None):
    path = os.path.join(INTERNVL_ORIG_DIR, folder) if folder else INTERNVL_DIR
    if (name, folder) not in cache:
      cache[name, folder] = dict(np.load(os.path.join(path, f"case_{name}.npz")))
    return cache[name, folder]
  return get


@pytest.fixture(scope="session")
def iv_model():
  import qwenvl_jax as qv
  return qv.load(INTERNVL_DIR, dtype="float32")


# --- train.py end-to-end runs (test_train_loop.py, test_train_cli.py) ---------------------------------------------

@pytest.fixture(scope="session")
def root(tmp_path_factory):
  return session_root(tmp_path_factory)


@pytest.fixture(scope="session")
def env(root):
  return subprocess_env(root)


@pytest.fixture(scope="session")
def reference(root, env):
  """One uninterrupted 16-step run (checkpoints every 4) that the resume tests compare against; it also traces
  steps 5-6 with jax.profiler (tracing leaves the numbers alone, so the comparisons hold)."""
  def produce(d):
    wd = d / "workdir"
    r = train(env, f"--config={write_config(d)}", f"--workdir={wd}", *REF_OVERRIDES,
              "--config.profile.start_step=4", "--config.profile.steps=2")
    return {"workdir": str(wd), "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
  ref = once(root, "reference", produce)
  assert ref["rc"] == 0, describe(subprocess.CompletedProcess([], ref["rc"], ref["stdout"], ref["stderr"]))
  ref["metrics"] = metrics(ref["workdir"])
  ref["losses"] = {m["step"]: m["last_loss"] for m in ref["metrics"]}
  return ref

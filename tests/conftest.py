"""Shared fixtures: the golden Qwen-VL fixture folder and the model imported from it (loaded once)."""

import os

import numpy as np
import pytest

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_vl_tiny")


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

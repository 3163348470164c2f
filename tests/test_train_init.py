"""Stage initialisation (`loader.start_params`, what train.py starts from): an imported Hugging Face checkpoint, this
project's model checkpoint, either layer layout."""

import jax
import numpy as np

from qwenvl_jax.convert.loader import start_params
from qwenvl_jax.nn.layers import unstack_layers
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train.config import base_config
from qwenvl_jax.train.loop import model_config


def _config(source, path):
  c = base_config()
  c.model.update(name="qwen_vl_tiny", dtype="float32", param_dtype="float32")
  c.init.update(source=source, path=path)
  return c


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_hf_and_from_model_checkpoint(fixture_dir, tiny_model, tmp_path):
  c = _config("hf", fixture_dir)
  cfg = model_config(c)
  mesh = make_mesh(1, 1, 1)
  params, assets = start_params(c.init, cfg, mesh=mesh)
  _assert_same(params, tiny_model.params)
  assert assets == fixture_dir
  tiny_model.save(str(tmp_path / "ckpt"))
  _assert_same(start_params(_config("checkpoint", str(tmp_path / "ckpt")).init, cfg, mesh=mesh)[0], tiny_model.params)
  assert start_params(_config("random", "").init, cfg, mesh=mesh)[0] is None


def test_init_converts_between_layer_layouts(tiny_model, tmp_path):
  """A checkpoint saved with scanned layers starts a run with unrolled ones (LoRA's layout): the same weights."""
  assert tiny_model.config.scan_layers
  tiny_model.save(str(tmp_path / "ckpt"))
  c = _config("checkpoint", str(tmp_path / "ckpt"))
  unrolled = model_config(c).replace(scan_layers=False)
  params, _ = start_params(c.init, unrolled, mesh=make_mesh(1, 1, 1))
  assert "layers_0" in params["decoder"] and "layers" not in params["decoder"]
  _assert_same(params, unstack_layers(tiny_model.params))


def test_init_from_hf_with_other_dimensions_is_refused(fixture_dir):
  c = _config("hf", fixture_dir)
  c.model.name = "qwen_vl_demo"
  try:
    start_params(c.init, model_config(c))
  except ValueError as e:
    assert f"init.path {fixture_dir}: its model config does not match the run's" in str(e)
  else:
    raise AssertionError("expected a ValueError")

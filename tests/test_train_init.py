"""Stage initialisation from an imported Hugging Face checkpoint and from this project's model checkpoint."""

import jax
import numpy as np

from qwenvl_jax.models.qwen_vl import FAMILY
from qwenvl_jax.sharding import logical_to_sharding, make_mesh
from qwenvl_jax.train.config import base_config
from qwenvl_jax.train.loop import initial_params, model_config


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
  shardings = logical_to_sharding(FAMILY.abstract_params(cfg, boxed=True), make_mesh(1, 1, 1))
  _assert_same(initial_params(c, cfg, shardings), tiny_model.params)
  tiny_model.save(str(tmp_path / "ckpt"))
  _assert_same(initial_params(_config("checkpoint", str(tmp_path / "ckpt")), cfg, shardings), tiny_model.params)
  assert initial_params(_config("random", ""), cfg, shardings) is None


def test_init_from_hf_with_other_dimensions_is_refused(fixture_dir):
  c = _config("hf", fixture_dir)
  c.model.name = "qwen_vl_demo"
  cfg = model_config(c)
  try:
    initial_params(c, cfg, None)
  except ValueError as e:
    assert "does not match model.name=qwen_vl_demo" in str(e)
  else:
    raise AssertionError("expected a ValueError")

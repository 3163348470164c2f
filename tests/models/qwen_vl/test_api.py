"""Public API behaviour: counts, padding, images, dtypes, layer stacking and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenvl_jax as qv
from qwenvl_jax.models.qwen_vl.config import QWEN_VL_TINY


def test_count_params_7b_exact():
  assert qv.count_params("qwen_vl_7b") == 9_656_935_168


def test_count_params_tiny_equals_fixture(fixture_tensors):
  assert qv.count_params("qwen_vl_tiny") == sum(v.size for v in fixture_tensors.values())


def test_config_errors():
  with pytest.raises(ValueError, match="unknown model config 'nope'"):
    qv.get_config("nope")
  with pytest.raises(ValueError, match="hidden_size 256 != num_attention_heads 3"):
    qv.get_config("qwen_vl_tiny", num_attention_heads=3)
  with pytest.raises(ValueError, match="unknown dtype 'float8'"):
    qv.get_config("qwen_vl_tiny", dtype="float8")


def _text_ids(n, seed=0):
  return np.random.default_rng(seed).integers(0, 300, size=n)


def test_left_and_right_padding_match_unpadded_row(tiny_model):
  ids = _text_ids(20)
  alone = np.asarray(tiny_model.logits(ids[None]))[0]
  pad = np.full(7, 303)
  right = np.concatenate([ids, pad])[None]
  left = np.concatenate([pad, ids])[None]
  mask_r = np.concatenate([np.ones(20), np.zeros(7)])[None].astype(np.int32)
  lr = np.asarray(tiny_model.logits(right, mask_r))[0, :20]
  ll = np.asarray(tiny_model.logits(left, mask_r[:, ::-1]))[0, 7:]
  np.testing.assert_allclose(lr, alone, atol=2e-5)
  np.testing.assert_allclose(ll, alone, atol=2e-5)


def test_text_only_and_multi_image_rows(tiny_model, case):
  c = case("batch")
  text = tiny_model.logits(_text_ids(10)[None])
  assert text.shape == (1, 10, 320) and np.isfinite(np.asarray(text)).all()
  # the second row alone (two images) equals its logits inside the batch (images consumed in order)
  row = c["input_ids"][1:2]
  alone = np.asarray(tiny_model.logits(row, pixel_values=c["pixel_values"][1:]))
  np.testing.assert_allclose(alone[0], c["logits"][1], atol=1e-4)
  # swapping the two images changes the logits after the first span only
  swapped = np.asarray(tiny_model.logits(row, pixel_values=c["pixel_values"][[2, 1]]))
  first_img = int(c["image_spans"][1][1])
  np.testing.assert_allclose(swapped[0, :first_img + 1], alone[0, :first_img + 1], atol=1e-5)
  assert np.abs(swapped - alone).max() > 1e-2


def test_unscanned_layers_give_same_logits(fixture_dir, case, tiny_model):
  c = case("batch")
  loop = qv.load(fixture_dir, scan_layers=False)
  assert "layers_1" in loop.params["decoder"] and "layers_1" in loop.params["visual"]
  a = np.asarray(loop.logits(c["input_ids"], c["attention_mask"], c["pixel_values"]))
  b = np.asarray(tiny_model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"]))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_checkpoints_load_in_either_layer_layout(tmp_path, tiny_model, tiny_model_unrolled):
  """Our checkpoints restack or unroll the layers on load; the parameters themselves are unchanged."""
  tiny_model.save(str(tmp_path / "scanned"))
  tiny_model_unrolled.save(str(tmp_path / "unrolled"))
  pairs = [(qv.load(str(tmp_path / "scanned"), scan_layers=False), tiny_model_unrolled),
           (qv.load(str(tmp_path / "unrolled"), scan_layers=True), tiny_model)]
  for loaded, expected in pairs:
    assert loaded.config.scan_layers == expected.config.scan_layers
    assert jax.tree.structure(loaded.params) == jax.tree.structure(expected.params)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_model_tracks_float32(fixture_dir, case, tiny_model):
  c = case("generate")
  bf = qv.load(fixture_dir, dtype="bfloat16")
  assert bf.params["decoder"]["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
  a = np.asarray(bf.logits(c["input_ids"], pixel_values=c["pixel_values"]), np.float32)
  b = np.asarray(tiny_model.logits(c["input_ids"], pixel_values=c["pixel_values"]))
  assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
  assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_random_model_and_remat_policy_do_not_change_outputs():
  m = qv.QwenVLModel.random("qwen_vl_tiny", seed=1)
  r = qv.QwenVLModel(QWEN_VL_TINY.replace(remat_policy="full"), m.params)
  ids = _text_ids(12)[None]
  np.testing.assert_allclose(np.asarray(m.logits(ids)), np.asarray(r.logits(ids)), atol=1e-6)


def _span(n_slots=16, start=300):
  return [start] + [302] * n_slots + [start + 1]


@pytest.mark.parametrize("ids,pixels,message", [
    ([[1, 2] + _span() + [3]], 0, "1 image spans but 0 images"),
    ([[1, 2, 3]], 1, "0 image spans but 1 images"),
    ([[1] + _span(15) + [3]], 1, "holds 15 tokens; the model needs exactly 16"),
    ([[1, 300, 2, 3]], 1, "1 <img> tokens but 0 </img>"),
    ([[1, 301] + _span()[1:-1] + [300, 3]], 1, "nested or unbalanced"),
    ([[1, 2, 320]], 0, r"outside the vocabulary \[0, 320\)"),
    ([[1] * 513], 0, "513 tokens exceeds max_position_embeddings 512"),
    ([1, 2, 3], 0, r"must be a \[B, S\] integer array"),
])
def test_bad_logits_input(tiny_model, ids, pixels, message):
  pv = np.zeros((pixels, 3, 112, 112), np.float32) if pixels else None
  with pytest.raises(ValueError, match=message):
    tiny_model.logits(np.array(ids), pixel_values=pv)


def test_bad_pixel_shapes(tiny_model):
  with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, H, W\]"):
    tiny_model.encode_images(np.zeros((1, 112, 112, 3), np.float32))
  with pytest.raises(ValueError, match="multiples of 14"):
    tiny_model.encode_images(np.zeros((1, 3, 100, 100), np.float32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    tiny_model.logits(np.ones((1, 4), np.int32), attention_mask=np.ones((1, 5)))

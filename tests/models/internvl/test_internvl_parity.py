"""InternVL against the goldens: tests/fixtures/internvl_tiny (transformers' InternVLForConditionalGeneration and its
GotOcr2 processor) and tests/fixtures/internvl_orig_tiny (the original OpenGVLab InternVLChatModel with a Qwen2 and
an InternLM2 language model): processor, tiling, image features, logits of left-padded batches, greedy decoding."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import qwenvl_jax as qv
from qwenvl_jax.models.internvl.processor import tile_grid


def masked_maxdiff(a, b, mask):
  m = np.asarray(mask).astype(bool)
  return float(np.abs(np.asarray(a, np.float32)[m] - np.asarray(b, np.float32)[m]).max())


def images(folder, n=3):
  return [Image.open(os.path.join(folder, f"img{i}.png")) for i in range(n)]


def test_processor_matches_transformers(iv_dir, iv_case):
  c = iv_case("processor")
  out = qv.load_processor(iv_dir)(images=images(iv_dir))
  np.testing.assert_array_equal(out["num_patches"], c["images_num_patches"])
  assert np.abs(out["pixel_values"] - c["images_pixel_values"]).max() <= 1e-6


def test_processor_matches_the_original_preprocessing(iv_orig_dir):
  """The original load_image / dynamic_preprocess (tiling from config.json's max_dynamic_patch), and its tile-grid
  decisions for 40 sizes, exact ties included (79x79 -> 1 tile, 80x80 -> 2x2)."""
  want = np.load(os.path.join(iv_orig_dir, "pixel_values.npz"))
  out = qv.load_processor(os.path.join(iv_orig_dir, "qwen2"))(images=images(iv_orig_dir))
  np.testing.assert_array_equal(out["num_patches"], want["num_patches"])
  np.testing.assert_array_equal(out["pixel_values"], np.concatenate([want[f"img{i}"] for i in range(3)]))
  with open(os.path.join(iv_orig_dir, "tiling.json")) as f:
    tiling = json.load(f)
  for c in tiling["cases"]:
    got = tile_grid(c["width"], c["height"], tiling["image_size"], 1, c["max_num"])
    assert got == (c["grid_cols"], c["grid_rows"]), c


def test_image_features(iv_model, iv_case):
  c = iv_case("batch")
  got = np.asarray(iv_model.encode_images(c["pixel_values"]))
  assert got.shape == c["image_features"].shape and np.abs(got - c["image_features"]).max() <= 1e-5


def test_logits_of_a_left_padded_batch(iv_model, iv_case):
  c = iv_case("batch")
  got = iv_model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"])
  assert masked_maxdiff(got, c["logits"], c["attention_mask"]) <= 1e-4


def test_greedy_generation(iv_model, iv_case):
  c = iv_case("generate")
  out = iv_model.generate(c["input_ids"], c["attention_mask"], c["pixel_values"], max_new_tokens=int(c["n_new"]))
  np.testing.assert_array_equal(out, c["full_ids"])


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def original(request, iv_orig_dir):
  return request.param, qv.load(os.path.join(iv_orig_dir, request.param), dtype="float32")


def test_original_format_logits_and_greedy(original, iv_case):
  """The OpenGVLab layout (InternLM2's packed wqkv split per key/value group). Its logits reach |9.7| (weights
  drawn with std 0.3), so float32 rounding differs by up to ~1e-4."""
  arch, model = original
  assert model.config.checkpoint_format == ("original_internlm2" if arch == "internlm2" else "original")
  c = iv_case("batch", arch)
  assert np.abs(np.asarray(model.encode_images(c["pixel_values"])) - c["image_features"]).max() <= 1e-5
  got = model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"], num_patches=c["num_patches"])
  assert masked_maxdiff(got, c["logits"], c["attention_mask"]) <= 2.5e-4
  g = iv_case("generate", arch)
  out = model.generate(g["input_ids"], g["attention_mask"], g["pixel_values"], max_new_tokens=16)
  np.testing.assert_array_equal(out[:, g["input_ids"].shape[1]:], g["new_tokens"])


def test_bad_inputs_are_one_line_errors(iv_model, iv_case):
  c = iv_case("batch")
  with pytest.raises(ValueError, match="<IMG_CONTEXT> tokens but 3 tiles need 12"):
    iv_model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"][:3])
  with pytest.raises(ValueError, match=r"num_patches \[1, 2\] sums to 3"):
    iv_model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"], num_patches=[1, 2])
  with pytest.raises(ValueError, match=r"pixel_values must be \[N_tiles, 3, 56, 56\]"):
    iv_model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"][:, :, :28])

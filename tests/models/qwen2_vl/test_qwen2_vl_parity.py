"""Qwen2-VL against the transformers goldens of tests/fixtures/qwen2_vl_tiny: processor, positions, ViT + merger,
logits of left-padded batches (images of different sizes, a video, a video longer than its spatial extent) and
greedy decoding with the KV cache."""

import os

import numpy as np
import pytest
from PIL import Image

import qwenvl_jax as qv
from qwenvl_jax.models.qwen2_vl.positions import rope_index

VISION = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def vision_of(c):
  return {k: c[k] for k in VISION if k in c}


def frames(folder, video, n):
  return [Image.open(os.path.join(folder, f"video{video}_f{i}.png")) for i in range(n)]


def test_processor_matches_transformers(q2_dir, q2_case):
  c = q2_case("processor")
  proc = qv.load_processor(q2_dir)
  out = proc(images=[Image.open(os.path.join(q2_dir, f"img{i}.png")) for i in range(3)])
  np.testing.assert_array_equal(out["image_grid_thw"], c["images_image_grid_thw"])
  assert np.abs(out["pixel_values"] - c["images_pixel_values"]).max() <= 1e-5
  out = proc(videos=[frames(q2_dir, 0, 4), frames(q2_dir, 1, 5)])
  np.testing.assert_array_equal(out["video_grid_thw"], c["videos_video_grid_thw"])
  assert np.abs(out["pixel_values_videos"] - c["videos_pixel_values_videos"]).max() <= 1e-5
  # the long video (16 frames) of case_long_video
  long = q2_case("long_video")
  out = proc(videos=[frames(q2_dir, 2, 16)])
  np.testing.assert_array_equal(out["video_grid_thw"], long["video_grid_thw"])
  assert np.abs(out["pixel_values_videos"] - long["pixel_values_videos"]).max() <= 1e-5


def test_processor_budget_override(q2_dir):
  """min/max pixels from preprocessor_config.json, overridable at load time (the first knob for memory)."""
  img = Image.open(os.path.join(q2_dir, "img0.png"))  # 90 x 150
  default = qv.load_processor(q2_dir)(images=[img])["image_grid_thw"]
  small = qv.load_processor(q2_dir, max_pixels=28 * 28 * 4)(images=[img])["image_grid_thw"]
  assert default.tolist() == [[1, 8, 4]] and small.tolist() == [[1, 4, 2]]
  with pytest.raises(ValueError, match="min_pixels"):
    qv.load_processor(q2_dir, min_pixels=20000)


@pytest.mark.parametrize("name", ["batch", "video", "generate", "long_video"])
def test_positions_follow_the_paper_rule(q2_case, name):
  c = q2_case(name)
  pos, nxt = rope_index(c["input_ids"], c["attention_mask"], c.get("image_grid_thw"), c.get("video_grid_thw"),
                        image_token_id=482, video_token_id=483, merge=2)
  m = c["attention_mask"].astype(bool)
  for k in range(3):
    np.testing.assert_array_equal(pos[k][m], c["position_ids"][k][m])
  np.testing.assert_array_equal(nxt - m.sum(1), c["rope_deltas"][:, 0])


def test_transformers_5_23_rule_is_an_option(q2_case):
  """5.23 advances by max(h, w) after a block: on the long video its rope deltas are [-33, -4] (paper: [-27, -4])."""
  c = q2_case("long_video")
  _, nxt = rope_index(c["input_ids"], c["attention_mask"], c["image_grid_thw"], c["video_grid_thw"],
                      image_token_id=482, video_token_id=483, merge=2, rule="transformers_5_23")
  assert (nxt - c["attention_mask"].sum(1)).tolist() == [-33, -4]


def test_vision_features(q2_model, q2_case):
  for name in ("batch", "long_video"):
    c = q2_case(name)
    got = np.asarray(q2_model.encode_images(c["pixel_values"], c["image_grid_thw"]))
    assert got.shape == c["image_embeds"].shape and np.abs(got - c["image_embeds"]).max() <= 1e-5
  got = np.asarray(q2_model.encode_images(c["pixel_values_videos"], c["video_grid_thw"], video=True))
  assert np.abs(got - c["video_embeds"]).max() <= 1e-5


@pytest.mark.parametrize("name", ["batch", "video", "long_video"])
def test_logits(q2_model, q2_case, name):
  c = q2_case(name)
  got = np.asarray(q2_model.logits(c["input_ids"], c["attention_mask"], **vision_of(c)))
  m = c["attention_mask"].astype(bool)
  assert np.abs(got[m] - c["logits"][m]).max() <= 1e-4


@pytest.mark.parametrize("name", ["generate", "long_video"])
def test_greedy_with_kv_cache(q2_model, q2_case, name):
  c = q2_case(name)
  out = q2_model.generate(c["input_ids"], c["attention_mask"], max_new_tokens=int(c["n_new"]), **vision_of(c))
  np.testing.assert_array_equal(out, c["full_ids"])

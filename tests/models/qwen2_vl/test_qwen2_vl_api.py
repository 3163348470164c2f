"""Qwen2-VL through the public API: parameter counts of the released configs, one-line errors for bad inputs,
and a fixed patch bucket (images of other sizes do not recompile)."""

import json
import os

import numpy as np
import pytest

import qwenvl_jax as qv
from qwenvl_jax.models.qwen2_vl.inputs import patch_bucket


def test_count_params_of_the_released_configs(q2_dir):
  with open(os.path.join(q2_dir, "param_counts.json")) as f:
    want = json.load(f)
  for name in ("qwen2_vl_2b", "qwen2_vl_7b", "qwen2_vl_72b"):
    assert qv.count_params(name) == want[name]["params"], name
  assert qv.count_params("qwen2_vl_2b") == 2_208_985_600  # tied lm_head counted once


def test_dispatch_on_model_type(q2_model, q2_dir):
  assert q2_model.family.name == "qwen2_vl" and "lm_head" not in q2_model.params
  with open(os.path.join(q2_dir, "config.json")) as f:
    assert json.load(f)["model_type"] == "qwen2_vl"


def _image_row(c, row=1):
  """Row 1 of case_batch (one image) without padding, and its image's patches and grid."""
  m = c["attention_mask"][row].astype(bool)
  return c["input_ids"][row][m][None], c["pixel_values"][:24], c["image_grid_thw"][:1]


@pytest.mark.parametrize("change,message", [
    (lambda ids, pv, g: (np.where(ids == 482, 7, ids), pv, g), "placeholder runs than image grids|0 image blocks"),
    (lambda ids, pv, g: (np.concatenate([ids[:, :6], ids[:, 7:]], 1), pv, g), "has 5 placeholder tokens but its grid"),
    (lambda ids, pv, g: (ids, pv[:20], g), r"pixel_values has shape \[20, 1176\] but image_grid_thw"),
    (lambda ids, pv, g: (ids, pv, None), "go together"),
    (lambda ids, pv, g: (ids, pv, g * np.array([[1, 1, 3]])), "needs"),
    (lambda ids, pv, g: (np.where(ids == 482, 600, ids), pv, g), "outside the vocabulary"),
])
def test_bad_inputs_are_one_line_errors(q2_model, q2_case, change, message):
  ids, pv, g = change(*_image_row(q2_case("batch")))
  with pytest.raises(ValueError, match=message) as e:
    q2_model.logits(ids, pixel_values=pv, image_grid_thw=g)
  assert "\n" not in str(e.value)


def test_video_args_and_unknown_args(q2_model, q2_case):
  ids, pv, g = _image_row(q2_case("batch"))
  with pytest.raises(ValueError, match="video placeholder|video grids"):
    q2_model.logits(ids, pixel_values=pv, image_grid_thw=g, pixel_values_videos=pv, video_grid_thw=g)
  with pytest.raises(TypeError, match="vision inputs"):
    q2_model.logits(ids, pixel_values=pv, image_grid_thw=g, images=pv)


def test_patch_buckets():
  assert [patch_bucket(n) for n in (1, 64, 65, 88, 128, 129, 5000)] == [64, 64, 128, 128, 128, 256, 8192]


def test_other_image_sizes_in_the_same_bucket_do_not_recompile(q2_model, q2_dir):
  """Two prompts of the same length whose images have different grids (88 and 120 patches: both in the 128 bucket)
  run one compiled program."""
  from PIL import Image
  proc = q2_model.processor()
  imgs = [Image.open(os.path.join(q2_dir, "img0.png")), Image.open(os.path.join(q2_dir, "img1.png"))]
  outs = []
  for scale, img in zip((1, 2), imgs):
    pv = proc(images=[img.resize((img.width * scale, img.height))])
    n = proc.tokens(pv["image_grid_thw"][0])
    ids = np.array([[5] * (40 - n) + [480] + [482] * n + [481]])
    before = q2_model._jit_logits._cache_size()
    outs.append(q2_model.logits(ids, pixel_values=pv["pixel_values"], image_grid_thw=pv["image_grid_thw"]))
    grid = pv["image_grid_thw"][0].tolist()
  assert grid != [1, 8, 4] and q2_model._jit_logits._cache_size() == before  # the second call reused the program

"""Qwen2-VL weights both ways: import -> export bit-exact, transformers loads our export with the same logits,
config.json in both layouts, this project's checkpoint and the conversion CLI; more tiny models built by
transformers (untied head, 4:1 grouped-query attention, odd grids, three images, video + image in one row, bf16)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from qwen2_vl_reference import batch, ours, reference_logits, save_random_model
from safetensors.numpy import load_file

import qwenvl_jax as qv
from qwenvl_jax.convert.__main__ import main as convert_cli
from qwenvl_jax.models.qwen2_vl.config import QWEN2_VL_TINY, from_hf_dict, to_hf_dict

torch.set_num_threads(2)


def masked_maxdiff(a, b, mask):
  m = np.asarray(mask).astype(bool)
  return float(np.abs(np.asarray(a, np.float32)[m] - np.asarray(b, np.float32)[m]).max())


@pytest.fixture(scope="module")
def exported(q2_model, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("q2_export"))
  qv.export_hf(q2_model, out, dtype="float32")
  return out


def test_export_is_the_fixture_bit_for_bit(exported, q2_dir):
  want, got = load_file(os.path.join(q2_dir, "model.safetensors")), load_file(os.path.join(exported,
                                                                                              "model.safetensors"))
  assert set(got) == set(want) and "lm_head.weight" not in got  # tied: the head is the embedding
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_transformers_loads_the_export(exported, q2_dir, q2_case):
  from transformers import Qwen2VLForConditionalGeneration
  tm = Qwen2VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()
  c = q2_case("batch")
  logits = reference_logits(tm, {k: c[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                   "mm_token_type_ids")})
  assert masked_maxdiff(logits, c["logits"], c["attention_mask"]) <= 1e-4
  want = load_file(os.path.join(q2_dir, "model.safetensors"))
  state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v.numpy()
           for k, v in tm.state_dict().items()}
  for k in want:
    assert np.array_equal(state[k], want[k]), k


def test_config_json_layouts(q2_dir):
  with open(os.path.join(q2_dir, "config.json")) as f:
    nested = json.load(f)
  assert from_hf_dict(nested) == QWEN2_VL_TINY
  flat = to_hf_dict(QWEN2_VL_TINY, "float32")
  assert "text_config" not in flat and flat["rope_scaling"]["mrope_section"] == [2, 3, 3]
  assert from_hf_dict(flat) == QWEN2_VL_TINY
  hub_style = {**flat, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
               "vision_config": {**flat["vision_config"], "in_chans": 3}}
  hub_style["vision_config"].pop("in_channels")
  assert from_hf_dict(hub_style) == QWEN2_VL_TINY
  with pytest.raises(ValueError, match="sliding-window"):
    from_hf_dict({**flat, "use_sliding_window": True})


def test_bf16_export(q2_model, tmp_path):
  qv.export_hf(q2_model, str(tmp_path), dtype="bfloat16")
  got = load_file(str(tmp_path / "model.safetensors"))
  emb = np.asarray(q2_model.params["wte"]["embedding"])
  assert got["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["model.embed_tokens.weight"], emb.astype(ml_dtypes.bfloat16))
  assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"


def test_checkpoint_and_cli_round_trip(q2_dir, q2_case, tmp_path, capsys):
  ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "hf")
  assert convert_cli(["hf-to-orbax", q2_dir, ckpt, "--dtype", "float32"]) == 0
  assert convert_cli(["orbax-to-hf", ckpt, back, "--dtype", "float32"]) == 0
  want, got = load_file(os.path.join(q2_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  m = qv.load(ckpt, scan_layers=False)  # our checkpoint, either layer layout
  assert type(m.config).__name__ == "Qwen2VLConfig" and not m.config.scan_layers
  assert qv.load_processor(ckpt).max_pixels == 10000  # the processor files travel with the checkpoint
  c = q2_case("video")
  got = m.logits(c["input_ids"], c["attention_mask"], c["pixel_values"], image_grid_thw=c["image_grid_thw"],
                 pixel_values_videos=c["pixel_values_videos"], video_grid_thw=c["video_grid_thw"])
  assert masked_maxdiff(got, c["logits"], c["attention_mask"]) <= 1e-4


# --- more tiny models built by transformers --------------------------------------------------------------------

ROWS = [
    [3, ("image", 6, 10), 4, ("image", 2, 2), 2, ("image", 14, 4), 5],   # three images of odd, different grids
    [2, ("video", 2, 4, 6), 3, ("image", 4, 8), 4],                        # video + image in one row
    [7],                                                                   # text only, left-padded
]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("q2_untied"))
  tm = save_random_model(folder, seed=1)
  b = batch(ROWS, seed=2)
  return folder, tm, b, reference_logits(tm, b)


def test_untied_gqa_odd_grids_mixed_rows(untied):
  folder, _, b, want = untied
  m = qv.load(folder)
  assert not m.config.tie_word_embeddings and m.config.num_key_value_heads == 1 and "lm_head" in m.params
  assert masked_maxdiff(m.logits(**ours(b)), want, b["attention_mask"]) <= 1e-4
  unrolled = qv.load(folder, scan_layers=False)
  assert masked_maxdiff(unrolled.logits(**ours(b)), want, b["attention_mask"]) <= 1e-4


def test_bfloat16_within_tolerance(untied):
  folder, _, b, want = untied
  m = qv.load(folder, dtype="bfloat16")
  assert m.params["wte"]["embedding"].dtype == np.dtype(ml_dtypes.bfloat16)
  # bf16 weights and activations (norms, softmax, RoPE in float32): logits std ~1; measured max diff ~0.03
  assert masked_maxdiff(m.logits(**ours(b)), want, b["attention_mask"]) <= 0.1


def test_greedy_matches_transformers_generate(untied):
  folder, tm, b, _ = untied
  rows = batch(ROWS[:2], seed=3)  # left-padded rows; an image and a video in the second
  with torch.no_grad():
    ref = tm.generate(**{k: torch.tensor(v) for k, v in rows.items()}, max_new_tokens=8, do_sample=False,
                      min_new_tokens=8).numpy()
  m = qv.load(folder, scan_layers=False)
  np.testing.assert_array_equal(m.generate(**ours(rows), max_new_tokens=8), ref)

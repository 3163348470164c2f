"""Parity with the official PyTorch Qwen-VL on the golden fixture (float32; bar: max |diff| <= 1e-4)."""

import numpy as np
import pytest
from greedy import greedy_decode

from qwenvl_jax.models.qwen_vl.model import QwenVL

TOL = 1e-4


def maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_vit_tokens(tiny_model, case):
  c = case("batch")
  assert maxdiff(tiny_model.vit_tokens(c["pixel_values"]), c["vit_tokens"]) <= TOL


def test_vision_features(tiny_model, case):
  c = case("batch")
  assert maxdiff(tiny_model.encode_images(c["pixel_values"]), c["vision_features"]) <= TOL


def test_vision_intermediates(tiny_model, case):
  """Localises a mismatch: resampler attention output before ln_post/proj."""
  c = case("batch")
  _, inter = tiny_model.module.apply({"params": tiny_model.params}, c["pixel_values"],
                                     method=QwenVL.encode_images, mutable=["intermediates"])
  got = inter["intermediates"]["resampler"]["attn_out"][0]
  assert maxdiff(got, c["resampler_out"]) <= TOL


def test_batch_logits_padded_two_rows_three_images(tiny_model, case):
  c = case("batch")
  logits = np.asarray(tiny_model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"]))
  real = c["attention_mask"].astype(bool)
  assert logits.shape == c["logits"].shape
  assert maxdiff(logits[real], c["logits"][real]) <= TOL


def test_long_context_uses_dynamic_ntk_and_logn(tiny_model, case):
  c = case("long")
  assert float(c["ntk_alpha"]) == 3.0
  assert maxdiff(tiny_model.logits(c["input_ids"], pixel_values=c["pixel_values"]), c["logits"]) <= TOL


def test_uncached_forward_past_seq_length(tiny_model, case):
  c = case("boundary")
  ids = c["full_ids"][:, :-1]
  assert maxdiff(tiny_model.logits(ids, pixel_values=c["pixel_values"]), c["nocache_logits"]) <= TOL


@pytest.mark.parametrize("name,prefix", [("generate", ""), ("boundary", ""), ("long", "cont_")])
def test_greedy_with_kv_cache(tiny_model, case, name, prefix):
  c = case(name)
  tokens, step_logits, prompt_logits = greedy_decode(tiny_model, c["input_ids"], c["pixel_values"], int(c["n_new"]))
  np.testing.assert_array_equal(tokens, c[prefix + "new_tokens"])
  assert maxdiff(step_logits, c[prefix + "step_logits"]) <= TOL
  if "prompt_logits" in c:
    assert maxdiff(prompt_logits, c["prompt_logits"]) <= TOL

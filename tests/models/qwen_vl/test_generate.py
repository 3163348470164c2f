"""Generation with the KV cache: official greedy outputs, padding invariance, sampling filters, stops, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax.infer.generate import sample_logits


@pytest.mark.parametrize("layout", ["tiny_model", "tiny_model_unrolled"])
@pytest.mark.parametrize("name,prefix", [("generate", ""), ("boundary", ""), ("long", "cont_")])
def test_greedy_matches_official(request, case, name, prefix, layout):
  model = request.getfixturevalue(layout)  # scanned layers (stacked cache) and unrolled (per-layer cache buffers)
  c = case(name)
  out = model.generate(c["input_ids"], pixel_values=c["pixel_values"], max_new_tokens=int(c["n_new"]))
  s = c["input_ids"].shape[1]
  np.testing.assert_array_equal(out[:, :s], c["input_ids"])
  np.testing.assert_array_equal(out[0, s:], c[prefix + "new_tokens"])


def test_batched_prompts_with_padding_equal_single_prompts(tiny_model, case):
  g, b = case("generate"), case("boundary")
  rows = [g["input_ids"][0], b["input_ids"][0][:40]]  # 34 and 40 tokens, one image each
  s = max(len(r) for r in rows)
  ids = np.full((2, s), 303)
  mask = np.zeros((2, s), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r  # right-padded input: generate moves real tokens to the right end itself
    mask[i, :len(r)] = 1
  pix = np.concatenate([g["pixel_values"], b["pixel_values"]])
  both = tiny_model.generate(ids, pixel_values=pix, attention_mask=mask, max_new_tokens=6)
  for i, r in enumerate(rows):
    alone = tiny_model.generate(r[None], pixel_values=pix[i:i + 1], max_new_tokens=6)
    np.testing.assert_array_equal(both[i, s:], alone[0, len(r):])


def test_stop_ids_end_generation(tiny_model, case):
  c = case("generate")
  first = int(c["new_tokens"][0])
  out = tiny_model.generate(c["input_ids"], pixel_values=c["pixel_values"], max_new_tokens=12, stop_ids=[first])
  assert out.shape[1] == c["input_ids"].shape[1] + 1 and out[0, -1] == first


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny_model, case):
  c = case("generate")
  kw = dict(pixel_values=c["pixel_values"], max_new_tokens=8, do_sample=True, temperature=1.5)
  a = tiny_model.generate(c["input_ids"], seed=1, **kw)
  np.testing.assert_array_equal(a, tiny_model.generate(c["input_ids"], seed=1, **kw))
  assert any(not np.array_equal(a, tiny_model.generate(c["input_ids"], seed=s, **kw)) for s in range(2, 6))
  greedy = tiny_model.generate(c["input_ids"], pixel_values=c["pixel_values"], max_new_tokens=8)
  np.testing.assert_array_equal(tiny_model.generate(c["input_ids"], seed=3, top_k=1, **kw), greedy)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draw = lambda **kw: np.array([int(sample_logits(logits, k, 1.0, **kw)[0]) for k in keys[:200]])  # noqa: E731
  assert set(draw(top_k=2, top_p=1.0)) == {0, 1}
  assert set(draw(top_k=0, top_p=0.5)) == {0}          # 0.5 alone reaches top_p
  assert set(draw(top_k=0, top_p=0.79)) == {0, 1}      # 0.5 + 0.3 needed
  counts = np.bincount(draw(top_k=0, top_p=1.0), minlength=4) / 200
  assert abs(counts[0] - 0.5) < 0.12 and counts[3] < 0.15


@pytest.mark.parametrize("kw,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=510), "exceeds the context of 512"),
])
def test_bad_generation_options(tiny_model, kw, message):
  with pytest.raises(ValueError, match=message):
    tiny_model.generate(np.array([[1, 2, 3]]), **kw)

"""Building blocks against independent references (torch for bicubic, numpy for norms, official formulas)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenvl_jax.nn.attention import make_attention_mask
from qwenvl_jax.nn.layers import LayerNorm, RMSNorm
from qwenvl_jax.nn.positions import bicubic_matrix, resize_square_table, sincos_2d
from qwenvl_jax.nn.rotary import apply_rope, inv_frequencies, logn_scale, ntk_alpha
from qwenvl_jax.nn.vlm import splice_spans


@pytest.mark.parametrize("n_in,n_out", [(16, 32), (16, 8), (16, 4), (16, 37), (7, 16)])
def test_bicubic_matches_torch(n_in, n_out):
  x = np.random.default_rng(0).normal(size=(n_in * n_in, 5)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x.reshape(1, n_in, n_in, 5)).permute(0, 3, 1, 2),
                                        size=(n_out, n_out), mode="bicubic", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(n_out * n_out, 5).numpy()
  got = np.asarray(resize_square_table(jnp.asarray(x), n_out * n_out))
  # torch evaluates the taps with fused multiply-adds in another order: a few float32 ulps apart
  np.testing.assert_allclose(got, ref, atol=5e-6)


def test_bicubic_rows_sum_to_one():
  np.testing.assert_allclose(bicubic_matrix(16, 32).sum(1), 1.0, atol=1e-6)


def test_vit_and_key_position_tables_match_official(fixture_tensors, case):
  c = case("batch")
  pos = fixture_tensors["transformer.visual.positional_embedding"].astype(np.float32)
  np.testing.assert_allclose(np.asarray(resize_square_table(pos, 64)), c["vit_pos_embed"], atol=1e-6)
  table = fixture_tensors["transformer.visual.attn_pool.pos_embed"]
  np.testing.assert_array_equal(sincos_2d(256, 4), table)  # fresh table == checkpoint, bit for bit
  np.testing.assert_allclose(np.asarray(resize_square_table(table, 64)), c["resampler_key_pos_embed"], atol=1e-6)


@pytest.mark.parametrize("n,alpha", [(1, 1), (64, 1), (65, 3), (100, 3), (128, 3), (129, 7), (256, 7), (257, 15)])
def test_ntk_alpha_formula(n, alpha):
  assert ntk_alpha(n, 64) == alpha


def test_logn_scale_matches_official_table(case):
  for name, key in (("long", "logn_scale"), ("long", "cont_logn_scale"), ("boundary", "logn_scale")):
    ref = case(name)[key]
    got = np.asarray(logn_scale(jnp.arange(len(ref))[None], 64))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert (got[:64] == 1).all() and (got[64:] > 1).all()


def test_rope_rotate_half_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.tile(np.arange(5), (2, 1))
  inv = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
  ang = np.concatenate([pos[..., None] * inv] * 2, -1)[:, :, None]
  rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  ref = x * np.cos(ang) + rot * np.sin(ang)
  got = apply_rope(jnp.asarray(x), jnp.asarray(pos), inv_frequencies(8, 10000.0))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
  # NTK alpha enlarges the base: base' = base * alpha ** (d / (d - 2))
  np.testing.assert_allclose(np.asarray(inv_frequencies(8, 10000.0, 3.0)),
                             1.0 / (10000 * 3 ** (8 / 6)) ** (np.arange(0, 8, 2) / 8), rtol=1e-6)


def test_norms_match_numpy():
  x = np.random.default_rng(2).normal(3.0, 2.0, size=(4, 16)).astype(np.float32)
  ln = LayerNorm(1e-6)
  p = ln.init(jax.random.key(0), x)
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(ln.apply(p, x)), ref, atol=1e-5)
  rms = RMSNorm(1e-6)
  p = rms.init(jax.random.key(0), x)
  np.testing.assert_allclose(np.asarray(rms.apply(p, x)), x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6),
                             atol=1e-5)


def test_attention_mask_causal_padding_segments():
  slots = jnp.arange(4)[None]
  valid = jnp.array([[True, True, True, False]])
  seg = jnp.array([[1, 1, 2, 0]])
  m = np.asarray(make_attention_mask(slots, valid, seg, seg))[0, 0]
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(m, expected)


def test_splice_spans_batch_major_any_count():
  """Image k (counted row by row) fills the slots between the k-th <img> and </img>; tags keep embeddings."""
  start, end, q, d = 50, 51, 3, 4
  ids = np.array([[1, start, 9, 9, 9, end, 2, start, 9, 9, 9, end],
                  [3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6],
                  [start, 9, 9, 9, end, 7, 7, 7, 7, 7, 7, 7]])
  emb = np.random.default_rng(3).normal(size=ids.shape + (d,)).astype(np.float32)
  feats = np.random.default_rng(4).normal(size=(4, q, d)).astype(np.float32)  # one spare image: ignored
  got = np.asarray(splice_spans(jnp.asarray(emb), jnp.asarray(ids), jnp.asarray(feats), start, end))
  ref = emb.copy()
  k = 0
  for b in range(ids.shape[0]):
    for a in np.flatnonzero(ids[b] == start):
      ref[b, a + 1:a + 1 + q] = feats[k]
      k += 1
  np.testing.assert_array_equal(got, ref)
  assert k == 3


def test_splice_spans_row_local_slots():
  """[B, M, Q, D] features: row b's k-th span takes features[b, k] (packed rows with M image slots)."""
  start, end, q, d = 50, 51, 2, 3
  ids = np.array([[start, 9, 9, end, start, 9, 9, end], [1, 2, 3, 4, start, 9, 9, end]])
  emb = np.zeros(ids.shape + (d,), np.float32)
  feats = np.random.default_rng(5).normal(size=(2, 3, q, d)).astype(np.float32)  # 3 slots per row
  got = np.asarray(splice_spans(jnp.asarray(emb), jnp.asarray(ids), jnp.asarray(feats), start, end))
  np.testing.assert_array_equal(got[0, 1:3], feats[0, 0])
  np.testing.assert_array_equal(got[0, 5:7], feats[0, 1])
  np.testing.assert_array_equal(got[1, 5:7], feats[1, 0])
  assert (got[1, :4] == 0).all() and (got[:, [0, 3, 4, 7]][0] == 0).all()


def test_splice_spans_stay_within_their_sample():
  """A stray </img> in the first sample of a packed row: without segment ids the depth count spans the row and the
  next sample's image gets none of its features; with them it gets all of them."""
  start, end, q, d = 50, 51, 2, 3
  ids = np.array([[7, end, 7, start, 9, 9, end, 7]])
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2]])
  emb = np.zeros(ids.shape + (d,), np.float32)
  feats = np.random.default_rng(6).normal(size=(1, 2, q, d)).astype(np.float32)
  args = (jnp.asarray(emb), jnp.asarray(ids), jnp.asarray(feats), start, end)
  assert (np.asarray(splice_spans(*args))[0, 4:6] == 0).all()  # the defect segment ids prevent
  got = np.asarray(splice_spans(*args, segment_ids=jnp.asarray(seg)))
  np.testing.assert_array_equal(got[0, 4:6], feats[0, 0])
  assert (np.delete(got[0], [4, 5], axis=0) == 0).all()


def test_mrope_sections_pick_each_axis():
  from qwenvl_jax.nn.rotary import mrope_angles, rope_angles
  inv = inv_frequencies(16, 1e6)                               # 8 frequencies
  same = jnp.broadcast_to(jnp.arange(5)[None, None], (3, 1, 5))
  np.testing.assert_array_equal(mrope_angles(same, inv, (2, 3, 3)), rope_angles(jnp.arange(5)[None], inv))
  t, h, w = jnp.arange(5) + 1, jnp.arange(5) * 2, jnp.arange(5) * 3
  got = np.asarray(mrope_angles(jnp.stack([t, h, w])[:, None], inv, (2, 3, 3)))[0]
  want = np.concatenate([np.outer(t, inv[:2]), np.outer(h, inv[2:5]), np.outer(w, inv[5:])], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="does not sum"):
    mrope_angles(same, inv, (2, 2, 2))


def test_vision_rope_rows_then_columns():
  from qwenvl_jax.nn.rotary import vision_rope_angles
  rc = jnp.array([[0, 0], [2, 5]])
  got = np.asarray(vision_rope_angles(rc, head_dim=16, theta=10000.0))   # 4 frequencies per axis
  f = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
  np.testing.assert_allclose(got, [np.zeros(8), np.concatenate([2 * f, 5 * f])], rtol=1e-6)


def test_grouped_query_attention_equals_repeated_heads():
  from qwenvl_jax.nn.attention import cached_attention, dot_product_attention
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 3, 6, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2, 1, 3, 7)) > 0.3).at[..., 0].set(True)
  repeated = dot_product_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask)  # head h -> h // 3
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask), repeated, atol=1e-5)
  np.testing.assert_allclose(cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask), repeated, atol=1e-5)


def test_scatter_placeholders_in_order_with_offset():
  from qwenvl_jax.nn.vlm import scatter_placeholders
  ids = jnp.array([[1, 9, 9, 2], [9, 3, 9, 9]])
  feats = jnp.arange(10, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))
  got = np.asarray(scatter_placeholders(jnp.zeros((2, 4, 2)), ids, feats, 9, offset=4))[..., 0]
  np.testing.assert_array_equal(got, [[0, 4, 5, 0], [6, 0, 7, 8]])

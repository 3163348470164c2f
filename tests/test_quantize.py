"""Weight-only int8 through Qwix: which weights are quantized and how, the bytes, the logits and greedy tokens
against the float model for both fixture models (images in the prompts), the one-line refusals, the CLI flag. The
sharded int8 load is in test_sharding.py (8 fake devices), the bfloat16 comparison in bench/quantize.py."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from qwen2_tokenizer_fixture import build

import qwenvl_jax as qv
from qwenvl_jax.models import quantize as quantization
from qwenvl_jax.models import registry

VISION = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _case(folder):
  c = np.load(os.path.join(folder, "case_generate.npz"))
  return c["input_ids"], (c["attention_mask"] if "attention_mask" in c else None), {
      k: c[k] for k in VISION if k in c}


@pytest.fixture(scope="module", params=["qwen_vl", "qwen2_vl"])
def pair(request, fixture_dir, q2_dir):
  folder = fixture_dir if request.param == "qwen_vl" else q2_dir
  return folder, qv.load(folder, scan_layers=False), qv.load(folder, quantize="int8")


def test_every_linear_kernel_is_int8_with_per_channel_scales(pair):
  _, float_model, int8 = pair
  flat = flatten_dict(int8.params)
  kernels = {p: v for p, v in flat.items() if hasattr(v, "array")}
  assert kernels and all(p[-1] == "kernel" for p in kernels)
  for path, leaf in kernels.items():
    q, want = leaf.array, np.asarray(flatten_dict(float_model.params)[path])
    assert q.qvalue.dtype == np.int8 and q.qvalue.shape == want.shape
    assert np.abs(np.asarray(q.qvalue)).max() == 127  # absmax: each channel's largest weight maps to +-127
    # one scale per output channel: size 1 on the contracted axes, which a dense layer reads first
    kept = [d for d, n in enumerate(q.scale.shape) if n != 1]
    assert kept and all(q.scale.shape[d] == want.shape[d] for d in kept) and 0 not in kept
    np.testing.assert_allclose(np.asarray(q.qvalue) * np.asarray(q.scale), want, atol=np.asarray(q.scale).max())
  # the decoder's and vision tower's linear layers all quantize; the token embedding (a lookup) does not
  assert any(p[0] == "decoder" for p in kernels) and any(p[0] == "visual" for p in kernels)
  assert not any(p[0] == "wte" for p in kernels) and flat[("wte", "embedding")].dtype == np.float32
  assert int8.param_bytes() < 0.6 * float_model.param_bytes()


def test_int8_logits_and_greedy_tokens_follow_the_float_model(pair):
  folder, float_model, int8 = pair
  ids, mask, vision = _case(folder)
  a = np.asarray(float_model.logits(ids, mask, **vision))
  b = np.asarray(int8.logits(ids, mask, **vision))
  valid = (np.ones(ids.shape, bool) if mask is None else mask.astype(bool))
  dev = np.abs(a - b)[valid].max()
  assert 0 < dev < 0.15 * a[valid].std(), dev  # rounded, but by a fraction of the logits' spread
  new = 6
  np.testing.assert_array_equal(int8.generate(ids, mask, max_new_tokens=new, **vision),
                                float_model.generate(ids, mask, max_new_tokens=new, **vision))
  # quantizing a loaded float model gives the very same weights as quantizing while loading
  again = float_model.quantize("int8")
  np.testing.assert_array_equal(np.asarray(again.logits(ids, mask, **vision)), b)


def test_int8_bytes_are_half_of_bfloat16_where_the_linear_layers_dominate():
  """From shapes alone (what the memory plan counts): int8 kernels + bfloat16 scales against bfloat16."""
  cfg = registry.get_config("qwen2_vl_tiny", hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                            mrope_section=(8, 12, 12), vision={"hidden_size": 512}, scan_layers=False,
                            param_dtype="bfloat16", dtype="bfloat16")

  def nbytes(tree):
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  bf16 = nbytes(registry.family_of(cfg).abstract_params(cfg))
  int8 = nbytes(quantization.abstract_quantized(cfg, quantization.quantized_module(cfg)))
  assert 0.5 < int8 / bf16 < 0.56, int8 / bf16


def test_refusals(fixture_dir, pair):
  with pytest.raises(ValueError, match=r"quantize='int4': supported modes are \['int8'\]"):
    qv.load(fixture_dir, quantize="int4")
  with pytest.raises(ValueError, match="needs unrolled layers"):
    qv.load(fixture_dir, quantize="int8", scan_layers=True)
  _, _, int8 = pair
  with pytest.raises(ValueError, match="already quantized"):
    int8.quantize("int8")
  for call in (lambda: int8.save("/nonexistent/x"), lambda: qv.export_hf(int8, "/nonexistent/x")):
    with pytest.raises(ValueError, match="a int8 model cannot be (saved|exported)"):
      call()


def test_cli_quantize_flag(q2_dir, tmp_path, capsys, monkeypatch):
  import qwenvl_jax.infer.__main__ as cli
  folder = str(tmp_path / "model")
  shutil.copytree(q2_dir, folder)
  build(os.path.join(folder, "tokenizer.json"))
  seen = {}
  real = qv.load

  def spy(path, **kw):
    seen.update(kw)
    return real(path, **kw)
  monkeypatch.setattr(qv, "load", spy)
  img = os.path.join(folder, "img0.png")
  assert cli.main(["--checkpoint", folder, "--image", img, "--prompt", "Hi", "--max_new_tokens", "3",
                   "--quantize", "int8"]) == 0
  assert seen["quantize"] == "int8" and capsys.readouterr().out.strip() != ""
  with pytest.raises(SystemExit):
    cli.main(["--checkpoint", folder, "--prompt", "Hi", "--quantize", "int4"])

"""LoRA / Q-LoRA adapters (models/lora.py): the adapted model at initialisation is the base exactly, merging equals
the adapted forward, the adapters' gradients equal a hand-written reference on one layer, each family's default
targets, Q-LoRA's quantized base, and the one-line refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from qwenvl_jax.models import lora, registry
from qwenvl_jax.nn.layers import Dense
from qwenvl_jax.train.lora import LoraPlan, nbytes


def _forward(cfg, module, params):
  args, kw = registry.family_of(cfg).example_call(cfg)
  return np.asarray(jax.jit(lambda p: module.apply({"params": p}, *args, **kw))(params))


@pytest.fixture(scope="module")
def qwen_vl():
  cfg = registry.get_config("qwen_vl_tiny", scan_layers=False)
  base = jax.jit(lambda key: registry.family_of(cfg).init_params(cfg, key))(jax.random.key(0))
  return cfg, base, _forward(cfg, registry.family_of(cfg).module(cfg), base)


def _nonzero(adapters, seed=1):
  """Adapters with B moved off zero (as after some training)."""
  flat = flatten_dict(adapters)
  return {p: x + 0.02 * jax.random.normal(jax.random.key(seed + i), x.shape) for i, (p, x) in enumerate(flat.items())}


def test_fresh_adapters_leave_the_model_unchanged_and_merge_equals_the_adapted_forward(qwen_vl):
  cfg, base, want = qwen_vl
  spec = lora.LoraSpec(rank=8, alpha=16)
  adapters = lora.init_adapters(cfg, spec, jax.random.key(1))
  b = [x for p, x in flatten_dict(adapters).items() if p[-1] == "kernel_lora_b"]
  assert b and all(not np.any(np.asarray(x)) for x in b)
  module = lora.lora_module(cfg, spec)
  np.testing.assert_array_equal(_forward(cfg, module, lora.with_adapters(base, adapters)), want)  # bit for bit

  from flax.traverse_util import unflatten_dict
  moved = lora.with_adapters(base, unflatten_dict(_nonzero(adapters)))
  adapted = _forward(cfg, module, moved)
  assert np.abs(adapted - want).max() > 1e-2  # the adapters do act
  merged = lora.merge(moved, spec)
  assert not any(p[-1] in lora.SUFFIXES for p in flatten_dict(merged))
  np.testing.assert_allclose(_forward(cfg, registry.family_of(cfg).module(cfg), merged), adapted, atol=2e-5)
  # split undoes with_adapters
  got_base, got_adapters = lora.split(moved)
  assert set(flatten_dict(got_base)) == set(flatten_dict(base))
  assert set(flatten_dict(got_adapters)) == set(flatten_dict(adapters))


def test_adapter_gradients_equal_a_hand_written_reference():
  """y = x W + (x A) B * alpha / r on one Dense layer with a [D, H, Dh] kernel (as q/k/v): Qwix's adapter
  gradients of <y, g> against the closed form dA = s x^T (g B^T), dB = s (x A)^T g (dropout 0)."""
  import qwix
  layer = Dense(features=(3, 4), axes=("embed", "heads", "kv"), use_bias=False)
  x = jax.random.normal(jax.random.key(0), (5, 6))
  w = jax.random.normal(jax.random.key(1), (6, 3, 4))
  rank, alpha = 2, 6.0
  adapted = qwix.apply_lora_to_model(layer, qwix.LoraProvider(module_path=".*", rank=rank, alpha=alpha))
  shapes = jax.eval_shape(lambda: adapted.init(jax.random.key(0), x))["params"]
  assert nn.meta.unbox(shapes)["kernel_lora_a"].shape == (6, rank)
  a = jax.random.normal(jax.random.key(2), (6, rank))
  b = jax.random.normal(jax.random.key(3), nn.meta.unbox(shapes)["kernel_lora_b"].shape)
  g = jax.random.normal(jax.random.key(4), (5, 3, 4))

  def objective(ab):
    y = adapted.apply({"params": {"kernel": w, "kernel_lora_a": ab[0], "kernel_lora_b": ab[1]}}, x)
    return jnp.sum(y * g)
  da, db = jax.grad(objective)((a, b))
  s = alpha / rank
  g2 = g.reshape(5, 12)
  b2 = b.reshape(rank, 12)
  np.testing.assert_allclose(np.asarray(da), np.asarray(s * x.T @ (g2 @ b2.T)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(db).reshape(rank, 12), np.asarray(s * (x @ a).T @ g2), rtol=1e-5,
                             atol=1e-5)
  # and the forward is the formula
  y = adapted.apply({"params": {"kernel": w, "kernel_lora_a": a, "kernel_lora_b": b}}, x)
  np.testing.assert_allclose(np.asarray(y).reshape(5, 12), np.asarray(x @ w.reshape(6, 12) + s * (x @ a) @ b2),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, expected", [
    ("qwen_vl_tiny", {"attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/gate"}),  # no mlp/down (c_proj)
    ("qwen2_vl_tiny", {"attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/gate", "mlp/down"}),
    ("internvl_tiny", {"attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/gate", "mlp/down"}),
])
def test_default_targets_are_the_decoder_layers_of_the_official_recipes(name, expected):
  cfg = registry.get_config(name, scan_layers=False)
  shapes = lora.adapter_shapes(cfg, lora.LoraSpec(rank=4))
  layers = {"/".join(p[:-1]) for p in shapes}
  assert all(p.startswith("decoder/layers_") for p in layers)  # no ViT, adapter, embedding or LM head
  assert {"/".join(p.split("/")[2:]) for p in layers} == expected
  blocks = {p[1] for p in flatten_dict(registry.family_of(cfg).abstract_params(cfg)) if p[0] == "decoder"
            and p[1].startswith("layers_")}
  assert len(layers) == len(expected) * len(blocks)  # in every block


@pytest.mark.parametrize("mode, bound", [("int8", 0.03), ("nf4", 0.4)])
def test_qlora_quantizes_the_llm_blocks_and_trains_float_adapters(qwen_vl, mode, bound):
  cfg, base, want = qwen_vl
  from qwenvl_jax.sharding import make_mesh
  spec = lora.LoraSpec(rank=4, quantize=mode)
  plan = LoraPlan(cfg, spec, make_mesh(1, -1, 1))
  frozen = flatten_dict(plan.frozen(base))
  quantized = {"/".join(p) for p, x in frozen.items() if hasattr(x, "array")}
  assert quantized and all(p.startswith("decoder/layers_") for p in quantized)
  assert "decoder/layers_0/mlp/down/kernel" in quantized  # quantized though not adapted (Qwen-VL's c_proj)
  assert not any(p.startswith(("visual/", "resampler/", "lm_head")) for p in quantized)
  trained = plan.initial_trained(base, jax.random.key(1))
  assert {str(x.dtype) for x in jax.tree.leaves(trained)} == {"float32"}
  out = _forward(cfg, plan.module, lora.with_adapters(plan.part(frozen, False), trained))
  assert 0 < np.abs(out - want).max() < bound  # the rounding of the base only (B = 0)
  # values: 1 byte (int8) or half a byte (nf4, as packed on accelerators) per float32 weight, plus the scales
  fa = flatten_dict(plan.frozen_abstract()[0])
  floats = flatten_dict(registry.family_of(cfg).abstract_params(cfg))
  kernels = [p for p, x in fa.items() if hasattr(x, "array")]
  values = sum(nbytes(fa[p].array.qvalue) for p in kernels)
  assert values == sum(nbytes(floats[p]) for p in kernels) / (4 if mode == "int8" else 8)


def test_one_line_refusals(qwen_vl):
  cfg = qwen_vl[0]
  with pytest.raises(ValueError, match="match no linear layer; layers are e.g. decoder/layers_0"):
    lora.adapter_shapes(cfg, lora.LoraSpec(rank=4, targets=r"decoder/nothing"))
  with pytest.raises(ValueError, match="rank 300 exceeds the width of decoder/layers_0/attn/k"):
    lora.adapter_shapes(cfg, lora.LoraSpec(rank=300))
  with pytest.raises(ValueError, match="not a regular expression"):
    lora.adapter_shapes(cfg, lora.LoraSpec(rank=4, targets="(("))
  with pytest.raises(ValueError, match="quantize='int3'"):
    lora.lora_module(cfg, lora.LoraSpec(quantize="int3"))
  with pytest.raises(ValueError, match="rank >= 1"):
    lora.lora_module(cfg, lora.LoraSpec(rank=0))
  with pytest.raises(ValueError, match="unrolled layers"):
    lora.lora_module(cfg.replace(scan_layers=True), lora.LoraSpec())
  from qwenvl_jax.sharding import make_mesh
  with pytest.raises(ValueError, match="lora.trainable 'nothing' matches no parameter"):
    LoraPlan(cfg, lora.LoraSpec(rank=4), make_mesh(1, -1, 1), trainable="nothing")
  with pytest.raises(ValueError, match="matches quantized kernels"):
    LoraPlan(cfg, lora.LoraSpec(rank=4, quantize="int8"), make_mesh(1, -1, 1), trainable="decoder/layers_0/mlp")

"""AdamW chain of `qwenvl_jax.train.optimizer`: schedule, ViT layer-wise LR decay, freezing, weight-decay mask.

Parameters are random arrays shaped like a tiny model's (`abstract_params`: no model is run), so every test checks
the optimizer update numerically per parameter (and per layer slice for scanned ViT blocks).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwenvl_jax.models.qwen_vl import FAMILY
from qwenvl_jax.models.qwen_vl.config import QWEN_VL_TINY, param_groups
from qwenvl_jax.train.optimizer import make_optimizer, path_str, schedule

VIT_LAYERS = 3
DECAY = 0.95


def tiny_cfg(scan: bool):
  return QWEN_VL_TINY.replace(
      vocab_size=64, hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
      scan_layers=scan, visual=dict(image_size=28, width=16, layers=VIT_LAYERS, heads=2, mlp_ratio=2.0,
                                    output_dim=128, n_queries=4, pos_table_size=4, image_start_id=40))


GROUPS = param_groups(tiny_cfg(True))


def random_tree(tree, seed: int, low: float = 0.5, high: float = 2.0):
  """Same structure as `tree`, float32 values with random sign and magnitude in [low, high] (never near 0)."""
  rs = np.random.RandomState(seed)
  def one(x):
    mag = rs.uniform(low, high, x.shape).astype(np.float32)
    return jnp.asarray(np.where(rs.rand(*x.shape) < 0.5, -mag, mag))
  return jax.tree.map(one, tree)


def flat(tree) -> dict:
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unscanned"])
def params(request):
  return random_tree(FAMILY.abstract_params(tiny_cfg(request.param)), seed=0, low=0.01, high=0.1)


@pytest.fixture(scope="module")
def scanned_params():
  return random_tree(FAMILY.abstract_params(tiny_cfg(True)), seed=0, low=0.01, high=0.1)


def jit_update(tx):
  # Unoptimised XLA code compiles several times faster; these tests are about values, not speed.
  return jax.jit(tx.update, compiler_options={"xla_backend_optimization_level": 0})


def one_update(tx, params, grads):
  updates, _ = jit_update(tx)(grads, tx.init(params), params)
  return updates


# --- schedule ------------------------------------------------------------------------------------------------

def test_schedule_warmup_then_cosine():
  lr, min_lr, warm, total = 3e-4, 3e-5, 10, 110
  s = schedule(lr, min_lr, warm, total)
  assert float(s(0)) == 0.0
  for t in (1, 5, 9, 10):
    np.testing.assert_allclose(float(s(t)), lr * t / warm, rtol=1e-6)
  for t in (10, 11, 35, 60, 85, 109, 110):
    cos = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
    np.testing.assert_allclose(float(s(t)), cos, rtol=1e-5)
  np.testing.assert_allclose(float(s(60)), (lr + min_lr) / 2, rtol=1e-5)  # half way down the cosine
  np.testing.assert_allclose(float(s(total)), min_lr, rtol=1e-5)
  np.testing.assert_allclose(float(s(total + 50)), min_lr, rtol=1e-5)  # stays at min_lr afterwards
  values = np.array([float(s(t)) for t in range(total + 1)])
  assert np.all(np.diff(values[:warm + 1]) > 0) and np.all(np.diff(values[warm:]) < 0)


def test_schedule_without_warmup_starts_at_lr():
  s = schedule(1e-3, 0.0, 0, 100)
  np.testing.assert_allclose(float(s(0)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s(50)), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(float(s(100)), 0.0, atol=1e-9)


# --- layer-wise LR decay -------------------------------------------------------------------------------------

def test_layer_decay_effective_lr_per_parameter(params):
  lr = 1e-3
  tx, sched = make_optimizer(lr=lr, min_lr=lr / 10, warmup_steps=0, total_steps=100, weight_decay=0.0,
                             clip_norm=1e9, groups=GROUPS, layer_decay=DECAY)
  lr_t = float(sched(0))
  assert lr_t == pytest.approx(lr)
  grads = random_tree(params, seed=1)
  updates = flat(one_update(tx, params, grads))
  g = flat(grads)
  # Adam's first step: m_hat = g, v_hat = g^2, update = -lr_t * g / (|g| + eps) = -lr_t * sign(g) * (1 - ~1e-6).
  eff = {k: -updates[k] / np.sign(g[k]) for k in updates}
  embed_lr = lr * DECAY ** (VIT_LAYERS + 1)
  checked = {"block": set(), "embeddings": set(), "rest": set()}
  for path, e in eff.items():
    if path.startswith("visual/layers/"):  # scanned: leading layer axis, block i gets decay ** (L - i)
      assert e.shape[0] == VIT_LAYERS
      for i in range(VIT_LAYERS):
        np.testing.assert_allclose(e[i], lr * DECAY ** (VIT_LAYERS - i), rtol=1e-4, err_msg=f"{path}[{i}]")
        checked["block"].add(i)
    elif path.startswith("visual/layers_"):
      i = int(path.split("/")[1][len("layers_"):])
      np.testing.assert_allclose(e, lr * DECAY ** (VIT_LAYERS - i), rtol=1e-4, err_msg=path)
      checked["block"].add(i)
    elif path in ("visual/patch_embed", "visual/pos_embed") or path.startswith("visual/ln_pre/"):
      np.testing.assert_allclose(e, embed_lr, rtol=1e-4, err_msg=path)
      checked["embeddings"].add(path)
    else:
      assert not path.startswith("visual/"), f"unexpected ViT parameter {path}"
      np.testing.assert_allclose(e, lr, rtol=1e-4, err_msg=path)
      checked["rest"].add(path.split("/")[0])
  assert checked["block"] == set(range(VIT_LAYERS))
  assert checked["embeddings"] == {"visual/patch_embed", "visual/pos_embed", "visual/ln_pre/scale",
                                   "visual/ln_pre/bias"}
  assert checked["rest"] == {"wte", "decoder", "resampler", "lm_head"}
  # The block closest to the pixels decays most among blocks, but less than the embeddings.
  assert lr * DECAY ** VIT_LAYERS > embed_lr


def test_vision_lr_scale_multiplies_vit_and_adapter_only(params):
  lr, scale = 1e-3, 0.25
  tx, _ = make_optimizer(lr=lr, min_lr=lr, warmup_steps=0, total_steps=100, weight_decay=0.0, clip_norm=1e9,
                         groups=GROUPS, layer_decay=1.0, vision_lr_scale=scale)
  grads = random_tree(params, seed=2)
  updates, g = flat(one_update(tx, params, grads)), flat(grads)
  for path, u in updates.items():
    expected = lr * scale if path.startswith(("visual/", "resampler/")) else lr
    np.testing.assert_allclose(-u / np.sign(g[path]), expected, rtol=1e-4, err_msg=path)
  assert any(p.startswith("resampler/") for p in updates) and any(p.startswith("visual/") for p in updates)


def test_shapes_mix_option():
  from qwenvl_jax.train.config import parse_mix
  assert parse_mix("") is None
  assert parse_mix("caption=2, ocr=0.5") == {"caption": 2.0, "ocr": 0.5}
  for bad, message in [("caption", "not task=weight"), ("caption=x", "not task=weight"),
                       ("captions=1", "unknown shapes tasks"), ("caption=0", "at least one positive")]:
    with pytest.raises(ValueError, match=message):
      parse_mix(bad)


# --- freezing ------------------------------------------------------------------------------------------------

def adam_states(opt_state):
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]


def test_freezing_keeps_params_and_holds_no_state(params):
  freeze = (r"^(wte|decoder|lm_head)/", r"^resampler/pos_embed$")
  tx, _ = make_optimizer(lr=1e-3, min_lr=1e-4, warmup_steps=0, total_steps=10, weight_decay=0.1, clip_norm=1.0,
                         b1=0.9, groups=GROUPS, layer_decay=DECAY, freeze=freeze)
  state = tx.init(params)
  update = jit_update(tx)
  p, first_grads = params, None
  for step in range(3):
    grads = random_tree(params, seed=10 + step)
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
    if step == 0:
      first_grads, first_mu = flat(grads), flat(adam_states(state)[0].mu)
  before, after = flat(params), flat(p)
  frozen = {k for k in before if k.split("/")[0] in ("wte", "decoder", "lm_head") or k == "resampler/pos_embed"}
  assert {"wte/embedding", "lm_head/kernel", "decoder/ln_f/scale", "resampler/pos_embed"} <= frozen
  assert any(k.startswith("decoder/layers") for k in frozen)
  trainable = set(before) - frozen
  assert "resampler/query" in trainable and "visual/patch_embed" in trainable
  for k in frozen:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  for k in trainable:  # sign-like Adam steps of ~lr move every element
    assert np.all(after[k] != before[k]), k
  adam = adam_states(state)
  assert len(adam) == 1
  n_trainable = sum(before[k].size for k in trainable)
  assert sum(x.size for x in jax.tree.leaves(adam[0].mu)) == n_trainable
  assert sum(x.size for x in jax.tree.leaves(adam[0].nu)) == n_trainable
  # nothing else in the optimizer state is parameter-sized
  assert sum(x.size for x in jax.tree.leaves(state)) <= 2 * n_trainable + 16
  assert n_trainable < sum(x.size for x in before.values())
  # Clipping happens before Adam, over the trainable gradients only: after step 1, mu = (1 - b1) * g / |g|.
  assert set(first_mu) == trainable
  norm = math.sqrt(sum(float(np.sum(first_grads[k].astype(np.float64) ** 2)) for k in trainable))
  assert norm > 1.0
  for k in trainable:
    np.testing.assert_allclose(first_mu[k], 0.1 * first_grads[k] / norm, rtol=1e-5, err_msg=k)


def test_nothing_frozen_by_default(scanned_params):
  tx, _ = make_optimizer(lr=1e-3, min_lr=1e-4, warmup_steps=0, total_steps=10, groups=GROUPS)
  adam = adam_states(tx.init(scanned_params))
  n = sum(x.size for x in jax.tree.leaves(scanned_params))
  assert sum(x.size for x in jax.tree.leaves(adam[0].mu)) == n


# --- weight decay mask ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_decay", [1.0, DECAY])
def test_weight_decay_mask(scanned_params, layer_decay):
  lr, wd = 1e-2, 0.1
  tx, sched = make_optimizer(lr=lr, min_lr=0.0, warmup_steps=0, total_steps=100, weight_decay=wd,
                             groups=GROUPS, layer_decay=layer_decay)
  zeros = jax.tree.map(jnp.zeros_like, scanned_params)
  lr_t = float(sched(0))
  new = flat(optax.apply_updates(scanned_params, one_update(tx, scanned_params, zeros)))
  old = flat(scanned_params)
  no_decay = {k for k in old if k.endswith(("/bias", "/scale", "pos_embed"))}
  assert {"visual/pos_embed", "resampler/pos_embed", "decoder/ln_f/scale", "visual/ln_pre/bias",
          "visual/layers/attn/q/bias", "resampler/ln_q/scale"} <= no_decay
  decayed = set(old) - no_decay
  assert {"wte/embedding", "lm_head/kernel", "visual/patch_embed", "resampler/query", "resampler/proj",
          "visual/layers/mlp/fc1/kernel", "decoder/layers/mlp/up/kernel"} <= decayed
  for k in no_decay:
    np.testing.assert_array_equal(new[k], old[k], err_msg=k)
  for k in decayed:
    if k == "visual/patch_embed":
      mult = layer_decay ** (VIT_LAYERS + 1)
    elif k.startswith("visual/layers/"):
      mult = (layer_decay ** (VIT_LAYERS - np.arange(VIT_LAYERS))).reshape((-1,) + (1,) * (old[k].ndim - 1))
    else:
      mult = 1.0
    # decoupled decay: p <- p - lr_t * wd * p (times the parameter's layer-wise LR multiplier)
    expected = old[k].astype(np.float64) * (1 - lr_t * wd * mult)
    np.testing.assert_allclose(new[k], expected, rtol=2e-7, err_msg=k)
    assert np.all(np.abs(new[k]) < np.abs(old[k])), k


def test_clip_norm_0_turns_clipping_off_and_keeps_the_state_layout(scanned_params):
  """optax's clip_by_global_norm(0) would scale every update to 0 (a run that silently learns nothing): 0 means no
  clipping, with the same optimizer state layout as clipping (a run may resume with either); negative is refused."""
  def tx(clip):
    return make_optimizer(lr=1e-3, min_lr=1e-3, warmup_steps=0, total_steps=10, groups=GROUPS, clip_norm=clip)[0]
  grads = random_tree(scanned_params, seed=3)
  off, unclipped = flat(one_update(tx(0.0), scanned_params, grads)), flat(one_update(tx(1e9), scanned_params, grads))
  assert all(np.abs(u).max() > 0 for u in off.values())
  for path in off:
    np.testing.assert_array_equal(off[path], unclipped[path], err_msg=path)
  assert jax.tree.structure(tx(0.0).init(scanned_params)) == jax.tree.structure(tx(1.0).init(scanned_params))
  with pytest.raises(ValueError, match="clip_norm -1.0: >= 0"):
    tx(-1.0)

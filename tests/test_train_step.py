"""Chunked loss, next-token targets, the train step (accumulation, NaN guard, z-loss, per-task sums) and its FLOPs.

The train step runs a tiny Qwen-VL (1 ViT block on 28x28 images, 1 decoder layer) on packed batches laid out as the
data pipeline emits them. Its optimizer is SGD with momentum: after one step from a zero state the momentum trace
is exactly the gradient the step computed, so gradients are compared directly.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

from qwenvl_jax.models.qwen_vl import FAMILY
from qwenvl_jax.models.qwen_vl.config import QWEN_VL_TINY
from qwenvl_jax.models.qwen_vl.model import QwenVL
from qwenvl_jax.train.loss import chunked_token_losses, next_token_targets
from qwenvl_jax.train.optimizer import path_str, schedule
from qwenvl_jax.train.step import StepOptions, TrainState, flops_per_step, train_step

# Unoptimised XLA code compiles several times faster on the CPU; the tests check values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

CFG = QWEN_VL_TINY.replace(
    vocab_size=64, hidden_size=128, num_attention_heads=2, num_hidden_layers=1, intermediate_size=128,
    visual=dict(image_size=28, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=128, n_queries=4,
                pos_table_size=4, image_start_id=40))
IMG, IMG_END, IMG_PAD = CFG.visual.image_start_id, CFG.visual.image_end_id, CFG.visual.image_pad_id
B, L, M = 4, 30, 2      # rows, sequence length, image slots per row
LOSS_CHUNK = 8          # 30 is not a multiple: the last chunk is padded
NUM_TASKS = 3
LR = 0.5


def flat(tree) -> dict:
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def random_params(seed=0):
  rs = np.random.RandomState(seed)
  def one(path, x):
    name = path_str(path)
    if name.endswith("/scale"):
      return jnp.asarray(1 + 0.1 * rs.randn(*x.shape), jnp.float32)
    return jnp.asarray(0.1 * rs.randn(*x.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(one, FAMILY.abstract_params(CFG))


# (image?, prompt tokens, answer tokens, task id) per packed sample; the rest of a row is padding.
ROWS = [
    [(True, 3, 4, 1), (False, 2, 5, 2)],
    [(True, 2, 3, 3), (True, 1, 3, 1), (False, 2, 2, 2)],
    [(False, 4, 10, 2), (True, 3, 3, 3)],
    [(True, 5, 6, 1)],
]


def make_batch(seed=0) -> dict:
  """A packed batch as `qwenvl_jax.data.pipeline` emits it: <img> + n_queries <imgpad> + </img> spans, positions
  restarting per sample, loss_mask on answers, segment 0 = padding, unused image slots all zeros."""
  rs = np.random.RandomState(seed)
  out = {k: np.zeros((B, L), np.int32) for k in ("input_ids", "segment_ids", "positions", "loss_mask", "task_ids")}
  out["pixel_values"] = np.zeros((B, M, 3, CFG.visual.image_size, CFG.visual.image_size), np.float32)
  out["image_mask"] = np.zeros((B, M), bool)
  for b, row in enumerate(ROWS):
    t = n_img = 0
    for s, (image, n_prompt, n_answer, task) in enumerate(row, start=1):
      ids = [IMG] + [IMG_PAD] * CFG.visual.n_queries + [IMG_END] if image else []
      ids += list(rs.randint(1, IMG, n_prompt + n_answer))
      mask = [0] * (len(ids) - n_answer) + [1] * n_answer
      n = len(ids)
      out["input_ids"][b, t:t + n] = ids
      out["loss_mask"][b, t:t + n] = mask
      out["segment_ids"][b, t:t + n] = s
      out["positions"][b, t:t + n] = np.arange(n)
      out["task_ids"][b, t:t + n] = task
      if image:
        out["pixel_values"][b, n_img] = rs.randn(3, CFG.visual.image_size, CFG.visual.image_size)
        out["image_mask"][b, n_img] = True
        n_img += 1
      t += n
    assert t <= L and n_img <= M
  return out


def reference_losses(hidden, kernel, batch):
  """Independent float64 numpy computation: per-token CE, log-partition and weights of next-token prediction."""
  logits = np.einsum("bsd,dv->bsv", np.asarray(hidden, np.float64), np.asarray(kernel, np.float64))
  mx = logits.max(-1, keepdims=True)
  lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
  ids, seg, lm = batch["input_ids"], batch["segment_ids"], batch["loss_mask"]
  ce, w = np.zeros(ids.shape), np.zeros(ids.shape)
  for b in range(ids.shape[0]):
    for t in range(ids.shape[1] - 1):
      ce[b, t] = lse[b, t] - logits[b, t, ids[b, t + 1]]
      w[b, t] = float(seg[b, t] > 0 and seg[b, t + 1] == seg[b, t] and lm[b, t + 1] > 0)
  probs = np.exp(logits - lse[..., None])
  return ce, lse, w, probs


# --- chunked loss and targets --------------------------------------------------------------------------------

def test_chunked_losses_match_full_logits():
  """Sequence 13 in chunks of 5 (last chunk padded), 13 (one chunk) and 64 (clamped to 13): values and gradients
  of a weighted CE + lse^2 objective wrt hidden and kernel equal those of full [B, S, V] logits."""
  rs = np.random.RandomState(0)
  b, s, d, v = 2, 13, 16, 37
  hidden = jnp.asarray(rs.randn(b, s, d), jnp.float32)
  kernel = jnp.asarray(rs.randn(d, v) * 0.5, jnp.float32)
  targets = jnp.asarray(rs.randint(0, v, (b, s)), jnp.int32)
  w = jnp.asarray(rs.rand(b, s), jnp.float32)

  def direct(h, k):
    logits = jnp.einsum("bsd,dv->bsv", h, k, precision=jax.lax.Precision.HIGHEST)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse

  def objective(fn):
    def f(h, k):
      ce, lse = fn(h, k)
      return jnp.sum(ce * w) + 0.3 * jnp.sum(jnp.square(lse) * w)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)), compiler_options=FAST_COMPILE)

  ce_ref, lse_ref = direct(hidden, kernel)
  val_ref, (gh_ref, gk_ref) = objective(direct)(hidden, kernel)
  for chunk in (5, 13, 64):
    ce, lse = chunked_token_losses(hidden, kernel, targets, chunk)
    assert ce.shape == lse.shape == (b, s) and ce.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5, err_msg=f"chunk {chunk}")
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5, err_msg=f"chunk {chunk}")
    val, (gh, gk) = objective(lambda h, k, c=chunk: chunked_token_losses(h, k, targets, c))(hidden, kernel)
    np.testing.assert_allclose(val, val_ref, rtol=1e-5, err_msg=f"chunk {chunk}")
    np.testing.assert_allclose(gh, gh_ref, rtol=1e-4, atol=1e-5, err_msg=f"chunk {chunk}")
    np.testing.assert_allclose(gk, gk_ref, rtol=1e-4, atol=1e-5, err_msg=f"chunk {chunk}")


def test_next_token_targets_weights():
  ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12],
                  [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
  seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0],
                  [3, 3, 3, 3, 3, 3, 3, 3]], np.int32)
  lm = np.array([[1, 1, 1, 1, 0, 1, 1, 1],   # padding carries loss_mask 1: must still get weight 0
                 [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
  targets, weights = next_token_targets(jnp.asarray(ids), jnp.asarray(lm), jnp.asarray(seg))
  np.testing.assert_array_equal(targets[:, :-1], ids[:, 1:])
  assert weights.dtype == jnp.float32
  np.testing.assert_array_equal(weights, [
      # t=2: next token is in segment 2 (boundary); t=3: next token has loss_mask 0; t=5: next is padding;
      # t=6, 7: padding; row 1, t=7: last position has no next token.
      [1, 1, 0, 0, 1, 0, 0, 0],
      [1, 1, 1, 1, 1, 1, 1, 0]])


def test_next_token_targets_first_token_of_next_sample_not_predicted():
  """Loss mask on every token of two packed samples: only within-sample predictions count."""
  ids = jnp.arange(1, 7, dtype=jnp.int32)[None]
  seg = jnp.array([[1, 1, 1, 2, 2, 2]], jnp.int32)
  _, w = next_token_targets(ids, jnp.ones_like(ids), seg)
  np.testing.assert_array_equal(w, [[1, 1, 0, 1, 1, 0]])


# --- train step ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
  params = random_params()
  tx = optax.sgd(LR, momentum=0.9)
  sched = schedule(LR, 0.0, 2, 10)
  state = TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  model = QwenVL(CFG)
  cache = {}

  def step(**kw):
    opts = StepOptions(**{"loss_chunk": LOSS_CHUNK, "num_tasks": NUM_TASKS, **kw})
    if opts not in cache:
      cache[opts] = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, schedule=sched, opts=opts),
                            compiler_options=FAST_COMPILE)
    return cache[opts]

  batch = make_batch()
  hidden_cache = []

  def hidden():
    """Final hidden states (after ln_f) of the batch under the initial params, computed once."""
    if not hidden_cache:
      fwd = jax.jit(lambda p, b: model.apply(
          {"params": p}, b["input_ids"], attention_mask=b["segment_ids"] > 0, positions=b["positions"],
          segment_ids=b["segment_ids"], pixel_values=b["pixel_values"], inference=False, return_hidden=True),
          compiler_options=FAST_COMPILE)
      hidden_cache.append(np.asarray(fwd(params, batch)))
    return hidden_cache[0]

  # The variants compiled here are shared by the tests below (each compile takes seconds on the CPU).
  guarded = step(skip_nonfinite=True)
  new, metrics = guarded(state, batch)
  return dict(params=params, state=state, hidden=hidden, sched=sched, step=step, batch=batch,
              new=new, metrics=jax.device_get(metrics))


def grads_of(new_state) -> dict:
  """The gradient of a step taken from a zero momentum state (sgd trace after one step = g)."""
  return flat(new_state.opt_state[0].trace)


def test_train_step_loss_and_task_sums_match_reference(setup):
  batch, params, m = setup["batch"], setup["params"], setup["metrics"]
  hidden = setup["hidden"]()
  ce, _, w, _ = reference_losses(hidden, params["lm_head"]["kernel"], batch)
  n = w.sum()
  assert n == sum(a for row in ROWS for (_, _, a, _) in row)  # every answer token is predicted once
  assert m["supervised_tokens"] == n
  assert m["tokens"] == (batch["segment_ids"] > 0).sum()
  assert bool(m["finite"])
  np.testing.assert_allclose(m["loss"], (ce * w).sum() / n, rtol=1e-5)
  assert 2.0 < m["loss"] < 10.0
  np.testing.assert_allclose(m["lr"], float(setup["sched"](3)), rtol=1e-6)
  np.testing.assert_allclose(m["grad_norm"], math.sqrt(sum((g.astype(np.float64) ** 2).sum()
                                                           for g in grads_of(setup["new"]).values())), rtol=1e-5)
  # Per-task sums: task k collects the tokens of its samples; together they are the whole loss.
  assert m["task_loss_sum"].shape == m["task_tokens"].shape == (NUM_TASKS,)
  for k in range(1, NUM_TASKS + 1):
    sel = w * (batch["task_ids"] == k)
    assert sel.sum() > 0
    np.testing.assert_allclose(m["task_tokens"][k - 1], sel.sum())
    np.testing.assert_allclose(m["task_loss_sum"][k - 1], (ce * sel).sum(), rtol=1e-5)
  np.testing.assert_allclose(m["task_loss_sum"].sum(), m["loss"] * m["supervised_tokens"], rtol=1e-5)
  np.testing.assert_allclose(m["task_tokens"].sum(), m["supervised_tokens"])


def test_train_step_applies_the_update(setup):
  new, state = setup["new"], setup["state"]
  assert int(new.step) == int(state.step) + 1
  np.testing.assert_array_equal(new.rng, state.rng)
  g, p0, p1 = grads_of(new), flat(state.params), flat(new.params)
  assert set(g) == set(p0)
  for k in p0:
    np.testing.assert_allclose(p1[k], p0[k] - LR * g[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # every part of the model is trained by this batch (images included)
  for k in ("visual/patch_embed", "visual/layers/mlp/fc1/kernel", "resampler/query", "wte/embedding",
            "decoder/layers/mlp/up/kernel", "lm_head/kernel"):
    assert np.abs(g[k]).max() > 0, k


def test_grad_accum_matches_single_batch(setup):
  """grad_accum=2 splits the 4 rows into 2 micro-batches. float32 tolerances (summation order differs): loss to
  rtol 1e-6; gradients elementwise to rtol 1e-4 + atol 2e-6 x the largest gradient of the model (observed: <= 7e-7
  x; attention key biases have mathematically zero gradients, ~1e-9 of noise), new params likewise x LR."""
  one, m1 = setup["new"], setup["metrics"]
  two, m2 = setup["step"](grad_accum=2, skip_nonfinite=True)(setup["state"], setup["batch"])
  m2 = jax.device_get(m2)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  for k in ("supervised_tokens", "tokens", "task_tokens"):
    np.testing.assert_array_equal(m2[k], m1[k])
  np.testing.assert_allclose(m2["task_loss_sum"], m1["task_loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  g1, g2 = grads_of(one), grads_of(two)
  p1, p2 = flat(one.params), flat(two.params)
  scale = max(np.abs(g).max() for g in g1.values())
  for k in g1:
    np.testing.assert_allclose(g2[k], g1[k], rtol=1e-4, atol=2e-6 * scale, err_msg=k)
    np.testing.assert_allclose(p2[k], p1[k], rtol=1e-4, atol=2e-6 * scale * LR, err_msg=k)
  assert int(two.step) == int(one.step)


def test_nonfinite_step_is_skipped(setup):
  guarded, batch = setup["step"](skip_nonfinite=True), setup["batch"]
  good = setup["new"]   # a state with a nonzero momentum trace
  bad = dict(batch, pixel_values=batch["pixel_values"].copy())
  bad["pixel_values"][1, 1, 0, 3, 5] = np.nan  # one pixel of one real image
  cases = {"nan pixel": (good, bad)}
  params = dict(good.params, lm_head={"kernel": good.params["lm_head"]["kernel"].at[3, 7].set(jnp.nan)})
  cases["nan param"] = (good.replace(params=params), batch)
  # A NaN image in a slot no <img> span uses: the loss is finite, but 0 * NaN makes the ViT gradients NaN.
  unused = dict(batch, pixel_values=batch["pixel_values"].copy())
  assert not batch["image_mask"][0, 1]
  unused["pixel_values"][0, 1] = np.nan
  cases["nan gradient only"] = (good, unused)
  for name, (before, b) in cases.items():
    after, m = guarded(before, b)
    assert not bool(m["finite"]), name
    assert np.isfinite(m["loss"]) == (name == "nan gradient only"), name
    assert not np.isfinite(m["grad_norm"]), name
    assert int(after.step) == int(before.step) + 1, name
    for x, y in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params,
                                                                                         after.opt_state))):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=name)  # NaN == NaN here
  # the guard does not block good steps
  after, m = guarded(good, batch)
  assert bool(m["finite"])
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(good.params), jax.tree.leaves(after.params)))


def test_z_loss_changes_gradients_not_reported_loss(setup):
  """With z_loss the objective adds z * sum(w * lse^2); the reported loss stays the mean cross-entropy. The z
  term's gradient wrt lm_head is z/n * sum_t w_t * 2 lse_t * h_t softmax_t^T (hidden does not depend on lm_head).
  This variant also runs with skip_nonfinite=False, whose NaN behaviour is checked below."""
  z = 0.05
  state, batch, params = setup["state"], setup["batch"], setup["params"]
  new_z, mz = setup["step"](z_loss=z)(state, batch)
  mz, m = jax.device_get(mz), setup["metrics"]
  np.testing.assert_allclose(mz["loss"], m["loss"], rtol=1e-6)
  np.testing.assert_allclose(mz["task_loss_sum"], m["task_loss_sum"], rtol=1e-5)
  assert abs(mz["grad_norm"] - m["grad_norm"]) > 1e-3 * m["grad_norm"]
  gz, g = grads_of(new_z), grads_of(setup["new"])
  hidden = setup["hidden"]()
  _, lse, w, probs = reference_losses(hidden, params["lm_head"]["kernel"], batch)
  dz = z / w.sum() * np.einsum("bs,bsd,bsv->dv", 2 * w * lse, np.asarray(hidden, np.float64), probs)
  k = "lm_head/kernel"
  np.testing.assert_allclose(gz[k] - g[k], dz, rtol=1e-3, atol=1e-3 * np.abs(dz).max())
  assert np.abs(dz).max() > 1e-2 * np.abs(g[k]).max()


def test_nonfinite_without_guard_is_applied(setup):
  bad = dict(setup["batch"], pixel_values=setup["batch"]["pixel_values"].copy())
  bad["pixel_values"][0, 0, 2, 0, 0] = np.nan
  after, m = setup["step"](z_loss=0.05)(setup["state"], bad)  # skip_nonfinite=False (shares the z-loss compile)
  assert not bool(m["finite"])
  assert not np.isfinite(m["loss"])
  assert np.isnan(np.asarray(after.params["lm_head"]["kernel"])).all()


# --- FLOPs ---------------------------------------------------------------------------------------------------

def dot_flops(jaxpr, mult: int = 1) -> int:
  """2 x MACs of every dot_general in a jaxpr (scan bodies times their length, nested jaxprs included)."""
  total = 0
  for e in jaxpr.eqns:
    assert e.primitive.name not in ("conv_general_dilated", "while"), e.primitive.name
    if e.primitive.name == "dot_general":
      (contract, _), _ = e.params["dimension_numbers"]
      lhs = e.invars[0].aval.shape
      total += mult * 2 * math.prod(e.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    n = e.params["length"] if e.primitive.name == "scan" else 1
    for v in e.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += dot_flops(sub.jaxpr, mult * n)
        elif isinstance(sub, jex_core.Jaxpr):
          total += dot_flops(sub, mult * n)
  return total


FLOPS_CFG = QWEN_VL_TINY.replace(
    vocab_size=64, hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=96,
    visual=dict(image_size=28, width=32, layers=2, heads=2, mlp_ratio=3.0, output_dim=128, n_queries=4,
                pos_table_size=4, image_start_id=40))


def test_flops_hand_count():
  c = FLOPS_CFG
  d, f, v, nl = 128, 48, 64, 2            # hidden, MLP width (intermediate_size // 2), vocab, layers
  p, w, mv, q, patch = 4, 32, 96, 4, 14   # patches (28/14)^2, ViT width, ViT MLP width, queries, patch size
  b, s, n = 3, 16, 5
  per_token_layer = 4 * 2 * d * d + 3 * 2 * d * f + 2 * s * d   # q/k/v/o, gate/up/down, causal attention
  text = b * s * (nl * per_token_layer + 2 * d * v)
  per_image = (2 * p * 3 * patch * patch * w                    # patch embedding
               + 2 * (4 * 2 * p * w * w + 2 * 2 * p * w * mv + 2 * 2 * p * p * w)  # 2 ViT blocks
               + 2 * p * w * d + 2 * 2 * p * d * d + 3 * 2 * q * d * d + 2 * 2 * q * p * d)  # resampler
  assert flops_per_step(c, b, s, n) == 3 * (text + n * per_image)
  assert flops_per_step(c, b, s, 0) == 3 * text
  doubled = c.replace(num_hidden_layers=4)
  assert flops_per_step(doubled, b, s, n) - flops_per_step(c, b, s, n) == 3 * b * s * nl * per_token_layer
  assert flops_per_step(c, 2 * b, s, 0) == 2 * flops_per_step(c, b, s, 0)


def test_flops_match_traced_matmuls():
  """3 x the dot_general FLOPs of the traced forward, except that the model computes full S x S decoder attention
  (2 x 2*S*S*D per layer and row) where the count takes the causal half."""
  c = FLOPS_CFG
  b, s, n = 2, 16, 3
  model = QwenVL(c)
  ap = FAMILY.abstract_params(c)
  ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
  pix = jax.ShapeDtypeStruct((n, 3, 28, 28), jnp.float32)
  with_images = dot_flops(jax.make_jaxpr(
      lambda prm, i, x: model.apply({"params": prm}, i, pixel_values=x, inference=False))(ap, ids, pix).jaxpr)
  text_only = dot_flops(jax.make_jaxpr(lambda prm, i: model.apply({"params": prm}, i, inference=False))(ap, ids).jaxpr)
  full_minus_causal = c.num_hidden_layers * b * 2 * s * s * c.hidden_size
  assert flops_per_step(c, b, s, 0) == 3 * (text_only - full_minus_causal)
  assert flops_per_step(c, b, s, n) == 3 * (with_images - full_minus_causal)


def test_flops_follow_the_resolution_the_stage_feeds():
  """Stage 1 feeds 224 px images into the 448 px model: the FLOP count (and so MFU) takes the patches per image
  from the stage's processor, not from the model config (reading the model's 448 px overstated stage-1 MFU ~2.7x)."""
  import importlib.util

  from qwenvl_jax.models.qwen_vl.config import QWEN_VL_7B
  from qwenvl_jax.models.qwen_vl.processor import QwenVLProcessor
  from qwenvl_jax.train.loop import processor_for

  path = os.path.join(os.path.dirname(__file__), "..", "configs", "stage1_pretrain.py")
  spec = importlib.util.spec_from_file_location("stage1", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  proc = processor_for(c, QWEN_VL_7B)
  assert (proc.image_size, proc.patches_per_image, proc.tokens_per_image) == (224, 256, 256)
  b, s, n = c.data.batch_size, c.data.seq_len, c.data.batch_size * c.data.max_images
  at_448 = flops_per_step(QWEN_VL_7B, b, s, n)
  at_224 = flops_per_step(QWEN_VL_7B, b, s, n, proc)
  assert at_448 == flops_per_step(QWEN_VL_7B, b, s, n, QwenVLProcessor.for_config(QWEN_VL_7B))
  assert 2.6 < at_448 / at_224 < 2.7
  text = flops_per_step(QWEN_VL_7B, b, s, 0)
  # the vision part scales with the patches: ViT blocks (linear in P, plus P^2 attention) and resampler
  assert (at_224 - text) < (at_448 - text) / 4

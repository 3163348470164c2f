"""The contrastive alignment stage's pieces: CLIP and SigLIP losses against their formulas, gradients reaching both
towers and the temperature in every family, negatives from the whole batch on a 4-device mesh, the retrieval and
zero-shot metrics, the image-text pair pipeline."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.models import registry
from qwenvl_jax.train import contrastive as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_clip_loss_is_the_symmetric_infonce_formula():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(5, 8)))
  logits = 7.0 * img @ txt.T
  want = -(np.trace(_log_softmax(logits, 1)) + np.trace(_log_softmax(logits, 0))) / (2 * 5)
  assert abs(float(C.clip_loss(jnp.asarray(img), jnp.asarray(txt), 7.0)) - want) < 1e-5
  # matched embeddings and a large scale drive it to 0; swapping two partners raises it
  assert float(C.clip_loss(jnp.asarray(img), jnp.asarray(img), 100.0)) < 0.1 < float(
      C.clip_loss(jnp.asarray(img), jnp.asarray(img[[1, 0, 2, 3, 4]]), 100.0))


def test_siglip_loss_is_the_sigmoid_formula():
  rng = np.random.default_rng(1)
  img, txt = _unit(rng.normal(size=(4, 8))), _unit(rng.normal(size=(4, 8)))
  logits = 10.0 * img @ txt.T - 10.0
  z = 2 * np.eye(4) - 1
  want = np.sum(np.log1p(np.exp(-z * logits))) / 4
  assert abs(float(C.siglip_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, -10.0)) - want) < 1e-4


@pytest.mark.parametrize("name, loss", [("qwen2_vl_tiny", "siglip"), ("internvl_tiny", "clip")])
def test_gradients_reach_both_towers_and_the_temperature(name, loss):
  """(Qwen-VL's towers: tests/test_contrastive_train.py trains them.)"""
  cfg = registry.get_config(name)
  fam = registry.family_of(cfg)
  rng = np.random.default_rng(2)
  images = [Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)) for _ in range(3)]
  arrays = [fam.inputs.contrastive_image(cfg, fam.processor(cfg), im, 56) for im in images]
  batch = {"image/" + k: jnp.stack([a[k] for a in arrays]) for k in arrays[0]}
  batch.update(text_ids=jnp.asarray(rng.integers(0, 200, (3, 5)), jnp.int32),
               text_mask=jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], jnp.int32))
  model, groups = fam.module(cfg), fam.param_groups(cfg)
  head = C.ContrastiveHead(C.ContrastiveSpec(loss=loss, embed_dim=8))
  params = {**fam.init_params(cfg, jax.random.key(0)),
            "contrastive": C.init_head(head, cfg.vit.width, cfg.decoder.hidden, jax.random.key(1))}
  grads = jax.jit(jax.grad(lambda p: C.contrastive_loss(model, head, p, batch)))(params)
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): float(jnp.abs(g).sum())
          for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  reached = {groups.group_of(p) for p, g in flat.items() if g > 0}
  assert {"vision", "llm"} <= reached, reached
  assert flat["contrastive/logit_scale"] > 0 and flat["contrastive/img_proj/kernel"] > 0
  assert flat["contrastive/txt_proj/kernel"] > 0
  assert sum(g for p, g in flat.items() if groups.group_of(p) == "adapter") == 0  # the connector is not used
  if loss == "siglip":
    assert flat["contrastive/logit_bias"] > 0


def test_negatives_come_from_the_whole_batch_on_a_4_device_mesh():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "contrastive_mesh.py")], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  for loss, v in got.items():
    assert v["row_shards"] == 4
    assert abs(v["sharded"] - v["single"]) < 1e-5, (loss, v)
    assert abs(v["local_only"] - v["single"]) > 1e-3, (loss, v)  # fewer negatives would be another loss


def test_retrieval_counts_repeated_captions_as_hits_and_gives_chance():
  img = np.eye(4)
  txt = np.eye(4)[[0, 1, 3, 2]]  # texts 2 and 3 swapped
  captions = ["a", "b", "c", "d"]
  r = C.retrieval_recall(img, txt, captions, ks=(1,))
  assert r["i2t_recall@1"] == r["t2i_recall@1"] == 0.5 and r["chance@1"] == 0.25
  r = C.retrieval_recall(img, txt, ["a", "b", "c", "c"], ks=(1,))  # the swapped pair shares its caption
  assert r["i2t_recall@1"] == 1.0 and abs(r["chance@1"] - (0.25 + 0.25 + 0.5 + 0.5) / 4) < 1e-9
  assert C.zero_shot_accuracy(np.eye(3), np.eye(3)[[1, 0, 2]], np.array([1, 0, 0])) == 2 / 3


def test_pair_pipeline_rows(tmp_path):
  from qwenvl_jax.data.pairs import PairEncoder, build_pair_dataset
  from qwenvl_jax.data.pipeline import DataConfig
  from qwenvl_jax.data.shapes import ShapesSource, train_tokenizer
  from qwenvl_jax.data.tokenizer import load_tokenizer
  cfg = registry.get_config("qwen_vl_tiny")
  fam = registry.family_of(cfg)
  train_tokenizer(str(tmp_path / "tok"), vocab_size=1024, image_span=16)
  tok = load_tokenizer(str(tmp_path / "tok.model"), image_span=16)
  dc = DataConfig(batch_size=4, num_threads=1)
  image_fn = functools.partial(fam.inputs.contrastive_image, cfg, fam.processor(cfg), size=56)
  enc = PairEncoder(tok, dc, image_fn, text_len=8)
  src = ShapesSource("train", 30, mix={"caption": 1, "multi_image": 1, "text": 1})
  it = iter(build_pair_dataset(src, enc, dc, num_epochs=1, shuffle=False))
  b = next(it)
  assert b["image/pixel_values"].shape == (4, 3, 56, 56) and b["text_ids"].shape == b["text_mask"].shape == (4, 8)
  lengths = b["text_mask"].sum(1)
  assert all(b["text_ids"][i, lengths[i] - 1] == tok.eod_id for i in range(4))
  pairs = [r for r in (src[i] for i in range(30)) if r["task"] == "caption"]
  want = tok.encode(pairs[0]["conversations"][-1]["value"], allowed_special=())
  assert b["text_ids"][0, :min(len(want), 7)].tolist() == want[:7]
  list(it)
  assert enc.counts["ok"] == len(pairs) and enc.counts["not_a_pair"] == 30 - len(pairs)


def test_internvit_drop_path_is_stochastic_depth_in_training_only():
  """drop_path_rate: each sample's branches are dropped (scaled by 1/keep when kept) with InternViT's per-block
  rates (0 for the first block); inference and a rate of 0 are deterministic, and the contrastive step passes a
  fresh rng each step."""
  cfg = registry.get_config("internvl_tiny").replace(vision={"drop_path_rate": 0.5})
  fam = registry.family_of(cfg)
  model = fam.module(cfg)
  params = fam.init_params(cfg, jax.random.key(0))
  pixels = jnp.asarray(np.random.default_rng(3).normal(size=(16, 3, 56, 56)), jnp.float32)
  infer = model.apply({"params": params}, pixels, method="pooled_vit")
  same = model.apply({"params": params}, pixels, method="pooled_vit", deterministic=True)
  np.testing.assert_array_equal(infer, same)

  def train(seed):
    return model.apply({"params": params}, pixels, method="pooled_vit", deterministic=False,
                       rngs={"dropout": jax.random.key(seed)})
  a, b = train(1), train(2)
  assert not np.allclose(a, infer) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, train(1))  # the rng decides
  # per sample, not per token: a sample whose branches were all kept differs from inference only by the 1/keep scale
  assert (np.abs(np.asarray(a) - np.asarray(infer)).max(axis=1) > 1e-6).sum() >= 8
  rate0 = registry.get_config("internvl_tiny")
  model0 = fam.module(rate0)
  np.testing.assert_array_equal(model0.apply({"params": params}, pixels, method="pooled_vit", deterministic=False,
                                             rngs={"dropout": jax.random.key(1)}), infer)

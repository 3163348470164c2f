"""train.py in contrastive mode (configs/contrastive_demo.py's stage, tiny): a run interrupted by SIGTERM resumes
bit-identically (losses, parameters, optimizer state, temperature); eval.py scores the workdir zero-shot; a
generative stage's init reads the workdir's vision tower and LLM, the contrastive head left behind."""

import os
import subprocess
import sys

import numpy as np
import pytest
from train_runs import ROOT, assert_identical, describe, load_state, metrics, subtree, train

CONFIG = '''
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.mode = "contrastive"
  c.contrastive.update(loss="clip", embed_dim=32, text_len=12)
  c.model.name = "qwen_vl_demo"
  c.model.dtype = "float32"
  c.data.update(source="shapes", tokenizer="shapes", image_size=56, batch_size=8, num_records=200, mix="caption=1")
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=6, layer_decay=1.0, freeze=())
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=3, keep=3)
  c.log.update(every=1, progress=False)
  c.peak_flops = 1e12
  return c
'''
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
  d = tmp_path_factory.mktemp("contrastive")
  cfg = d / "contrastive.py"
  cfg.write_text(CONFIG)
  full = train(env, f"--config={cfg}", f"--workdir={d / 'full'}")
  assert full.returncode == 0, describe(full)
  part = subprocess.run([sys.executable, WORKER, "data=4", f"--config={cfg}", f"--workdir={d / 'part'}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert part.returncode == 0 and "saved step 4" in part.stdout, describe(part)
  resumed = train(env, f"--config={cfg}", f"--workdir={d / 'part'}")
  assert resumed.returncode == 0 and "resumed from step 4" in resumed.stdout, describe(resumed)
  return d, cfg, full


@pytest.mark.slow
def test_resume_is_bitwise_exact_and_the_head_is_trained(runs):
  d, _, full = runs
  assert "logit_scale" in full.stdout
  a, b = metrics(d / "full"), metrics(d / "part")
  assert [m["step"] for m in a] == list(range(1, 7)) and [m["last_loss"] for m in a] == [m["last_loss"] for m in b]
  state = load_state(d / "full", 6)
  assert_identical(state, load_state(d / "part", 6))
  first = load_state(d / "full", 3)
  for key in ("params/contrastive/logit_scale", "params/contrastive/img_proj/kernel",
              "params/contrastive/txt_proj/kernel", "params/visual/layers/attn/q/kernel",
              "params/decoder/layers/attn/q/kernel"):
    assert not np.array_equal(state[key], first[key]), key  # the head, its temperature and both towers learn
  assert subtree(state, "params/visual/") and subtree(state, "params/decoder/")


@pytest.mark.slow
def test_eval_scores_the_workdir_zero_shot(runs, env):
  d, cfg, _ = runs
  r = subprocess.run([sys.executable, "eval.py", f"--config={cfg}", f"--checkpoint={d / 'full'}", "--max_examples=40"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, describe(r)
  for key in ("i2t_recall@1", "t2i_recall@5", "chance@1", "zero_shot_accuracy", "zero_shot_chance"):
    assert key in r.stdout, r.stdout
  assert os.path.isfile(d / "full" / "eval_test" / "metrics.json")


@pytest.mark.slow
def test_a_generative_stage_starts_from_the_contrastive_workdir(runs, caplog):
  """What init.source=checkpoint reads from a workdir (loader.start_params): the family's parameters of the
  contrastive run's last step, the head left behind."""
  import jax
  import ml_collections

  from qwenvl_jax.convert.loader import start_params
  from qwenvl_jax.models import registry
  d, _, _ = runs
  cfg = registry.get_config("qwen_vl_demo", dtype="float32")
  params, _ = start_params(ml_collections.ConfigDict({"source": "checkpoint", "path": str(d / "full")}), cfg)
  assert "contrastive" not in params and f"initialised from {d / 'full'} (step 6)" in caplog.text
  src = load_state(d / "full", 6)
  flat = {"params/" + "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  assert set(flat) == {k for k in src if k.startswith("params/") and not k.startswith("params/contrastive/")}
  for key, value in flat.items():
    np.testing.assert_array_equal(value, src[key], err_msg=key)


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "contrastive", "optim.grad_accum": 2, "data.batch_size": 8}, "optim.grad_accum must be 1 in contrastive"),
    ({"mode": "contrastive", "contrastive.loss": "triplet"}, "contrastive.loss 'triplet'"),
    ({"mode": "contrastive", "contrastive.text_len": 1}, "contrastive.text_len 1: at least 2"),
    ({"mode": "together"}, "mode 'together': generative | contrastive"),
    ({"model.name": "internvl_tiny"}, "InternVL trains in the contrastive stage"),
])
def test_bad_contrastive_settings_are_one_line_errors(overrides, message):
  from qwenvl_jax.train.config import base_config, validate
  c = base_config()
  c.model.name = "qwen_vl_demo"
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(c, dry_run=True)

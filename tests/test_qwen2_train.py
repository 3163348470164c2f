"""train.py trains Qwen2-VL on any-resolution shapes batches (images of 40-150 px sides and videos packed on tokens
and patches per row, two micro-batches per step), resumes bit-identically from a checkpoint (params, optimizer state
and the data position), and eval.py scores what it trained."""

import json
import os
import shutil

import numpy as np
import pytest
from qwen2_tokenizer_fixture import build
from train_runs import assert_identical, checkpoint_steps, describe, load_state, metrics, train

MIX = "caption=1,vqa_color=1,grounding=1,ocr=1,multi_image=1,text=1,video_motion=1"
CONFIG = '''
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(name="qwen2_vl_tiny", dtype="float32")
  c.data.update(source="shapes", tokenizer={tokenizer!r}, image_sides="40,150", min_pixels=56 * 56,
                max_pixels=112 * 112, seq_len=256, batch_size=2, patch_budget=320, num_records=300,
                packing_window=64, num_threads=1,
                mix={mix!r})
  c.optim.update(lr=2e-3, min_lr=1e-4, warmup_steps=1, total_steps=6, loss_chunk=128, freeze=(),
                 grad_accum=2)  # micro-batches of one row, each with its own patches
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=3, keep=5, async_save=False)
  c.log.update(every=1, progress=False, tensorboard=False)
  c.peak_flops = 1e12
  return c
'''


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  d = tmp_path_factory.mktemp("q2_train")
  path = d / "qwen2_tiny.py"
  path.write_text(CONFIG.format(tokenizer=build(str(d / "tokenizer.json")), mix=MIX))
  return str(path)


@pytest.fixture(scope="module")
def reference(config, env, tmp_path_factory):
  wd = tmp_path_factory.mktemp("q2_ref") / "run"
  r = train(env, f"--config={config}", f"--workdir={wd}")
  assert r.returncode == 0, describe(r)
  return wd


def test_trains_on_any_resolution_batches(reference):
  logged = metrics(reference)
  assert [m["step"] for m in logged] == list(range(1, 7))
  losses = [m["last_loss"] for m in logged]
  assert all(np.isfinite(losses)) and abs(losses[0] - np.log(512)) < 1.0  # a fresh model near ln(vocab)
  assert min(losses[3:]) < losses[0] - 0.3, losses  # and it learns
  assert all(0 < m["mfu"] < 1 for m in logged[1:])  # counted from each batch's real tokens and patches
  assert checkpoint_steps(reference) == [3, 6]
  with open(os.path.join(reference, "config.json")) as f:
    assert json.load(f)["data"]["patch_budget"] == 320


def test_resume_is_bitwise_exact(reference, config, env, tmp_path):
  wd = tmp_path / "resumed"
  shutil.copytree(reference, wd)
  shutil.rmtree(wd / "checkpoints" / "6")
  r = train(env, f"--config={config}", f"--workdir={wd}")
  assert r.returncode == 0, describe(r)
  assert "resumed from step 3" in r.stdout
  assert [m["last_loss"] for m in metrics(wd)] == [m["last_loss"] for m in metrics(reference)]
  assert_identical(load_state(wd, 6), load_state(reference, 6))


def test_eval_py_scores_the_trained_model(reference, config, env):
  import subprocess
  import sys

  from train_runs import ROOT

  from qwenvl_jax.data.shapes import ShapesSource
  from qwenvl_jax.train.config import parse_mix
  n = 13
  r = subprocess.run([sys.executable, "eval.py", f"--config={config}", f"--checkpoint={reference}",
                      f"--max_examples={n}", "--max_new_tokens=4", "--batch_size=7"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  out = reference / "eval_test"
  predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  metrics = json.loads((out / "metrics.json").read_text())
  assert len(predictions) == metrics["n"] == n
  split = ShapesSource("test", image_size=(40, 150), mix=parse_mix(MIX))  # the config's sides and mix
  assert sorted(p["id"] for p in predictions) == sorted(split[i]["id"] for i in range(n))
  assert sorted(p["task"] for p in predictions) == sorted(split[i]["task"] for i in range(n))  # videos included
  assert "video_accuracy" in metrics["summary"] and sum(m["n"] for m in metrics["per_task"].values()) == n
  assert all(isinstance(p["prediction"], str) for p in predictions)


def test_bad_any_resolution_settings_are_one_error_line(config, env, tmp_path):
  from train_runs import error_line
  for args, message in ((["--config.data.patch_budget=0"], "data.patch_budget"),
                        (["--config.data.mode=pretrain"], "data.mode 'pretrain'")):
    r = train(env, f"--config={config}", f"--workdir={tmp_path / 'bad'}", *args, timeout=120)
    assert r.returncode == 2 and message in error_line(r.stderr), describe(r)

"""demo.py end to end on a shortened schedule (2-3 steps per stage at small sizes, 12 test examples): the three
chained stages train from one another with their freezing, both models are evaluated, the table matches the saved
metrics, example images are written; bad input is one line."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from train_runs import assert_identical, checkpoint_steps, load_state, metrics, subtree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_CONFIG = f"""
import importlib.util
STEPS = {{"stage1": 3, "stage2": 2, "stage3": 2}}
spec = importlib.util.spec_from_file_location("demo_config", {os.path.join(ROOT, "configs", "demo.py")!r})
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def get_config():
  # the sizes and steps of test_train_cli.py's chain run: with the session's compilation cache the three train
  # steps compile once for both tests
  c = demo.get_config()
  c.data.update(image_size=56, seq_len=96, max_images=2, batch_size=4, num_records=400, packing_window=64)
  c.optim.update(warmup_steps=1, loss_chunk=96)
  c.log.update(every=1, progress=False)
  c.checkpoint.update(every=1, keep=5)
  c.peak_flops = 1e12
  for name, steps in STEPS.items():
    c.stage_overrides[name].optim.total_steps = steps
  return c
"""
STEPS = {"stage1": 3, "stage2": 2, "stage3": 2}
LABELS = ("VQA accuracy", "captioning CIDEr", "grounding acc@0.5", "OCR exact match")
KEYS = ("vqa_accuracy", "caption_cider", "grounding_acc@0.5", "ocr_exact_match")


def run_demo(env, *args, timeout=900):
  return subprocess.run([sys.executable, "demo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.mark.slow
def test_demo_short_schedule(env, tmp_path):
  config = tmp_path / "short_demo.py"
  config.write_text(SHORT_CONFIG)
  workdir = tmp_path / "demo"
  r = run_demo(env, f"--config={config}", f"--workdir={workdir}", "--max_examples=12")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  for stage in ("stage1", "stage2", "stage3"):
    assert os.path.isdir(workdir / stage / "checkpoints" / str(STEPS[stage])), stage
    assert "=== " + stage in r.stdout
  check_chain(workdir, r)
  results = json.loads((workdir / "demo_results.json").read_text())
  for which in ("untrained", "trained"):
    assert set(KEYS) <= set(results[which]), results[which]
    assert all(v >= 0 for v in results[which].values())
    lines = (workdir / f"eval_{which}" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(x)["id"].startswith("shapes-test-") for x in lines)
  # The table prints the saved numbers.
  for label, key in zip(LABELS, KEYS):
    row = re.search(rf"^{re.escape(label)}\s+([0-9.]+)\s+([0-9.]+)", r.stdout, re.M)
    assert row, f"no table row for {label}:\n{r.stdout[-2000:]}"
    assert float(row.group(1)) == pytest.approx(results["untrained"][key], abs=6e-4)
    assert float(row.group(2)) == pytest.approx(results["trained"][key], abs=6e-4)
  assert results["examples"], "no example images"
  for path in results["examples"]:
    with Image.open(path) as im:
      assert im.format == "PNG" and im.width == 4 * 56 and im.height > im.width


@pytest.mark.parametrize("args, message", [
    (["--config=/nonexistent/demo.py"], "config file /nonexistent/demo.py does not exist"),
    (["--max_examples=0"], "--max_examples must be positive, got 0"),
])
def test_demo_bad_input_is_one_line(env, tmp_path, args, message):
  r = run_demo(env, f"--workdir={tmp_path / 'demo'}", *args, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: {message}"], r.stderr


def test_fresh_deletes_only_a_workdir_demo_made(env, tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  r = run_demo(env, f"--workdir={mine}", "--fresh", timeout=120)
  assert r.returncode == 2 and "refusing to delete" in r.stderr, r.stderr
  assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
  # a folder demo.py made (its marker inside) is deleted and made again; an empty one is simply used
  made, empty = tmp_path / "made", tmp_path / "empty"
  empty.mkdir()
  script = (f"from demo import MARKER, prepare_workdir\n"
            f"prepare_workdir({str(made)!r}, fresh=False)\n"
            f"open({str(made / 'old.txt')!r}, 'w').close()\n"
            f"prepare_workdir({str(made)!r}, fresh=True)\n"
            f"prepare_workdir({str(empty)!r}, fresh=True)\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert os.listdir(made) == [".qwenvl_demo"] and os.listdir(empty) == [".qwenvl_demo"]


def check_chain(wd, r):
  """The three chained stages: each trains in its own folder from the previous stage's last checkpoint, one shared
  tokenizer, the stage freezing (stage 3 leaves the ViT alone), the resampler's fixed 2-D sin-cos table."""
  assert [ln for ln in r.stdout.splitlines() if ln.startswith("===")] == ["=== stage1 ===", "=== stage2 ===",
                                                                        "=== stage3 ==="]
  assert os.path.isfile(wd / "tokenizer.model")  # trained once, shared by the stages
  with open(wd / "results.json") as f:
    results = json.load(f)
  assert sorted(results) == ["stage1", "stage2", "stage3"]
  for s, n in STEPS.items():
    assert results[s]["step"] == n and not results[s]["stopped_by_signal"]
    assert checkpoint_steps(wd / s) == list(range(1, n + 1))
    assert [x["step"] for x in metrics(wd / s)] == list(range(1, n + 1))
    assert not os.path.exists(wd / s / "tokenizer.model")
  logs = r.stdout + r.stderr
  assert f"initialised from {wd / 'stage1'} (step 3)" in logs and f"initialised from {wd / 'stage2'} (step 2)" in logs
  configs = {s: json.loads((wd / s / "config.json").read_text()) for s in STEPS}
  assert configs["stage1"]["data"]["mode"] == "pretrain" and configs["stage2"]["data"]["mode"] == "chat"
  assert configs["stage2"]["init"] == {"source": "checkpoint", "path": str(wd / "stage1")}

  # Step 1 runs at lr 0 (warmup from 0), so a stage's checkpoint 1 holds the weights it started from.
  s1_start, s1_end = (subtree(load_state(wd / "stage1", k), "params/") for k in (1, 3))
  s2_start, s2_end = (subtree(load_state(wd / "stage2", k), "params/") for k in (1, 2))
  s3_end = subtree(load_state(wd / "stage3", 2), "params/")

  def part(params, prefixes):
    return {k: v for k, v in params.items() if k.split("/")[1] in prefixes}

  def changed(a, b, prefixes):  # the fraction of those arrays that differ
    keys = part(a, prefixes)
    return sum(not np.array_equal(a[k], b[k]) for k in keys) / len(keys)
  llm, vit = ("wte", "decoder", "lm_head"), ("visual",)
  # The demo's stage 1 trains the LLM too (it starts random; configs/stage1_pretrain.py freezes it, as the paper).
  assert changed(s1_start, s1_end, llm) > 0.9 and changed(s1_start, s1_end, vit) > 0.9
  assert_identical(s2_start, s1_end)  # stage 2 starts from stage 1's last checkpoint
  assert changed(s2_start, s2_end, llm) > 0.9 and changed(s2_start, s2_end, vit) > 0.9  # and trains it all
  assert_identical(part(s3_end, vit), part(s2_end, vit))  # stage 3 froze the ViT
  assert changed(s2_end, s3_end, llm) > 0.9
  assert_identical({k: v for k, v in s3_end.items() if "pos_embed" in k and "resampler" in k},
                   {k: v for k, v in s1_start.items() if "pos_embed" in k and "resampler" in k})  # fixed 2D sincos

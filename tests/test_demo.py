"""demo.py end to end on a shortened schedule (2-3 steps per stage at small sizes, 12 test examples): every stage trains and saves,
both models are evaluated, the table matches the saved metrics, example images are written; bad input is one line."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

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
  c.checkpoint.every = 1
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

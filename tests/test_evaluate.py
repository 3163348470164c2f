"""The evaluator: prompts from records, per-task scoring, and eval.py end to end."""

import json
import subprocess
import sys

import pytest

from qwenvl_jax.data.shapes import generate
from qwenvl_jax.evals.evaluate import prompt_of, score


def test_score_routes_tasks_to_their_metrics():
  preds = [
      {"id": 0, "task": "caption", "prediction": "a red circle.", "reference": "a red circle."},
      {"id": 1, "task": "caption", "prediction": "a blue square.", "reference": "a blue square."},
      {"id": 2, "task": "vqa_color", "prediction": "Red", "reference": "red"},
      {"id": 3, "task": "vqa_count", "prediction": "two", "reference": "3"},
      {"id": 4, "task": "grounding", "prediction": "<box>(10,10),(500,500)</box>", "reference": "<box>(12,10),(500,510)</box>"},
      {"id": 5, "task": "grounding", "prediction": "no box", "reference": "<box>(0,0),(100,100)</box>"},
      {"id": 6, "task": "ocr", "prediction": "cat", "reference": "cat"},
      {"id": 7, "task": "ocr", "prediction": "cap", "reference": "cat"},
  ]
  m = score(preds)
  s = m["summary"]
  assert s["vqa_accuracy"] == 0.5 and s["grounding_acc@0.5"] == 0.5
  assert s["ocr_exact_match"] == 0.5 and s["ocr_anls"] == pytest.approx((1 + 2 / 3) / 2)
  assert s["caption_cider"] > 1.0 and m["per_task"]["caption"]["n"] == 2


def test_prompt_of_uses_history_for_multi_turn(tmp_path):
  from qwenvl_jax.data.shapes import train_tokenizer
  tok = train_tokenizer(str(tmp_path / "tok"), num_records=200)
  rec = next(r for r in (generate("test", i) for i in range(200)) if len(r["conversations"]) == 4)
  ids, refs, reference = prompt_of(rec, tok)
  assert reference == rec["conversations"][3]["value"] and refs == ["img0"]
  text = tok.decode(ids)
  assert rec["conversations"][1]["value"] in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_eval_py_end_to_end(tmp_path):
  """eval.py on a model saved by train.py (2 steps): predictions and metrics written, errors are one line."""
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "from qwenvl_jax.train.config import base_config\n"
      "def get_config():\n"
      "  c = base_config(); c.model.name = 'qwen_vl_demo'; c.model.dtype = 'float32'\n"
      "  c.data.update(source='shapes', tokenizer='shapes', image_size=112, seq_len=128, max_images=2, batch_size=2,"
      " num_records=100, packing_window=32)\n"
      "  c.optim.update(total_steps=2, warmup_steps=1, loss_chunk=128); c.log.update(every=1, progress=False)\n"
      "  return c\n")
  wd = tmp_path / "run"
  train = subprocess.run([sys.executable, "train.py", f"--config={cfg}", f"--workdir={wd}"], capture_output=True,
                         text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-2000:]
  out = subprocess.run([sys.executable, "eval.py", f"--config={cfg}", f"--checkpoint={wd}", "--max_examples=10",
                        "--max_new_tokens=4"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  metrics = json.loads((wd / "eval_test" / "metrics.json").read_text())
  assert metrics["n"] == 10 and set(metrics["summary"]) <= {"caption_cider", "vqa_accuracy", "grounding_acc@0.5",
                                                              "ocr_exact_match", "ocr_anls"}
  assert len((wd / "eval_test" / "predictions.jsonl").read_text().splitlines()) == 10
  bad = subprocess.run([sys.executable, "eval.py", f"--config={cfg}", f"--checkpoint={tmp_path / 'nope'}"],
                       capture_output=True, text=True, timeout=300)
  errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
  assert bad.returncode == 2 and len(errors) == 1 and "does not exist" in errors[0]

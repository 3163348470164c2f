"""The evaluator: prompts from records, per-task scoring, and eval.py end to end."""

import json
import subprocess
import sys

import pytest

from qwenvl_jax.data.boxes import qwen_vl_tags
from qwenvl_jax.data.shapes import generate
from qwenvl_jax.evals.evaluate import score, turns_of
from qwenvl_jax.infer.chat import prompt_inputs

SUMMARY_KEYS = {"caption_cider", "vqa_accuracy", "video_accuracy", "grounding_acc@0.5", "ocr_exact_match",
                "ocr_anls"}


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
      {"id": 8, "task": "video_motion", "prediction": "Left", "reference": "left"},
      {"id": 9, "task": "video_motion", "prediction": "up", "reference": "down"},
  ]
  m = score(preds)
  s = m["summary"]
  assert s["vqa_accuracy"] == 0.5 and s["grounding_acc@0.5"] == 0.5 and s["video_accuracy"] == 0.5
  assert s["ocr_exact_match"] == 0.5 and s["ocr_anls"] == pytest.approx((1 + 2 / 3) / 2)
  assert s["caption_cider"] > 1.0 and m["per_task"]["caption"]["n"] == 2


def test_prompts_use_the_history_of_multi_turn_records(tmp_path, tiny_model):
  from qwenvl_jax.data.shapes import train_tokenizer
  tok = train_tokenizer(str(tmp_path / "tok"), num_records=200)
  rec = next(r for r in (generate("test", i) for i in range(200)) if len(r["conversations"]) == 4)
  pairs, query, reference = turns_of(rec)
  assert reference == rec["conversations"][3]["value"] and query == rec["conversations"][2]["value"]
  assert pairs == [(rec["conversations"][0]["value"], rec["conversations"][1]["value"])]
  ids, vision = prompt_inputs(tiny_model, tok, query, pairs, media=rec["images"], trusted=True)
  text = tok.decode(ids)
  assert rec["conversations"][1]["value"] in text and text.endswith("<|im_start|>assistant\n")
  assert vision["pixel_values"].shape[0] == 1  # the history's image is fed again


def test_qwen2_prompts_read_grounding_tags_of_data_as_tokens_and_of_chat_as_text(q2_model, tmp_path):
  from qwen2_tokenizer_fixture import build

  from qwenvl_jax.data.hf_tokenizer import HFTokenizer
  tok = HFTokenizer(build(str(tmp_path / "tokenizer.json")))
  query = "<ref>the red square</ref>"
  trusted, _ = prompt_inputs(q2_model, tok, query, trusted=True)
  typed, _ = prompt_inputs(q2_model, tok, query)
  ref_start = tok.special_id("<|object_ref_start|>")
  assert trusted.count(ref_start) == 1 and ref_start not in typed
  assert tok.decode(trusted) == tok.decode(typed).replace("<ref>", "<|object_ref_start|>").replace(
      "</ref>", "<|object_ref_end|>")
  assert qwen_vl_tags("<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>") == \
      "<ref>a</ref><box>(1,2),(3,4)</box>"


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
  assert metrics["n"] == 10 and set(metrics["summary"]) <= SUMMARY_KEYS
  assert len((wd / "eval_test" / "predictions.jsonl").read_text().splitlines()) == 10
  bad = subprocess.run([sys.executable, "eval.py", f"--config={cfg}", f"--checkpoint={tmp_path / 'nope'}"],
                       capture_output=True, text=True, timeout=300)
  errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
  assert bad.returncode == 2 and len(errors) == 1 and "does not exist" in errors[0]

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
  for args, message in (([f"--checkpoint={tmp_path / 'nope'}"], "does not exist"),
                        ([f"--checkpoint={wd}", "--max_examples=0"], "--max_examples=0: must be at least 1")):
    bad = subprocess.run([sys.executable, "eval.py", f"--config={cfg}", *args], capture_output=True, text=True,
                         timeout=300)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and message in errors[0], bad.stderr[-2000:]
  assert "10 examples scored, 0 skipped" in out.stdout, out.stdout


def test_unreadable_records_are_skipped_and_counted_and_nothing_to_score_is_an_error(tmp_path, monkeypatch):
  """A corrupt, truncated or empty image, a record without a final reference answer, a prompt longer than the
  context and a record the source cannot produce are each skipped with a warning and counted; the rest is scored.
  Zero records (max_examples 0 or -1, or all skipped) is an error, not metrics over nothing."""
  import io

  import PIL.Image

  import qwenvl_jax as qv
  from qwenvl_jax.data.jsonl import JsonlSource
  from qwenvl_jax.data.shapes import train_tokenizer
  from qwenvl_jax.evals import evaluate as E
  from qwenvl_jax.models.qwen_vl.config import QWEN_VL_DEMO

  tok = train_tokenizer(str(tmp_path / "tok"), num_records=200)
  model = qv.QwenVLModel.random(QWEN_VL_DEMO.replace(num_hidden_layers=1, visual=dict(layers=1)), seed=0)
  buf = io.BytesIO()
  PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "PNG")
  (tmp_path / "red.png").write_bytes(buf.getvalue())
  (tmp_path / "cut.png").write_bytes(buf.getvalue()[:40])
  (tmp_path / "junk.png").write_bytes(b"not an image at all")
  (tmp_path / "empty.png").write_bytes(b"")

  def rec(rid, image="red.png", question="What color?", extra=()):
    return {"id": rid, "task": "vqa_color", "conversations": [
        {"from": "user", "value": f"Picture 1: <img>{image}</img>\n{question}"}, {"from": "assistant", "value": "red"},
        *extra]}
  records = [rec("good"), rec("cut", "cut.png"), rec("junk", "junk.png"), rec("empty", "empty.png"),
             rec("no-reference", extra=[{"from": "user", "value": "and?"}]), rec("long", question="red " * 3000),
             rec("good2")]
  (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  source = JsonlSource(str(tmp_path / "eval.jsonl"))
  assert len(source) == 7

  class Flaky:  # a source whose record 0 cannot be produced (a TFDS record that does not decode)
    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      if i == 0:
        raise ValueError("record 0 does not decode")
      return source[i]

  seen = []

  def answers(model, tokenizer, prompts, max_new_tokens):
    seen.append(len(prompts))
    return ["red"] * len(prompts)
  monkeypatch.setattr(E, "generate_answers", answers)
  metrics, predictions = E.evaluate(model, tok, source, batch_size=4, progress=False)
  assert [p["id"] for p in predictions] == ["good", "good2"] and metrics["skipped"] == 5 and metrics["n"] == 2
  assert metrics["summary"]["vqa_accuracy"] == 1.0 and seen == [1, 1]
  metrics, predictions = E.evaluate(model, tok, Flaky(), progress=False)
  assert [p["id"] for p in predictions] == ["good2"] and metrics["skipped"] == 6
  for n in (0, -1):
    with pytest.raises(ValueError, match=f"nothing to evaluate: 7 records, max_examples {n}"):
      E.evaluate(model, tok, source, max_examples=n, progress=False)
  with pytest.raises(ValueError, match="no record could be evaluated: all 6 skipped"):
    E.evaluate(model, tok, Flaky(), max_examples=6, progress=False)

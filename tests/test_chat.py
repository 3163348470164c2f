"""Chat (official prompt layout, history, images), grounding parsing/drawing, and the inference CLI."""

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import qwenvl_jax as qv
from qwenvl_jax.data.conversation import make_context
from qwenvl_jax.infer.chat import chat, chat_batch
from qwenvl_jax.infer.grounding import draw_grounding, parse_grounding
from qwenvl_jax.models.qwen_vl.config import QWEN_VL_DEMO


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  from qwenvl_jax.data.shapes import train_tokenizer
  d = tmp_path_factory.mktemp("demo")
  tok = train_tokenizer(str(d / "tokenizer"), num_records=300)
  model = qv.QwenVLModel.random(QWEN_VL_DEMO.replace(num_hidden_layers=1, visual=dict(layers=1)), seed=0)
  PIL.Image.new("RGB", (60, 40), (200, 30, 30)).save(d / "red.png")
  return model, tok, d


def test_chat_prompt_history_and_images(demo, monkeypatch):
  model, tok, d = demo
  seen = []
  real = model.generate

  def spy(ids, pixel_values=None, **kw):
    seen.append((np.asarray(ids)[0].tolist(), None if pixel_values is None else pixel_values.shape[0], kw))
    return real(ids, pixel_values=pixel_values, **kw)
  monkeypatch.setattr(model, "generate", spy)
  img = str(d / "red.png")
  response, history = chat(model, tok, "What color?", images=[img], max_new_tokens=5)
  assert isinstance(response, str) and history == [(f"Picture 1: <img>{img}</img>\nWhat color?", response)]
  ids, n_images, kw = seen[0]
  assert ids == make_context(tok, history[0][0])[1] and n_images == 1
  assert kw["stop_ids"] == [tok.im_end_id, tok.eod_id] and kw["max_new_tokens"] == 5
  # second turn: the history's image is fed again; a new in-memory image is numbered Picture 2
  _, history = chat(model, tok, "And this one?", history=history, images=[PIL.Image.new("RGB", (8, 8))],
                    max_new_tokens=3)
  assert history[1][0] == "Picture 2: <img>image_1</img>\nAnd this one?"
  ids, n_images, _ = seen[1]
  assert n_images == 2 and ids == make_context(tok, history[1][0], history[:1])[1]


def test_chat_batch_rows_answer_as_alone(demo):
  """Rows of different lengths, with and without images, padded into one generate call: each answer is the one
  chat() gives for that query alone (greedy)."""
  model, tok, d = demo
  img = str(d / "red.png")
  queries = ["Hi", "Describe both."]
  images = [None, [img, PIL.Image.new("RGB", (8, 8), (0, 90, 0))]]
  got = chat_batch(model, tok, queries, images=images, max_new_tokens=6)
  assert got == [chat(model, tok, q, images=i, max_new_tokens=6)[0] for q, i in zip(queries, images)]
  with pytest.raises(ValueError, match="2 queries but 1 image lists"):
    chat_batch(model, tok, queries, images=[[img]])


def test_parse_and_draw_grounding(tmp_path):
  text = "the <ref>red box</ref><box>(100,250),(500,750)</box> and an unnamed <box>(0,0),(50,50)</box>"
  found = parse_grounding(text, 200, 100)
  assert found == [("red box", (20.0, 25.0, 100.0, 75.0)), ("", (0.0, 0.0, 10.0, 5.0))]
  PIL.Image.new("RGB", (200, 100), (255, 255, 255)).save(tmp_path / "w.png")
  img = draw_grounding(str(tmp_path / "w.png"), text, str(tmp_path / "out.png"))
  saved = np.asarray(PIL.Image.open(tmp_path / "out.png"))
  assert saved.shape == (100, 200, 3) and np.array_equal(saved, np.asarray(img))
  assert tuple(saved[50, 20]) != (255, 255, 255) and tuple(saved[50, 60]) == (255, 255, 255)  # edge drawn, inside not


def test_cli_answers_and_reports_bad_input(demo, tmp_path):
  model, tok, d = demo
  model.save(str(tmp_path / "ckpt"))
  base = [sys.executable, "-m", "qwenvl_jax.infer", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer",
          tok.model_file, "--max_new_tokens", "4"]
  ok = subprocess.run(base + ["--image", str(d / "red.png"), "--prompt", "What color?"], capture_output=True,
                      text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  inter = subprocess.run(base, input="/image " + str(d / "red.png") + "\nWhat color?\n/quit\n", capture_output=True,
                         text=True, timeout=300)
  assert inter.returncode == 0 and "Type a question" in inter.stderr
  for extra, message in ((["--image", str(tmp_path / "missing.png"), "--prompt", "x"], "missing.png"),
                         (["--prompt", "x", "--checkpoint", str(tmp_path / "nope")], "does not exist")):
    bad = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and message in errors[0], bad.stderr[-2000:]

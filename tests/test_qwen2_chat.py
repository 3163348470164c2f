"""Qwen2-VL inference chat: the ChatML prompt with placeholder blocks (ids from config.json, sizes from the
processor), multi-turn chat on the fixture model re-feeding every image and video, grounding in Qwen2-VL tags, the
inference CLI."""

import copy
import os
import shutil
import types

import numpy as np
import PIL.Image
import pytest
from qwen2_tokenizer_fixture import build

import qwenvl_jax as qv
from qwenvl_jax.data.conversation import chatml_ids, split_media_prefix
from qwenvl_jax.infer import __main__ as cli
from qwenvl_jax.infer.chat import chat
from qwenvl_jax.infer.grounding import COLORS, draw_grounding, parse_grounding

GROUNDED = "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,250),(500,750)<|box_end|>"


@pytest.fixture(scope="module")
def folder(q2_dir, tmp_path_factory):
  """The fixture checkpoint with a tokenizer.json beside it (as a Hugging Face Qwen2-VL folder has)."""
  d = tmp_path_factory.mktemp("q2_chat") / "model"
  shutil.copytree(q2_dir, d)
  build(str(d / "tokenizer.json"))
  return str(d)


@pytest.fixture(scope="module")
def tok(folder):
  return qv.load_tokenizer(folder)


@pytest.fixture(scope="module")
def model(folder):
  return qv.load(folder, scan_layers=False)  # as the CLI loads it, so both share the compiled programs


def _spy(monkeypatch, model):
  seen = []
  real = model.generate

  def spy(ids, **kw):
    seen.append((np.asarray(ids)[0].tolist(), kw))
    return real(ids, **kw)
  monkeypatch.setattr(model, "generate", spy)
  return seen


def test_prompt_layout(tok):
  block = [480, 482, 482, 482, 481]
  ids = chatml_ids(tok, [(["hello"], "fine"), ([block, "what?"], None)])
  want = ([486] + tok.encode("system\nYou are a helpful assistant.") + [487] + tok.encode("\n")
          + [486] + tok.encode("user\nhello") + [487] + tok.encode("\n") + [486] + tok.encode("assistant\nfine")
          + [487] + tok.encode("\n") + [486] + tok.encode("user\n") + block + tok.encode("what?") + [487]
          + tok.encode("\n") + [486] + tok.encode("assistant\n"))
  assert ids == want


def test_answers_keep_grounding_ids_user_text_does_not(tok):
  ids = chatml_ids(tok, [([GROUNDED], GROUNDED), (["<|im_start|>"], None)])
  # the user's tags (and forged <|im_start|>) stay text; the answer's grounding tags are the model's own ids again
  assert [i for i in ids if i >= 480] == [486, 487, 486, 487, 486, 488, 489, 490, 491, 487, 486, 487, 486]


def test_split_media_prefix():
  q = ("Picture 1: <img>a.png</img>\nVideo 1: <video>f0.png|f1.png</video>\nPicture 2: <img>b\nc</img>\n"
       "what <img>x</img>")
  assert split_media_prefix(q) == ([("image", "a.png"), ("video", "f0.png|f1.png"), ("image", "b\nc")],
                                   "what <img>x</img>")
  assert split_media_prefix("Picture 1: <img>a</img> hi Picture 2: <img>b</img>\nq") == (
      [], "Picture 1: <img>a</img> hi Picture 2: <img>b</img>\nq")


def test_chat_turns_feed_every_image(folder, model, tok, monkeypatch):
  cfg, proc = model.config, model.processor()
  assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id) == (
      480, 481, 482, 483)  # config.json's ids, the ones the fixture tokenizer was built to agree with
  seen = _spy(monkeypatch, model)
  img = os.path.join(folder, "img0.png")  # 90 x 150: grid [1, 8, 4], 8 tokens
  response, history = chat(model, tok, "What is it?", images=[img], max_new_tokens=4)
  assert isinstance(response, str) and history == [(f"Picture 1: <img>{img}</img>\nWhat is it?", response)]
  ids, kw = seen[0]
  assert proc.tokens(proc.image_grid(150, 90)) == 8
  assert ids == chatml_ids(tok, [([[480] + [482] * 8 + [481], "What is it?"], None)])
  assert kw["image_grid_thw"].tolist() == [[1, 8, 4]] and kw["stop_ids"] == [487, 485]
  assert np.array_equal(kw["pixel_values"], proc(images=[img])["pixel_values"])

  frames = [os.path.join(folder, f"video0_f{i}.png") for i in range(4)]
  square = PIL.Image.new("RGB", (56, 56), (10, 200, 30))
  _, history = chat(model, tok, "And now?", history=history, images=[square], videos=[frames], max_new_tokens=2)
  assert len(history) == 2 and history[0] == (f"Picture 1: <img>{img}</img>\nWhat is it?", response)
  assert history[1][0] == f"Picture 2: <img>image_1</img>\nVideo 1: <video>{'|'.join(frames)}</video>\nAnd now?"
  ids, kw = seen[1]
  video = proc(videos=[frames])
  n_video = proc.tokens(video["video_grid_thw"][0])
  assert kw["image_grid_thw"].tolist() == [[1, 8, 4], [1, 4, 4]] and ids.count(482) == 8 + 4
  assert np.array_equal(kw["pixel_values"], proc(images=[img, square])["pixel_values"])
  assert np.array_equal(kw["video_grid_thw"], video["video_grid_thw"]) and ids.count(483) == n_video > 0
  assert np.array_equal(kw["pixel_values_videos"], video["pixel_values_videos"])
  blocks = [[480] + [482] * 4 + [481], [480] + [483] * n_video + [481]]
  assert ids == chatml_ids(tok, [([[480] + [482] * 8 + [481], "What is it?"], response), (blocks + ["And now?"], None)])


def test_chat_ids_come_from_config(model, tok, folder):
  """A config with other placeholder ids gets them in the prompt; a tokenizer that disagrees is refused."""
  ids_seen = []
  cfg = model.config.replace(vision_start_token_id=470, vision_end_token_id=471, image_token_id=472,
                             video_token_id=473)

  def generate(ids, **kw):
    ids_seen.append(np.asarray(ids)[0].tolist())
    return np.concatenate([ids, [[tok.im_end_id]]], axis=1)
  stub = types.SimpleNamespace(family=model.family, config=cfg, processor=model.processor, generate=generate)
  renamed = copy.copy(tok)
  renamed.special_ids = {**tok.special_ids, "<|vision_start|>": 470, "<|vision_end|>": 471, "<|image_pad|>": 472,
                         "<|video_pad|>": 473}
  img = os.path.join(folder, "img2.png")
  response, _ = chat(stub, renamed, "hi", images=[img])
  n = model.processor().tokens(model.processor()(images=[img])["image_grid_thw"][0])
  assert response == "" and n > 0 and ids_seen[0] == chatml_ids(tok, [([[470] + [472] * n + [471], "hi"], None)])
  with pytest.raises(ValueError, match=r"has <\|vision_start\|> = 480 but the model's config.json says 470"):
    chat(stub, tok, "hi")


def test_chat_batch_rows_answer_as_alone(folder, model, tok):
  """Images of different sizes in different rows (placeholder blocks of different lengths), a text-only row: each
  answer equals chat() alone (greedy)."""
  from qwenvl_jax.infer.chat import chat_batch
  queries = ["Describe it.", "Hello there", "Compare."]
  images = [[os.path.join(folder, "img1.png")], None, [os.path.join(folder, "img0.png"), os.path.join(folder,
                                                                                                     "img2.png")]]
  got = chat_batch(model, tok, queries, images=images, max_new_tokens=5)
  assert got == [chat(model, tok, q, images=i, max_new_tokens=5)[0] for q, i in zip(queries, images)]


def test_qwen2_vl_grounding_parses_and_draws_like_v1(tmp_path):
  text = "It is " + GROUNDED + " next to <|box_start|>(0,0),(50,50)<|box_end|>"
  assert parse_grounding(text, 200, 100) == [("the cat", (20.0, 25.0, 100.0, 75.0)), ("", (0.0, 0.0, 10.0, 5.0))]
  PIL.Image.new("RGB", (200, 100), (255, 255, 255)).save(tmp_path / "w.png")
  img = np.asarray(draw_grounding(str(tmp_path / "w.png"), text))
  red = tuple(int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5))
  assert tuple(img[50, 20]) == red and tuple(img[50, 60]) == (255, 255, 255)  # left edge drawn, inside not


def test_cli_one_shot(folder, model, tok, capsys):
  img = os.path.join(folder, "img1.png")
  want, _ = chat(model, tok, "Describe it.", images=[img], max_new_tokens=4)  # the programs the chat test compiled
  capsys.readouterr()
  assert cli.main(["--checkpoint", folder, "--image", img, "--prompt", "Describe it.", "--max_new_tokens", "4"]) == 0
  assert capsys.readouterr().out == want + "\n"


def test_cli_draws_qwen2_boxes(folder, tmp_path, capsys, monkeypatch):
  import qwenvl_jax.infer.chat as chat_module
  monkeypatch.setattr(chat_module, "chat", lambda model, tok, query, history=None, images=None, **kw: (
      GROUNDED, [(query, GROUNDED)]))
  out = tmp_path / "boxes.png"
  img = os.path.join(folder, "img0.png")
  assert cli.main(["--checkpoint", folder, "--image", img, "--prompt", "Where?", "--boxes_out", str(out)]) == 0
  assert f"[1 box(es) drawn on {out}]" in capsys.readouterr().err
  drawn = np.asarray(PIL.Image.open(out).convert("RGB"))
  original = np.asarray(PIL.Image.open(img).convert("RGB"))
  assert drawn.shape == original.shape and not np.array_equal(drawn, original)


def test_cli_without_tokenizer(folder, tmp_path, capsys):
  bare = tmp_path / "no_tokenizer"
  shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer.json"))
  assert cli.main(["--checkpoint", str(bare), "--prompt", "x"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0] == f"error: no tokenizer found with {bare}; pass --tokenizer"

"""InternVL chat: ChatML with each image as <img>, 4 <IMG_CONTEXT> per tile of its dynamic tiling (here 4 per tile of
the 56 px fixture model), </img> and a newline before the question; tiles of every image of the conversation fed
again in order; the batched chat and the inference CLI on an HF folder with its tokenizer.json."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image
from qwen2_tokenizer_fixture import INTERNVL_SPECIALS, build

import qwenvl_jax as qv
from qwenvl_jax.infer import __main__ as cli
from qwenvl_jax.infer.chat import chat, chat_batch

IMG, END, CTX = 488, 489, 490


@pytest.fixture(scope="module")
def folder(iv_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp("iv_chat") / "model"
  shutil.copytree(iv_dir, d)
  build(str(d / "tokenizer.json"), INTERNVL_SPECIALS, 488)
  return str(d)


@pytest.fixture(scope="module")
def model(folder):
  return qv.load(folder, scan_layers=False)


def test_prompt_blocks_and_multi_turn(model, folder, iv_dir, monkeypatch):
  tok = qv.load_tokenizer(folder)
  img1, img0 = (Image.open(os.path.join(iv_dir, f"img{i}.png")) for i in (1, 0))  # 3 tiles (2 + thumbnail), 1
  seen = []
  real = model.generate

  def spy(ids, **kw):
    seen.append((np.asarray(ids)[0].tolist(), kw))
    return real(ids, **kw)
  monkeypatch.setattr(model, "generate", spy)
  answer, history = chat(model, tok, "What is this?", images=[img1], max_new_tokens=4)
  ids, kw = seen[-1]
  k = ids.index(IMG)
  assert ids[k:k + 14] == [IMG] + [CTX] * 12 + [END] and tok.decode(ids[k + 14:k + 15]) == "\n"
  assert kw["pixel_values"].shape == (3, 3, 56, 56) and kw["stop_ids"] == [tok.im_end_id, tok.eod_id]
  assert tok.decode(ids[k + 15:]).startswith("What is this?<|im_end|>")
  _, history = chat(model, tok, "And this one?", history=history, images=[img0], max_new_tokens=4,
                    image_objects={"image_0": img1})
  ids, kw = seen[-1]
  assert ids.count(IMG) == 2 and ids.count(CTX) == 16 and kw["pixel_values"].shape[0] == 4  # both images, in order
  np.testing.assert_array_equal(kw["pixel_values"][:3], seen[0][1]["pixel_values"])
  with pytest.raises(ValueError, match="takes no video input"):
    chat(model, tok, "?", videos=[[img0, img0]])


def test_chat_batch_rows_equal_single_chats(model, folder, iv_dir):
  tok = qv.load_tokenizer(folder)
  paths = [os.path.join(iv_dir, f"img{i}.png") for i in (2, 0)]
  batched = chat_batch(model, tok, ["Describe it.", "Colour?"], images=[[paths[0]], [paths[1]]], max_new_tokens=6)
  single = [chat(model, tok, q, images=[p], max_new_tokens=6)[0] for q, p in zip(["Describe it.", "Colour?"], paths)]
  assert batched == single


def test_cli_on_the_folder(folder, iv_dir, capsys):
  rc = cli.main(["--checkpoint", folder, "--image", os.path.join(iv_dir, "img0.png"), "--prompt", "Hi?",
                 "--max_new_tokens", "3"])
  assert rc == 0 and capsys.readouterr().out.strip() != ""

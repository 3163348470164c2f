"""Tokenizers: the Qwen BPE against the official goldens; the SentencePiece backend's guarantees."""

import json
import os

import pytest

import qwenvl_jax as qv
from qwenvl_jax.data.conversation import make_context
from qwenvl_jax.data.tokenizer import IMAGE_ST, SPECIAL_TOKENS, TokenizerError, default_qwen_vocab, train_sentencepiece

CASES = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "qwen_vl_tiny", "tokenizer_cases.json")))


@pytest.fixture(scope="module")
def qwen():
  path = default_qwen_vocab()
  assert path is not None, "the test dependency dashscope (ships qwen.tiktoken) is not installed"
  return qv.load_tokenizer(path)


def test_vocab_and_special_ids(qwen):
  assert qwen.vocab_size == CASES["tokenizer_n_vocab"]
  assert {t: qwen.special_ids[t] for t in CASES["special_tokens"]} == CASES["special_tokens"]
  for name, value in CASES["named_ids"].items():
    assert getattr(qwen, name) == value, name


@pytest.mark.parametrize("case", [c for c in CASES["cases"] if c["kind"] == "encode"], ids=lambda c: c["text"][:30])
def test_encode_decode_goldens(qwen, case):
  assert qwen.encode(case["text"]) == case["ids"]
  assert qwen.encode(case["text"], allowed_special=set(IMAGE_ST)) == case["ids_allowed_image_st_only"]
  assert qwen.decode(case["ids"]) == case["decoded"]
  assert qwen.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("case", [c for c in CASES["cases"] if c["kind"] == "make_context"], ids=lambda c: c["query"][:20])
def test_make_context_goldens(qwen, case):
  raw, ids = make_context(qwen, case["query"], case["history"], case["system"])
  assert raw == case["raw_text"]
  assert ids == case["ids"]
  assert qwen.decode(ids) == case["decoded"]


def test_image_span_layout(qwen):
  ids = qwen.encode("<img>a.png</img>")
  assert len(ids) == 258 and ids[0] == qwen.img_start_id and ids[-1] == qwen.img_end_id
  assert ids[1:6] == list(b"a.png") and set(ids[6:-1]) == {qwen.img_pad_id}
  with pytest.raises(TokenizerError, match="does not fit the 256 image slots"):
    qwen.encode("<img>" + "x" * 257 + "</img>")
  with pytest.raises(TokenizerError, match="unclosed <img>"):
    qwen.encode("look <img>a.png")


@pytest.mark.parametrize("text, tag", [("a </img> b", "stray </img>"), ("<img>a.png</img> then </img>", "stray </img>"),
                                        ("pad <imgpad> here", "stray <imgpad>"),
                                        ("<img>a.png</img><img>b", "unclosed <img>")])
def test_image_tags_outside_image_references_are_refused(qwen, sp, text, tag):
  """A lone tag would shift which image features later images of a packed row get: an error (the data pipeline
  skips such a record, counted), for both tokenizers; as plain text (allowed_special without images) it is text."""
  for tok in (qwen, sp):
    with pytest.raises(TokenizerError, match=tag):
      tok.encode(text)
    assert tok.img_end_id not in tok.encode(text, allowed_special=set())


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    qv.load_tokenizer(str(tmp_path / "nope.tiktoken"))
  with pytest.raises(FileNotFoundError, match="no qwen.tiktoken"):
    qv.load_tokenizer(str(tmp_path))
  bad = tmp_path / "qwen.tiktoken"
  bad.write_text("not base64 at all here\n")
  with pytest.raises(TokenizerError, match="qwen.tiktoken:1: not a tiktoken vocabulary line"):
    qv.load_tokenizer(str(tmp_path))


# --- SentencePiece ----------------------------------------------------------------------------------

CORPUS = ["a red circle and a blue square.", "What color is the circle?", "How many shapes are there? 3",
          "<ref>the green triangle</ref><box>(120,40),(560,999)</box>", "Picture 1: the word is cat.",
          "<|im_start|>user\nhello<|im_end|>\n"] * 30


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  return train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=600, image_span=16)


def test_sentencepiece_special_ids_consecutive(sp):
  assert [sp.special_ids[t] for t in SPECIAL_TOKENS] == list(range(1, len(SPECIAL_TOKENS) + 1))
  assert (sp.img_end_id, sp.img_pad_id) == (sp.img_start_id + 1, sp.img_start_id + 2)
  assert sp.vocab_size >= 600


@pytest.mark.parametrize("text", ["a red circle", "  two  spaces\tand\ttabs\n\nnewlines  ", "Emoji 😀 and 中文 café",
                                  "café vs café", "", "x" * 100, "<ref>a</ref><box>(1,2),(3,4)</box><|endoftext|>"])
def test_sentencepiece_exact_round_trip(sp, text):
  assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_specials_and_images(sp):
  ids = sp.encode("<|im_start|>user\n<img>any/path.png</img>hi<|im_end|>")
  assert ids[0] == sp.im_start_id and sp.im_end_id == ids[-1]
  k = ids.index(sp.img_start_id)
  assert ids[k:k + 18] == [sp.img_start_id] + [sp.img_pad_id] * 16 + [sp.img_end_id]
  plain = sp.encode("<|im_start|>", allowed_special=set())
  assert sp.im_start_id not in plain and sp.decode(plain) == "<|im_start|>"
  assert sp.decode(sp.encode("<ref>x</ref>"), skip_special_tokens=True) == "x"


def test_load_sentencepiece_from_file(sp):
  again = qv.load_tokenizer(sp.model_file, image_span=16)
  assert again.encode("a red circle") == sp.encode("a red circle")

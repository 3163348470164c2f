"""Bad input, generated on purpose, in one process: corpora of broken JSONL records with exact skip counts, and
text the tokenizers cannot encode. Each bad item is skipped and counted (or refused with one clear error), never a
traceback, a hang or a silent loss."""

import json
import logging

import PIL.Image
import pytest

from qwenvl_jax.data.jsonl import DataError, JsonlSource
from qwenvl_jax.data.special_tokens import TokenizerError


def _record(rid, question="What color?", answer="red", image="red.png"):
  value = (f"Picture 1: <img>{image}</img>\n" if image else "") + question
  return {"id": rid, "conversations": [{"from": "user", "value": value}, {"from": "assistant", "value": answer}]}


def _line(obj) -> bytes:
  return json.dumps(obj).encode()


@pytest.fixture
def images(tmp_path):
  PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
  return tmp_path


# --- JSONL ---------------------------------------------------------------------------------------------------------

# (line, what the warning for it says); None: a good record
JSONL_CORPUS = [
    (_line(_record("good0")), None),  # after the file's byte order mark
    (b'{"id": "bad-utf8", "conversations": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"id": ' + b"7" * 5000 + b', "conversations": []}', "an integer of 5000 digits"),
    (_line(_record("surrogate")).replace(b"What color?", b"What \\ud800color?"), "lone surrogate"),
    (_line({**_record("surrogate-id"), "id": "\ud800"}), "lone surrogate"),
    (b'{"id": "cut", "conversations": [', "malformed JSON"),
    (_line(_record("big-box", answer="<box>(1,2),(3," + "9" * 5000 + ")</box>")), "outside the normalised"),
    (_line(_record("big-box-2", answer="<box>(1,2),(3,1000)</box>")), "outside the normalised"),
    (_line({"id": "role", "conversations": [{"from": "robot", "value": "x"}]}), "unknown role"),
    (_line(_record("missing", image="missing.png")), "missing.png not found"),
    (_line(_record("url", image="https://example.com/a.png")), "is a URL"),
    (_line(42), "expected an object"),
    (_line({"id": "value", "conversations": [{"from": "user", "value": 3}]}), "value is not a string"),
    (_line({"id": "empty", "conversations": []}), "empty conversation"),
    (b"", None),  # blank lines are no records
    (b"   \r", None),
    (_line(_record("good1", question="\u00e9t\u00e9 \U0001f600 ok")), None),
    (_line(_record("good2", image=None)) + b"\r", None),
]


def test_a_jsonl_corpus_of_bad_records_is_skipped_line_by_line_with_exact_counts(images, caplog):
  path = images / "corpus.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(line for line, _ in JSONL_CORPUS) + b"\n")
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    src = JsonlSource(str(path))
  bad = [(k, why) for k, (line, why) in enumerate(JSONL_CORPUS, 1) if why]
  assert [r["id"] for r in src.records] == ["good0", "good1", "good2"]
  assert src.errors == len(bad) == 14
  warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping record")]
  assert len(warned) == len(bad)
  for (lineno, why), message in zip(bad, warned):
    assert f"{path}:{lineno}: " in message and why in message, (lineno, message)
  assert all(len(m) < 300 for m in warned)  # a huge value is not echoed whole
  assert src[1]["conversations"][0]["value"].endswith("\u00e9t\u00e9 \U0001f600 ok")
  with pytest.raises(DataError, match=f"{path}:2: not UTF-8"):
    JsonlSource(str(path), strict=True)


def test_a_json_list_keeps_its_good_records_and_names_bad_ones_by_line(images, caplog):
  """The official list format, pretty-printed, with a byte order mark: a byte that is not UTF-8, a huge integer and
  a lone surrogate spoil only their own records (named by the line they start on)."""
  records = [_record("a"), {**_record("b"), "n": 1}, _record("c"), _record("d"), _record("e")]
  text = json.dumps(records, indent=2).encode()
  text = text.replace(b'"n": 1', b'"n": ' + b"1" * 4301).replace(b'"c"', b'"\xc3\x28"').replace(b'"d"', b'"\\udfff"')
  path = images / "train.json"
  path.write_bytes(b"\xef\xbb\xbf" + text)
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    src = JsonlSource(str(path))
  assert [r["id"] for r in src.records] == ["a", "e"] and src.errors == 3
  starts = [k + 1 for k, line in enumerate(text.split(b"\n")) if line == b"  {"]
  messages = "\n".join(r.getMessage() for r in caplog.records)
  assert f"{path}:{starts[1]} (record 1): an integer of 4301 digits" in messages
  for k in (2, 3):
    assert f"{path}:{starts[k]} (record {k}): not UTF-8 text" in messages
  assert src[1]["source"] == f"{path}:{starts[4]} (record 4)"


@pytest.mark.parametrize("body, message", [
    (b"[\n" + _line(_record("a")) + b",\n" + b"[" * 100_000, ":3: invalid JSON (nested too deeply)"),
    (b"[\n" + _line(_record("a")) + b",\n{oops}\n]", ":3: invalid JSON (Expecting property name"),
    (b"[" + _line(_record("a")) + b"\n" + _line(_record("b")) + b"]", ":2: invalid JSON (expected ',' or ']'"),
    (b"[" + _line(_record("a")) + b"] trailing", ":1: invalid JSON (text after the list)"),
    (b"\n\n" + _line({"id": "x", "conversations": []}) + b"\n\xff\n", ": no usable record (2 skipped"),
    (b"", ": no usable record (0 skipped"),
    (b"\xef\xbb\xbf", ": no usable record (0 skipped"),
    (b"[]", ": no usable record (0 skipped"),
])
def test_a_file_that_cannot_be_read_as_a_whole_is_one_error_naming_its_line(images, body, message):
  path = images / "bad.json"
  path.write_bytes(body)
  with pytest.raises(DataError) as e:
    JsonlSource(str(path))
  assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)


def test_skip_warnings_are_capped_per_file(images, caplog):
  path = images / "many.jsonl"
  path.write_bytes(b"\n".join([_line(_record("good"))] + [b"{bad"] * 50))
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    src = JsonlSource(str(path))
  assert len(src) == 1 and src.errors == 50
  messages = [r.getMessage() for r in caplog.records]
  assert sum(m.startswith("skipping record") for m in messages) == 20
  assert messages[-1] == f"{path}: 50 of 51 records skipped (the first 20 warned about)"


# --- tokenizers ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """The shapes SentencePiece, a Qwen2-style tokenizer.json and the Qwen tiktoken tokenizer (when installed)."""
  from qwen2_tokenizer_fixture import build

  from qwenvl_jax.data.hf_tokenizer import HFTokenizer
  from qwenvl_jax.data.shapes import train_tokenizer
  from qwenvl_jax.data.tokenizer import QwenTokenizer, default_qwen_vocab
  d = tmp_path_factory.mktemp("tokenizers")
  out = {"sentencepiece": train_tokenizer(str(d / "sp"), num_records=200),
         "tokenizer.json": HFTokenizer(build(str(d / "tokenizer.json")))}
  if default_qwen_vocab():
    out["qwen"] = QwenTokenizer(default_qwen_vocab())
  return out


def test_a_lone_surrogate_is_a_tokenizer_error_not_a_crash(tokenizers):
  for name, tok in tokenizers.items():
    for text in ("\ud800", "ab\udfffcd", "<img>a\udc80.png</img>"):
      with pytest.raises(TokenizerError, match="lone surrogate"):
        tok.encode(text)

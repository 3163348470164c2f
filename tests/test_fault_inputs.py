"""Bad input, generated on purpose, in one process: corpora of broken JSONL records with exact skip counts, and
text the tokenizers cannot encode. Each bad item is skipped and counted (or refused with one clear error), never a
traceback, a hang or a silent loss."""

import json
import logging

import numpy as np
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


def _png(size=(8, 8)) -> bytes:
  import io
  buf = io.BytesIO()
  PIL.Image.new("RGB", size, (0, 128, 255)).save(buf, "PNG")
  return buf.getvalue()


def _crafted_png(width: int, height: int) -> bytes:
  """A PNG whose header claims width x height (PIL will not write such a file)."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
          chunk(b"IDAT", b"") + chunk(b"IEND", b""))


SECRET = b"SECRETSECRET"
IMAGE_CORPUS = {  # file name -> content (None: made below), in image_root
    "good.png": _png(),
    "junk.png": b"\x00\x01 not an image " * 8,
    "cut.png": _png((64, 64))[:60],
    "empty.png": b"",
    "secret.ppm": b"P1\n" + SECRET * 4,              # PIL's PNM parser would quote these bytes
    "secret.pgm": b"P5 4 4 " + SECRET + b"\n",
    "bomb.png": _crafted_png(100_000, 100_000),
    "zero.png": _crafted_png(0, 0),
    "pipe.png": None,                                # a FIFO
    "folder.png": None,                              # a directory
}
BAD_IMAGES = ["junk.png", "cut.png", "empty.png", "secret.ppm", "secret.pgm", "bomb.png", "zero.png"]


def test_an_image_corpus_of_bad_files_is_skipped_with_exact_counts_and_no_file_bytes_in_messages(tmp_path, caplog,
                                                                                                 tokenizers):
  """Each bad image costs only its record: read by JsonlSource (missing, FIFO, directory: at load) and by the
  pipeline's sample encoder (the rest: at decode), every one counted and named, no message quoting the file. Paths
  leaving image_root are read by default (as the official code does) and skipped with confine_images=True."""
  import os

  from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder
  root = tmp_path / "images"
  root.mkdir()
  for name, data in IMAGE_CORPUS.items():
    if data is not None:
      (root / name).write_bytes(data)
  os.mkfifo(root / "pipe.png")
  (root / "folder.png").mkdir()
  (tmp_path / "outside.png").write_bytes(_png())
  (root / "link.png").symlink_to(tmp_path / "outside.png")
  escaping = ["../outside.png", str(tmp_path / "outside.png"), "link.png"]
  refs = list(IMAGE_CORPUS) + ["missing.png"] + escaping
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(_record(ref, image=ref)) for ref in refs))

  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    src = JsonlSource(str(tmp_path / "d.jsonl"), image_root=str(root))
    assert src.errors == 3 and len(src) == len(refs) - 3  # pipe, folder, missing
    enc = SampleEncoder(tokenizers["sentencepiece"], DataConfig(seq_len=128, image_size=28, max_images=2))
    kept = [r["id"] for r in src.records if enc(r) is not None]
  assert kept == ["good.png"] + escaping
  assert enc.counts == {"ok": 4, "bad_image": len(BAD_IMAGES)}
  messages = [r.getMessage() for r in caplog.records]
  for name in BAD_IMAGES:
    assert sum(f"cannot load image {name}:{name}" in m for m in messages) == 1, name
  for name, why in (("pipe.png", "is not a regular file"), ("folder.png", "is not a regular file"),
                    ("missing.png", "not found")):
    assert sum(f"{root / name} {why}" in m for m in messages) == 1, name
  assert not any("SECRET" in m or "\\x" in m for m in messages), messages
  confined = JsonlSource(str(tmp_path / "d.jsonl"), image_root=str(root), confine_images=True)
  assert confined.errors == 3 + len(escaping) and [r["id"] for r in confined.records] == list(IMAGE_CORPUS)[:8]
  from qwenvl_jax.train.config import base_config
  from qwenvl_jax.train.loop import data_source
  c = base_config()
  c.data.update(source="jsonl", path=str(tmp_path / "d.jsonl"), image_root=str(root))
  assert len(data_source(c)) == len(src)
  c.data.confine_images = True
  assert len(data_source(c)) == len(confined)


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


# --- inference: what a model emits, and what a user passes ---------------------------------------------------------

def test_ids_the_tokenizer_does_not_have_decode_as_nothing(tokenizers):
  """The real Qwen-VL embedding has 151,936 rows for 151,860 ids (Qwen2-VL 152,064 for 151,665): a model can emit
  the others. They, negative ids and ids beyond any vocabulary decode as ''."""
  for name, tok in tokenizers.items():
    ids = tok.encode("a red square")
    n = tok.vocab_size
    strays = [n, n + 1, n + 75, -1, -(2 ** 40), 2 ** 40]
    for skip in (False, True):
      assert tok.decode(strays[:3] + ids + strays[3:], skip_special_tokens=skip) == "a red square", name
      assert tok.decode(strays, skip_special_tokens=skip) == "", name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizers):
  """A random 1-layer Qwen-VL demo model whose vocabulary holds the shapes tokenizer's ids, saved for the CLI."""
  import qwenvl_jax as qv
  from qwenvl_jax.models.qwen_vl.config import QWEN_VL_DEMO
  model = qv.QwenVLModel.random(QWEN_VL_DEMO.replace(num_hidden_layers=1, visual=dict(layers=1)), seed=0)
  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  model.save(str(path))
  return model, tokenizers["sentencepiece"], path


def test_generation_never_picks_an_id_beyond_the_tokenizer(tiny, monkeypatch):
  """Every id below 1000 scores 0 and the rows above it random: greedy picks ids >= 1000 unless told the
  tokenizer's size; the limit is an argument of the compiled function, so another one compiles nothing new."""
  import jax

  from qwenvl_jax.infer import chat, generate
  model, tok, _ = tiny
  kernel = np.asarray(model.params["lm_head"]["kernel"]).copy()
  kernel[:, :1000] = 0
  monkeypatch.setattr(model, "params", {**model.params, "lm_head": {"kernel": jax.numpy.asarray(kernel)}})
  ids = np.asarray([[5, 6, 7, 8]])
  assert (model.generate(ids, max_new_tokens=4)[0, 4:] >= 1000).all()
  compiled = generate._generate._cache_size()
  for limit in (1000, 900):
    for sample in (False, True):
      new = model.generate(ids, max_new_tokens=4, vocab_limit=limit, do_sample=sample, seed=1)[0, 4:]
      assert (new < limit).all(), (limit, sample, new)
  assert generate._generate._cache_size() == compiled + 1  # only do_sample=True is new
  seen = {}
  monkeypatch.setattr(model, "generate", lambda *a, **kw: seen.update(kw) or np.zeros((1, 5), np.int64))
  chat.chat(model, tok, "hi", max_new_tokens=1)
  assert seen["vocab_limit"] == tok.vocab_size


BOX_OUTPUTS = [  # what a model may write -> (parse_grounding on 1000 x 500, grounding metric vs the reference)
    ("<ref>a</ref><box>(100,200),(300,400)</box>", [("a", (100.0, 100.0, 300.0, 200.0))], 1.0),
    ("<box>(300,400),(100,200)</box>", [("", (100.0, 100.0, 300.0, 200.0))], 0.0),  # inverted: drawn, not scored
    ("<box>(100,200),(300," + "9" * 5000 + ")</box>", [("", (100.0, 100.0, 300.0, 499.5))], 0.0),
    ("<box>(100,200),(1000,400)</box>", [("", (100.0, 100.0, 999.0, 200.0))], 0.0),
    ("<|box_start|>(00100,0200),(300,400)<|box_end|>", [("", (100.0, 100.0, 300.0, 200.0))], 1.0),
    ("<ref>" + "x" * 300 + "</ref><box>(" + "1" * 4301 + ",2),(3,4)</box>", [("x" * 300, (3.0, 1.0, 999.0, 2.0))],
     0.0),
    ("<box>(1,2),(3)</box> <box>(a,b),(c,d)</box> <box>(-1,2),(3,4)</box>", [], 0.0),
]


@pytest.mark.parametrize("text, boxes, hit", BOX_OUTPUTS)
def test_boxes_in_model_output_never_raise_and_bad_ones_score_as_misses(text, boxes, hit, tmp_path):
  from qwenvl_jax.evals.evaluate import score
  from qwenvl_jax.infer.grounding import draw_grounding, parse_grounding
  assert parse_grounding(text, 1000, 500) == boxes
  PIL.Image.new("RGB", (1000, 500), "white").save(tmp_path / "w.png")
  draw_grounding(str(tmp_path / "w.png"), text, str(tmp_path / "out.png"))
  m = score([{"id": 0, "task": "grounding", "prediction": text, "reference": "<box>(100,200),(300,400)</box>"}])
  assert m["per_task"]["grounding"]["acc@0.5"] == hit


def test_a_fifo_or_device_as_an_image_is_refused_at_once(tmp_path):
  import os
  import signal

  from qwenvl_jax.data.images import ImageError, load_image
  def hung(signum, frame):
    raise TimeoutError("load_image blocked")

  os.mkfifo(tmp_path / "pipe.png")
  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(20)  # opening the FIFO would block forever: fail the test instead of hanging the suite
  try:
    for path, kind in ((tmp_path / "pipe.png", "a FIFO"), ("/dev/zero", "a character device"),
                       (tmp_path, "a directory")):
      with pytest.raises(ImageError, match=f"cannot load image {path}: {kind}, not an image file"):
        load_image(path)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_cli_bad_values_bad_images_bad_text_and_ctrl_c(tiny, tmp_path):
  """Usage errors for bad option values; one `error:` line for a FIFO image or a prompt that is not UTF-8 (before
  the model loads); in interactive mode both are one line and the session goes on; Ctrl-C exits 130 quietly."""
  import os
  import select
  import signal
  import subprocess
  import sys
  import time

  _, tok, ckpt = tiny
  os.mkfifo(tmp_path / "pipe.png")
  base = [sys.executable, "-m", "qwenvl_jax.infer", "--checkpoint", str(ckpt), "--tokenizer", tok.model_file]
  for extra, message in ((["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
                         (["--top_p", "0"], "need top_k >= 0, 0 < top_p <= 1"),
                         (["--image", str(tmp_path / "pipe.png"), "--prompt", "x"], "a FIFO, not an image file"),
                         ([b"--prompt", b"caf\xe9"], "lone surrogate at character 3")):
    r = subprocess.run(base + extra, capture_output=True, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "Traceback" not in err and message in err, err
    assert sum("error:" in ln for ln in err.splitlines()) == 1, err

  p = subprocess.Popen(base, stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
  p.stdin.write(f"/image {tmp_path / 'pipe.png'}\n".encode() + b"caf\xe9?\n")
  p.stdin.flush()
  err, deadline = b"", time.time() + 120
  while err.count(b"error:") < 2 and time.time() < deadline and p.poll() is None:
    if select.select([p.stderr], [], [], 1)[0]:
      err += os.read(p.stderr.fileno(), 65536)
  assert err.count(b"error:") == 2 and p.poll() is None, err  # both refused, the session goes on
  p.send_signal(signal.SIGINT)
  out, rest = p.communicate(timeout=60)
  err = (err + rest).decode(errors="replace")
  assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
  assert "a FIFO, not an image file" in err and "lone surrogate" in err


# --- seeded fuzz: tokenizers and box parsers -----------------------------------------------------------------------

# text pieces a user, a data file or a model may produce: scripts, combining marks, emoji sequences, controls, odd
# spaces, byte-order and direction marks, private use, and fragments of the special forms
PIECES = (list("abcxyz ABC019 .,;:!?'\"()[]{}-_=+*/\\@#$%^&~`") +
          ["\n", "\r\n", "\r", "\t", "   ", "\u00a0", "\u3000", "\x00", "\x07", "\x1b[0m", "\x7f", "\u0085", "\u2028",
           "é", "e\u0301", "\u0301", "ß", "ﬁ", "Å", "Ω", "中文", "日本語", "한국어", "عربى", "\u200b", "\u200d", "\u202e",
           "\ufeff", "\ufffd", "😀", "👨‍👩‍👧", "🇫🇷", "\U0010ffff", "\ue000", "a" * 40, "1234567890", "<", ">", "|",
           "<ref", "box>", "<|im_", "|>", "</", "img", "(12,", "999)"])
SPECIAL_FORMS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<ref>", "</ref>", "<box>", "</box>", "<img>",
                 "</img>", "<imgpad>", "<|box_start|>", "<|object_ref_end|>", "<|image_pad|>", "<|extra_3|>"]
N_FUZZ = 4000  # round-trip strings per tokenizer (three tokenizers: 12,000)
N_BOXES = 6000  # generated answers with boxes, and as many junk strings


def _fuzz_text(rng, pieces=PIECES) -> str:
  return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))


def test_fuzzed_text_round_trips_through_every_tokenizer(tokenizers):
  """Seeded random text without special forms: decode(encode(s)) == s exactly (Qwen's tiktoken normalises to NFC
  first, as the official one). Text with special forms and tags encodes or is refused with TokenizerError (an
  unclosed or stray image tag), never anything else; random id lists, in range or not, always decode."""
  import random
  import unicodedata
  rng = random.Random(15)
  for name, tok in tokenizers.items():
    nfc = name == "qwen"
    for _ in range(N_FUZZ):
      s = _fuzz_text(rng)
      assert tok.decode(tok.encode(s)) == (unicodedata.normalize("NFC", s) if nfc else s), (name, s)
    refused = 0
    for _ in range(N_FUZZ // 4):
      s = _fuzz_text(rng, PIECES + SPECIAL_FORMS * 4)
      try:
        ids = tok.encode(s)
      except TokenizerError:
        refused += 1
        continue
      assert isinstance(tok.decode(ids), str)
    assert 0 < refused < N_FUZZ // 4 or name == "tokenizer.json", (name, refused)  # its encode takes tags as text
    for _ in range(N_FUZZ // 4):
      ids = [rng.randint(-5, tok.vocab_size + 100) for _ in range(rng.randint(0, 20))]
      assert isinstance(tok.decode(ids), str) and isinstance(tok.decode(ids, skip_special_tokens=True), str)


def test_fuzzed_box_strings_parse_back_exactly_and_junk_never_raises(tmp_path):
  """Generated answers with boxes in both families' forms between random text give exactly their (phrase, box)
  back; junk made of box syntax fragments and huge numbers never raises, and every box it yields lies on the
  image with ordered corners."""
  import random

  from qwenvl_jax.data.boxes import parse_boxes, parse_ref_boxes, valid_box
  from qwenvl_jax.infer.grounding import draw_grounding, parse_grounding
  rng = random.Random(15)
  forms = (("<ref>", "</ref>", "<box>", "</box>"), ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                                                     "<|box_end|>"))
  filler = list("abc xyz.,;!?()0123456789") + ["\n", "é", "😀", " ", "<", ">"]
  for _ in range(N_BOXES):
    text, want = "", []
    for _ in range(rng.randint(0, 4)):
      r0, r1, b0, b1 = rng.choice(forms)
      (x1, x2), (y1, y2) = sorted(rng.randint(0, 999) for _ in "xx"), sorted(rng.randint(0, 999) for _ in "yy")
      box = (x1, y1, x2, y2)
      phrase = "".join(rng.choice("abc xyz-'") for _ in range(rng.randint(1, 12))) if rng.random() < 0.7 else None
      pad = lambda v: "0" * rng.randint(0, 2) + str(v)  # noqa: E731 - leading zeros still read as the number
      written = f"{b0}({pad(box[0])},{pad(box[1])}),({pad(box[2])},{pad(box[3])}){b1}"
      text += "".join(rng.choice(filler) for _ in range(rng.randint(0, 8))).replace("<", "< ") + " "
      text += (f"{r0}{phrase}{r1}" + rng.choice(["", " ", "\n"]) if phrase is not None else "") + written
      want.append((phrase or "", box))
    assert parse_boxes(text) == [b for _, b in want], text
    assert parse_ref_boxes(text) == [(p, b) for p, b in want if p], text
    got = parse_grounding(text, 1000, 1000)
    assert [(p, tuple(int(round(v)) for v in b)) for p, b in got] == want, text
  junk = ["<box>", "</box>", "<ref>", "</ref>", "<|box_start|>", "<|box_end|>", "(", ")", ",", "),(", "x", "\n"]
  PIL.Image.new("RGB", (40, 30), "white").save(tmp_path / "w.png")
  for k in range(N_BOXES):
    numbers = [str(rng.choice([0, 1, 999, 1000, 10 ** 6])), "9" * rng.choice([1, 4, 5000]), "0" * 6, "-1"]
    text = "".join(rng.choice(junk + numbers) for _ in range(rng.randint(0, 30)))
    for box in parse_boxes(text):
      assert len(box) == 4 and all(isinstance(v, int) for v in box)
    for phrase, (x1, y1, x2, y2) in parse_grounding(text, 40, 30):
      assert 0 <= x1 <= x2 < 40 and 0 <= y1 <= y2 < 30
    if k % 50 == 0:
      draw_grounding(str(tmp_path / "w.png"), text)
  assert not valid_box((5, 5, 4, 6)) and not valid_box((0, 0, 1000, 1)) and valid_box((0, 0, 999, 999))

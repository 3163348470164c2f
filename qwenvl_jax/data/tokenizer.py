"""Tokenizers with one interface: the Qwen tiktoken BPE and an in-process trained SentencePiece model.

Both know the Qwen-VL special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, 205 extras, `<ref>` ...
`<imgpad>`) and turn `<img>path</img>` into the fixed image-slot layout the model splices features into:
`<img>`, the UTF-8 bytes of the path as token ids 0..255 (Qwen only), `<imgpad>` up to `image_span` slots, `</img>`.

    tok = load_tokenizer("qwen.tiktoken")   # or a folder holding it, or a SentencePiece .model
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>")
    text = tok.decode(ids)
"""

from __future__ import annotations

import base64
import os
import re
import unicodedata

from qwenvl_jax.data.special_tokens import (  # noqa: F401 - TokenizerError and QWEN_PATTERN re-exported
  ENDOFTEXT,
  IM_END,
  IM_START,
  QWEN_PATTERN,
  TokenizerError,
  check_unicode,
)

EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END, BOX_START, BOX_END = "<ref>", "</ref>", "<box>", "</box>"
QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD = "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS + IMAGE_ST
QWEN_SPECIAL_START = 151643
_IMG_SPAN = re.compile(re.escape(IMG_START) + "(.*?)" + re.escape(IMG_END), re.S)


def _outside_images(text: str) -> str:
  """Text between image references: an image tag here would be a span without an image (`<img>` with no close)
  or the close of none (`</img>`, `<imgpad>`), whose ids shift which features later images get: refused."""
  for tag in (IMG_START, IMG_END, IMG_PAD):
    if tag in text:
      what = "unclosed" if tag == IMG_START else "stray"
      raise TokenizerError(f"{what} {tag} in text (image tags only as <img>path</img>): "
                           f"{text[text.index(tag):][:60]!r}")
  return text


class Tokenizer:
  """Common interface. Subclasses provide `_encode_plain`, `_decode_plain`, `_special_id` and `vocab_size`."""

  image_span: int
  path_bytes_in_span: bool  # Qwen: the image path's bytes fill the first slots (official layout)
  normalize_nfc: bool

  def _encode_plain(self, text: str, allowed_special) -> list[int]:
    raise NotImplementedError

  def _decode_plain(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _special_id(self, token: str) -> int:
    raise NotImplementedError

  def _known(self, i: int) -> bool:
    """Whether id `i` is one of this tokenizer's (a model's embedding may have more rows than ids)."""
    return 0 <= i < self.vocab_size

  def _init_special_ids(self):
    self.special_ids = {t: self._special_id(t) for t in SPECIAL_TOKENS}
    s = self.special_ids
    self.eod_id, self.im_start_id, self.im_end_id = s[ENDOFTEXT], s[IM_START], s[IM_END]
    self.ref_start_id, self.ref_end_id = s[REF_START], s[REF_END]
    self.box_start_id, self.box_end_id = s[BOX_START], s[BOX_END]
    self.quad_start_id, self.quad_end_id = s[QUAD_START], s[QUAD_END]
    self.img_start_id, self.img_end_id, self.img_pad_id = s[IMG_START], s[IMG_END], s[IMG_PAD]
    self._special_set = set(s.values())

  # --- encoding --------------------------------------------------------------------------------------
  def encode(self, text: str, allowed_special="all") -> list[int]:
    """Text -> ids. `allowed_special`: 'all' (every special surface form becomes its id, as the official
    `tokenizer.encode`) or a set of surface forms (others stay plain text). `<img>path</img>` spans become the
    image-slot layout whenever `<img>` is allowed."""
    check_unicode(text)
    if self.normalize_nfc:
      text = unicodedata.normalize("NFC", text)
    images_on = allowed_special == "all" or IMG_START in allowed_special
    if not images_on:
      return self._encode_plain(text, allowed_special)
    ids: list[int] = []
    end = 0
    for m in _IMG_SPAN.finditer(text):
      ids += self._encode_plain(_outside_images(text[end:m.start()]), allowed_special)
      ids += self.image_ids(m.group(1))
      end = m.end()
    return ids + self._encode_plain(_outside_images(text[end:]), allowed_special)

  def image_ids(self, path: str = "") -> list[int]:
    """The `image_span + 2` ids of one image: <img>, path bytes (Qwen) / nothing, <imgpad>..., </img>."""
    slots = list(path.encode("utf-8")) if self.path_bytes_in_span else []
    if len(slots) > self.image_span:
      raise TokenizerError(f"image reference of {len(slots)} bytes does not fit the {self.image_span} image slots: "
                           f"{path[:60]!r}")
    return [self.img_start_id] + slots + [self.img_pad_id] * (self.image_span - len(slots)) + [self.img_end_id]

  # --- decoding --------------------------------------------------------------------------------------
  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Ids -> text; image spans fold back to `<img>path</img>`; skip_special_tokens drops every special id. Ids the
    tokenizer does not have (negative, or beyond its vocabulary but within the model's embedding) decode as ''."""
    ids = [i for i in map(int, ids) if self._known(i)]
    out: list[str] = []
    chunk: list[int] = []
    i = 0
    while i < len(ids):
      if ids[i] == self.img_start_id and self.img_end_id in ids[i + 1:]:
        j = ids.index(self.img_end_id, i + 1)
        inner = ids[i + 1:j]
        if self.img_pad_id in inner:
          inner = inner[:inner.index(self.img_pad_id)]
        path = bytes(b for b in inner if 0 <= b < 256).decode("utf-8", "replace") if self.path_bytes_in_span else ""
        out.append(self._decode_plain(chunk))
        chunk = []
        out.append(path if skip_special_tokens else f"{IMG_START}{path}{IMG_END}")
        i = j + 1
        continue
      if not (skip_special_tokens and ids[i] in self._special_set):
        chunk.append(ids[i])
      i += 1
    out.append(self._decode_plain(chunk))
    return "".join(out)


class QwenTokenizer(Tokenizer):
  """The official Qwen(-VL) tokenizer: tiktoken BPE over `qwen.tiktoken` + special ids from 151643."""

  path_bytes_in_span = True
  normalize_nfc = True

  def __init__(self, vocab_file: str, image_span: int = 256):
    import tiktoken

    ranks = {}
    with open(vocab_file, "rb") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          token, rank = line.split()
          ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
          raise TokenizerError(f"{vocab_file}:{lineno}: not a tiktoken vocabulary line") from None
    specials = {t: QWEN_SPECIAL_START + i for i, t in enumerate(SPECIAL_TOKENS)}
    self._enc = tiktoken.Encoding("Qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    self._specials = specials
    # the real file's ranks are 0..151642: a range answers `in` at once; another file's may have holes
    rank_ids = frozenset(ranks.values())
    self._rank_ids = range(len(ranks)) if len(rank_ids) == len(ranks) == max(rank_ids, default=-1) + 1 else rank_ids
    self._special_range = range(QWEN_SPECIAL_START, QWEN_SPECIAL_START + len(specials))
    self.image_span = image_span
    self.vocab_size = len(ranks) + len(specials)
    self._init_special_ids()

  def _special_id(self, token: str) -> int:
    return self._specials[token]

  def _known(self, i: int) -> bool:
    # the real embedding has 151,936 rows, the vocabulary 151,860 ids: a model may emit the other 76
    return i in self._rank_ids or i in self._special_range

  def _encode_plain(self, text, allowed_special):
    allowed = allowed_special if allowed_special == "all" else set(allowed_special)
    return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

  def _decode_plain(self, ids):
    return self._enc.decode(ids, errors="replace")


class SentencePieceTokenizer(Tokenizer):
  """SentencePiece with the Qwen-VL special tokens as user-defined symbols, byte fallback and identity
  normalisation (decode(encode(text)) == text). Special ids are 1..217 in SPECIAL_TOKENS order, so
  `<img>`, `</img>`, `<imgpad>` are consecutive as the model expects."""

  path_bytes_in_span = False
  normalize_nfc = False

  def __init__(self, model_file: str, image_span: int = 256):
    import sentencepiece as spm

    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(model_file)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{model_file}: not a SentencePiece model ({e})") from None
    self.model_file = model_file
    self.image_span = image_span
    self.vocab_size = self._sp.GetPieceSize()
    self._init_special_ids()

  def _special_id(self, token: str) -> int:
    i = self._sp.PieceToId(token)
    if i == self._sp.unk_id():
      raise TokenizerError(f"{self.model_file}: special token {token} missing from the model")
    return i

  def _encode_plain(self, text, allowed_special):
    if allowed_special == "all":
      return list(self._sp.EncodeAsIds(text))
    # User-defined symbols are always matched by SentencePiece: encode disallowed specials piecewise as text.
    allowed = set(allowed_special)
    pattern = "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS if t not in allowed) + ")"
    ids: list[int] = []
    for k, part in enumerate(re.split(pattern, text)):
      if not part:
        continue
      if k % 2:  # a disallowed special surface form: spell it out character by character
        ids += [i for ch in part for i in self._sp.EncodeAsIds(ch)]
      else:
        ids += self._sp.EncodeAsIds(part)
    return ids

  def _decode_plain(self, ids):
    return self._sp.DecodeIds(ids)


def train_sentencepiece(texts, model_prefix: str, vocab_size: int = 4096, image_span: int = 256,
                        seed_sentencepiece_size: int = 100_000) -> SentencePieceTokenizer:
  """Train a BPE SentencePiece model in-process on an iterable of strings; writes `{model_prefix}.model`."""
  import sentencepiece as spm

  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
      user_defined_symbols=list(SPECIAL_TOKENS), byte_fallback=True, normalization_rule_name="identity",
      add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
      unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, character_coverage=1.0, num_threads=2,
      seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2, hard_vocab_limit=False)
  return SentencePieceTokenizer(model_prefix + ".model", image_span=image_span)


def default_qwen_vocab() -> str | None:
  """Path of the `qwen.tiktoken` shipped in the `dashscope` wheel, if installed (tests use it)."""
  import importlib.util

  spec = importlib.util.find_spec("dashscope")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
  return path if os.path.isfile(path) else None


def load_tokenizer(path: str, image_span: int = 256):
  """A `qwen.tiktoken` file, a SentencePiece `.model`, a Hugging Face `tokenizer.json` (Qwen2 / Qwen2-VL,
  `hf_tokenizer.HFTokenizer`), or a folder holding one of them (e.g. an HF checkpoint)."""
  if os.path.isdir(path):
    for name in ("qwen.tiktoken", "tokenizer.model", "tokenizer.json"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name), image_span)
    raise FileNotFoundError(f"{path}: no qwen.tiktoken, tokenizer.model or tokenizer.json in this folder")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist")
  if path.endswith(".json"):
    from qwenvl_jax.data.hf_tokenizer import HFTokenizer
    return HFTokenizer(path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, image_span)
  return QwenTokenizer(path, image_span)

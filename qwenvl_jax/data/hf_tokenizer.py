"""A Hugging Face `tokenizer.json` (Qwen2 / Qwen2-VL byte-level BPE) through the `tokenizers` library.

Special tokens and their ids come from the file's added tokens. `encode` treats every character of its text as
text by default: a user typing `<|im_start|>` or `<|image_pad|>` gets the ids of those characters, never the
special id (so a prompt cannot forge turns or image slots); formatters insert special ids themselves
(`special_id`), or name the surface forms they trust (`allowed_special`).

    tok = HFTokenizer("Qwen2-VL-7B-Instruct/tokenizer.json")
    ids = [tok.im_start_id] + tok.encode("user\\nhi") + [tok.im_end_id]
    text = tok.decode(ids)
"""

from __future__ import annotations

import os
import re

from qwenvl_jax.data.special_tokens import ENDOFTEXT, IM_END, IM_START, QWEN_PATTERN, TokenizerError, check_unicode

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
REQUIRED = (ENDOFTEXT, IM_START, IM_END)
GROUNDING_TOKENS = (OBJECT_REF_START, OBJECT_REF_END, BOX_START, BOX_END)
# Qwen2-VL's added tokens in id order (151643.. in the released files: <|vision_start|> 151652, <|image_pad|> 151655)
QWEN2_VL_ADDED = (ENDOFTEXT, IM_START, IM_END, OBJECT_REF_START, OBJECT_REF_END, BOX_START, BOX_END,
                  "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD)


def find_tokenizer_json(folder: str) -> str | None:
  """`tokenizer.json` of an HF folder or of this project's checkpoint (its `assets/`), else None."""
  for d in (folder, os.path.join(folder, "assets")):
    path = os.path.join(d, "tokenizer.json")
    if os.path.isfile(path):
      return path
  return None


class HFTokenizer:
  """The interface the chat and evaluation code use: encode / decode, vocab_size, special ids.

  Ids of the optional tokens (`ref_start_id`, `box_start_id`, `vision_start_id`, `image_pad_id`, ...) are None when
  the file lacks them.
  """

  image_span = 0  # images are placeholder blocks sized by the processor, not fixed spans

  def __init__(self, path: str):
    from tokenizers import Tokenizer

    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library raises its own exception type for any bad file
      raise TokenizerError(f"{path}: not a tokenizer.json ({' '.join(str(e).split())[:200]})") from None
    self.path = path
    # special tokens are matched only when a formatter asks for them: user text encodes as text
    self._tok.encode_special_tokens = True
    self.special_ids = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    missing = [t for t in REQUIRED if t not in self.special_ids]
    if missing:
      raise TokenizerError(f"{path}: special tokens {' '.join(missing)} missing")
    s = self.special_ids
    self.eod_id, self.im_start_id, self.im_end_id = (s[t] for t in REQUIRED)
    self.ref_start_id, self.ref_end_id = s.get(OBJECT_REF_START), s.get(OBJECT_REF_END)
    self.box_start_id, self.box_end_id = s.get(BOX_START), s.get(BOX_END)
    self.vision_start_id, self.vision_end_id = s.get(VISION_START), s.get(VISION_END)
    self.image_pad_id, self.video_pad_id = s.get(IMAGE_PAD), s.get(VIDEO_PAD)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def special_id(self, token: str) -> int:
    if token not in self.special_ids:
      raise TokenizerError(f"{self.path}: no special token {token}")
    return self.special_ids[token]

  def encode(self, text: str, allowed_special=()) -> list[int]:
    """Text -> ids. `allowed_special`: surface forms that become their special id ('all': every special token);
    by default none do, so special-looking characters in `text` stay text."""
    check_unicode(text)
    if not allowed_special:
      return self._plain(text)
    forms = sorted(self.special_ids if allowed_special == "all" else set(allowed_special), key=len, reverse=True)
    for f in forms:
      self.special_id(f)  # an unknown name is a mistake of the caller, not text
    ids: list[int] = []
    end = 0
    for m in re.finditer("|".join(map(re.escape, forms)), text):
      ids += self._plain(text[end:m.start()]) + [self.special_ids[m.group()]]
      end = m.end()
    return ids + self._plain(text[end:])

  def _plain(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids if text else []

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Ids -> text; ids the tokenizer does not have (negative, or beyond its vocabulary but within the model's
    embedding: Qwen2-VL's has 152,064 rows for 151,665 ids) decode as ''."""
    return self._tok.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size],
                            skip_special_tokens=skip_special_tokens)


def added_token_ids(vocab_size: int) -> dict[str, int]:
  """The ids `train_tokenizer_json` gives Qwen2-VL's added tokens in a vocabulary of `vocab_size`: the last ones."""
  first = vocab_size - len(QWEN2_VL_ADDED)
  return {t: first + k for k, t in enumerate(QWEN2_VL_ADDED)}


def train_tokenizer_json(texts, path: str, vocab_size: int) -> str:
  """Train a Qwen2-style tokenizer.json on `texts`: byte-level BPE after Qwen's pre-tokenisation (digits one by
  one, so coordinates are digit sequences as in Qwen2), NFC, then Qwen2-VL's added tokens at the top of the
  vocabulary (`added_token_ids`). Unused slots (a small corpus gives fewer merges) are filler tokens."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

  regular = vocab_size - len(QWEN2_VL_ADDED)
  if regular < 256:
    raise ValueError(f"vocab_size {vocab_size}: a byte-level BPE needs at least {256 + len(QWEN2_VL_ADDED)}")
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.add_tokens([f"<|filler_{i}|>" for i in range(regular - tok.get_vocab_size())])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_ADDED])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return path

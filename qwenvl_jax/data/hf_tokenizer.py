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

from qwenvl_jax.data.special_tokens import ENDOFTEXT, IM_END, IM_START, TokenizerError

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
REQUIRED = (ENDOFTEXT, IM_START, IM_END)
GROUNDING_TOKENS = (OBJECT_REF_START, OBJECT_REF_END, BOX_START, BOX_END)


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
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

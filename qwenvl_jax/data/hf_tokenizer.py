"""A Hugging Face `tokenizer.json` (Qwen2 / Qwen2-VL byte-level BPE) through the `tokenizers` library.

Special tokens and their ids come from the file's added tokens. `encode` treats every character of its text as
text: a user typing `<|im_start|>` or `<|image_pad|>` gets the ids of those characters, never the special id (so a
prompt cannot forge turns or image slots); formatters insert special ids themselves (`special_id`).

    tok = HFTokenizer("Qwen2-VL-7B-Instruct/tokenizer.json")
    ids = [tok.im_start_id] + tok.encode("user\\nhi") + [tok.im_end_id]
    text = tok.decode(ids)
"""

from __future__ import annotations

import os

from qwenvl_jax.data.tokenizer import ENDOFTEXT, IM_END, IM_START, TokenizerError


class HFTokenizer:
  """The interface the chat and evaluation code use: encode / decode, vocab_size, special ids."""

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
    # special tokens are matched only when placed by a formatter: user text encodes as text
    self._tok.encode_special_tokens = True
    self.special_ids = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if t not in self.special_ids]
    if missing:
      raise TokenizerError(f"{path}: special tokens {missing} missing")
    self.eod_id, self.im_start_id, self.im_end_id = (self.special_ids[t] for t in (ENDOFTEXT, IM_START, IM_END))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def special_id(self, token: str) -> int:
    if token not in self.special_ids:
      raise TokenizerError(f"{self.path}: no special token {token}")
    return self.special_ids[token]

  def encode(self, text: str) -> list[int]:
    """Text -> ids; special-token surface forms in `text` stay text."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

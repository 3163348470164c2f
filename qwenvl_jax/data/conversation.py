"""ChatML conversations, the pre-training form, and loss masks as in the official Qwen-VL finetune recipe.

A sample becomes `ids` plus `loss_mask` (1 = this token is a training target, i.e. it is predicted from the
tokens before it). Chat samples (stages 2-3):

    <|im_start|>system\\n{system}<|im_end|>\\n            targets: <|im_start|>, <|im_end|>, \\n
    <|im_start|>user\\n{content}<|im_end|>\\n             targets: <|im_start|>, <|im_end|>, \\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n        targets: <|im_start|>, {content}, <|im_end|>, \\n

Every piece is tokenised on its own (role, "\\n", content), exactly as the official recipe does, so the ids match
what the released models were trained on; one deliberate difference: ChatML tokens and `<|endoftext|>` written
inside content are encoded as text, not as the special ids (image and grounding tags stay markup). Pre-training
samples (stage 1): `<img>ref</img>{caption}<|endoftext|>` with the caption and `<|endoftext|>` as targets. Images
are written `Picture N: <img>ref</img>\\n` in user turns.
"""

from __future__ import annotations

import dataclasses
import re
import weakref

import numpy as np

from qwenvl_jax.data.hf_tokenizer import GROUNDING_TOKENS
from qwenvl_jax.data.special_tokens import TokenizerError, check_unicode
from qwenvl_jax.data.tokenizer import ENDOFTEXT, IM_END, IM_START, IMAGE_ST, Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
CONTENT_SPECIAL = frozenset(IMAGE_ST)  # special forms that are markup inside turn content (images, grounding)
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class FormatError(ValueError):
  """A sample that cannot be formatted (unknown role, empty conversation, ...)."""


@dataclasses.dataclass
class Tokenized:
  ids: list[int]
  loss_mask: list[int]


_WORDLIKE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {id: whether it is word-like}


def answer_mask(tok, ids, loss_mask) -> np.ndarray:
  """1 where a target token belongs to an answer's words or numbers, else 0: the tokens a model can only predict by
  looking (or reasoning), without the structure every answer of a task shares and that any model learns at once
  (special ids such as <|im_end|>, <|endoftext|>, <ref>, <box>; pieces without a letter or digit, e.g. "(", ",").
  Per-task accuracy and loss over these tokens show whether a task is learned; over all targets they would not."""
  cache = _WORDLIKE.setdefault(tok, {})
  special = set(tok.special_ids.values())
  out = np.zeros(len(ids), np.int32)
  for k, (i, m) in enumerate(zip(ids, loss_mask)):
    if m:
      i = int(i)
      if i not in cache:
        cache[i] = i not in special and any(ch.isalnum() for ch in tok.decode([i]))
      out[k] = cache[i]
  return out


def image_prompt(refs, start: int = 0) -> str:
  """'Picture 1: <img>a.png</img>\\nPicture 2: <img>b.png</img>\\n' for the given image references, numbered
  after `start` images already in the conversation."""
  return "".join(f"Picture {start + i + 1}: <img>{r}</img>\n" for i, r in enumerate(refs))


def video_prompt(refs, start: int = 0) -> str:
  """'Video 1: <video>ref</video>\\n' for each video reference, numbered after `start` videos (Qwen2-VL chat)."""
  return "".join(f"Video {start + i + 1}: <video>{r}</video>\n" for i, r in enumerate(refs))


# one line as image_prompt / video_prompt write it; a reference never holds its closing tag
_MEDIA_LINE = re.compile(r"Picture \d+: <img>((?:(?!</img>).)*)</img>\n"
                         r"|Video \d+: <video>((?:(?!</video>).)*)</video>\n", re.S)


def split_media_prefix(query: str) -> tuple[list[tuple[str, str]], str]:
  """'Picture 1: <img>a.png</img>\\nVideo 1: <video>v</video>\\nquestion' -> ([('image', 'a.png'), ('video', 'v')],
  'question'): the images and videos a chat turn starts with (as `image_prompt` / `video_prompt` write them), in
  order, and the text after them. Tags later in the text stay text."""
  media, end = [], 0
  while m := _MEDIA_LINE.match(query, end):
    media.append(("image", m.group(1)) if m.group(1) is not None else ("video", m.group(2)))
    end = m.end()
  return media, query[end:]


def normalize_roles(conversations, where: str = "sample") -> list[tuple[str, str]]:
  """[{'from': ..., 'value': ...}] -> [(role, text)] with roles 'user' | 'assistant'."""
  out = []
  for k, turn in enumerate(conversations):
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
      raise FormatError(f"{where}: turn {k} is not an object with 'from' and 'value'")
    role = ROLE_ALIASES.get(str(turn["from"]).lower())
    if role is None:
      raise FormatError(f"{where}: unknown role {turn['from']!r} in turn {k} (expected user or assistant)")
    if not isinstance(turn["value"], str):
      raise FormatError(f"{where}: turn {k} value is not a string")
    try:
      check_unicode(turn["value"])
    except TokenizerError as e:
      raise FormatError(f"{where}: turn {k}: {e}") from None
    out.append((role, turn["value"]))
  if out and out[0][0] != "user":  # as the official recipe: a leading non-user turn is dropped
    out = out[1:]
  if not out:
    raise FormatError(f"{where}: empty conversation")
  return out


def format_chat(tok: Tokenizer, conversations, system: str = DEFAULT_SYSTEM, where: str = "sample") -> Tokenized:
  """Official finetune layout and targets for a conversation in the official JSON format."""
  nl = tok.encode("\n")
  ids = [tok.im_start_id] + tok.encode("system") + nl + tok.encode(system) + [tok.im_end_id] + nl
  mask = [1] + [0] * (len(ids) - 3) + [1] * (1 + len(nl))
  for role, text in normalize_roles(conversations, where):
    role_ids = tok.encode(IM_START + role)  # [<|im_start|>, role]
    # content: image and grounding tags are markup; ChatML and <|endoftext|> written in the text stay text, so
    # a turn cannot open another turn (the official code would read them as the special ids)
    content = tok.encode(text, allowed_special=CONTENT_SPECIAL)
    turn = role_ids + nl + content + [tok.im_end_id] + nl
    if role == "user":
      turn_mask = [1] + [0] * (len(turn) - 1 - 1 - len(nl)) + [1] * (1 + len(nl))
    else:
      turn_mask = [1] + [0] * (len(role_ids) - 1 + len(nl)) + [1] * (len(content) + 1 + len(nl))
    ids += turn
    mask += turn_mask
  return Tokenized(ids, mask)


def format_pretrain(tok: Tokenizer, image_refs, caption: str) -> Tokenized:
  """Stage-1 form: `<img>ref</img>...caption<|endoftext|>`; targets are the caption and <|endoftext|>."""
  ids: list[int] = []
  for ref in image_refs:
    ids += tok.image_ids(ref)
  prefix = len(ids)
  ids += tok.encode(caption, allowed_special=CONTENT_SPECIAL) + [tok.eod_id]
  return Tokenized(ids, [0] * prefix + [1] * (len(ids) - prefix))


def format_text(tok: Tokenizer, text: str) -> Tokenized:
  """A plain text document: every token and <|endoftext|> are targets."""
  ids = tok.encode(text, allowed_special=CONTENT_SPECIAL) + [tok.eod_id]
  return Tokenized(ids, [1] * len(ids))


def make_context(tok: Tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM,
                 max_window_size: int = 6144) -> tuple[str, list[int]]:
  """Inference prompt of the official chat: (raw text, ids), keeping the newest history that fits."""
  history = history or []
  nl = tok.encode("\n")
  image_st = set(IMAGE_ST)

  def turn(role, content):
    return f"{role}\n{content}", tok.encode(role, allowed_special=image_st) + nl + tok.encode(content, image_st)

  system_text, system_part = turn("system", system)
  system_ids = [tok.im_start_id] + system_part + [tok.im_end_id]
  raw, context = "", []
  for q, r in reversed(history):
    q_text, q_part = turn("user", q)
    q_ids = [tok.im_start_id] + q_part + [tok.im_end_id]
    if r is not None:
      r_text, r_part = turn("assistant", r)
      nxt = nl + q_ids + nl + [tok.im_start_id] + r_part + [tok.im_end_id]
      chat = f"\n{IM_START}{q_text}{IM_END}\n{IM_START}{r_text}{IM_END}"
    else:
      nxt = nl + q_ids + nl
      chat = f"\n{IM_START}{q_text}{IM_END}\n"
    if len(system_ids) + len(nxt) + len(context) >= max_window_size:
      break
    context = nxt + context
    raw = chat + raw
  ids = system_ids + context + nl + [tok.im_start_id] + turn("user", query)[1] + [tok.im_end_id] + nl
  ids += [tok.im_start_id] + tok.encode("assistant") + nl
  raw = f"{IM_START}{system_text}{IM_END}" + raw + f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
  return raw, ids


def chatml_ids(tok, turns, system: str = DEFAULT_SYSTEM, answer_special=GROUNDING_TOKENS) -> list[int]:
  """ChatML prompt ids for the families whose images are placeholder blocks (Qwen2-VL):

      <|im_start|>system\\n{system}<|im_end|>\\n
      <|im_start|>user\\n{vision block}...{text}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n   (history)
      <|im_start|>user\\n{vision block}...{text}<|im_end|>\\n<|im_start|>assistant\\n                     (the ask)

  turns: [(parts, answer)], parts a list of text (encoded as text: special-looking characters stay characters) and
  id lists (vision blocks, inserted as given); answer None for the turn being asked (the last). In answers (what
  the model wrote) the grounding tags `answer_special` are their special ids again, as the model produced them;
  nothing else is. Text between two special tokens is encoded as one piece, as the chat template's string is.
  """
  return _chatml(tok, turns, system, answer_special, training=False).ids


def chatml_sample(tok, turns, system: str = DEFAULT_SYSTEM, answer_special=GROUNDING_TOKENS) -> Tokenized:
  """A whole conversation (every turn answered) as a training sample in the layout of `chatml_ids`, with the
  targets of Qwen2-VL fine-tuning: each answer's tokens and its `<|im_end|>` (what the model must write, and
  where it must stop); the system prompt, user turns, vision blocks, the `<|im_start|>assistant\\n` headers and
  the newlines between turns are context only. Answers are encoded on their own (not joined with the header
  before them) so the target boundary falls between tokens."""
  if any(answer is None for _, answer in turns):
    raise FormatError("a training conversation needs an answer after every user turn")
  return _chatml(tok, turns, system, answer_special, training=True)


def _chatml(tok, turns, system, answer_special, training: bool) -> Tokenized:
  trusted = {t for t in answer_special if t in tok.special_ids}
  pieces: list = [[tok.im_start_id], ("system\n" + system, False), [tok.im_end_id], ("\n", False)]
  for parts, answer in turns:
    pieces += [[tok.im_start_id], ("user\n", False), *((p, False) if isinstance(p, str) else list(p) for p in parts),
               [tok.im_end_id], ("\n", False), [tok.im_start_id], ("assistant\n", False)]
    if answer is not None:
      pieces += [(answer, True), [tok.im_end_id], ("\n", False)]
  ids: list[int] = []
  mask: list[int] = []
  text, grounded, target = "", False, False

  def flush():
    nonlocal text, grounded
    if text:
      new = tok.encode(text, allowed_special=trusted if grounded else set())
      ids.extend(new)
      mask.extend([int(grounded and training)] * len(new))
      text, grounded = "", False

  for p in pieces + [[]]:
    if isinstance(p, tuple):  # text; at inference an answer joins the formatter's own "assistant\n" before it
      if training and p[1]:
        flush()
      text, grounded = text + p[0], grounded or p[1]
      continue
    target = grounded and training  # the <|im_end|> right after an answer is a target too
    flush()
    ids += [int(i) for i in p]
    mask += [int(target)] * len(p)
  return Tokenized(ids, mask)


__all__ = ["DEFAULT_SYSTEM", "ENDOFTEXT", "FormatError", "Tokenized", "answer_mask", "chatml_ids", "chatml_sample", "format_chat",
           "format_pretrain", "format_text", "image_prompt", "make_context", "normalize_roles", "split_media_prefix",
           "video_prompt"]

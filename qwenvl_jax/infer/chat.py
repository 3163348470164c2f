"""Chat as the released chat models do it, for every family: ChatML with the default system prompt and multi-turn
history, greedy or sampled generation until <|im_end|> / <|endoftext|>.

  * Qwen-VL: the official prompt, images as `Picture N: <img>ref</img>\\n` before the question.
  * Qwen2-VL: the chat template's layout, each image as `<|vision_start|>`, one `<|image_pad|>` per visual token of
    its grid (from the model's processor), `<|vision_end|>`, before the question (videos likewise, with
    `<|video_pad|>`); ids from config.json. User text is encoded as text (special-looking characters included).
  * InternVL: the same ChatML layout, each image as `<img>`, 256 `<IMG_CONTEXT>` per tile of its dynamic tiling
    (thumbnail included), `</img>`, then a newline, before the question (the transformers-native chat template's
    `<IMG_CONTEXT>\n` as its processor expands it); images only.

In the returned history a turn's images are written `Picture N: <img>ref</img>\\n` before its question, for both
families (Qwen2-VL videos `Video N: <video>ref</video>\\n`), so a later turn can feed them again.

    response, history = chat(model, tokenizer, "What is in the picture?", images=["cat.png"])
    response, history = chat(model, tokenizer, "Where is the cat?", history=history)
"""

from __future__ import annotations

import re

import numpy as np

from qwenvl_jax.data.conversation import (
  DEFAULT_SYSTEM,
  chatml_ids,
  image_prompt,
  make_context,
  split_media_prefix,
  video_prompt,
)

_IMG = re.compile(r"<img>(.*?)</img>", re.S)
_VID = re.compile(r"<video>(.*?)</video>", re.S)
_FRAME_SEP = "|"  # between the frame paths of a video reference


def _refs(images, offset: int) -> tuple[list[str], dict]:
  """Image arguments -> references for the prompt (paths stay paths; in-memory images get names)."""
  refs, objects = [], {}
  for k, img in enumerate(images or []):
    if isinstance(img, str):
      refs.append(img)
    else:
      name = f"image_{offset + k}"
      refs.append(name)
      objects[name] = img
  return refs, objects


def _span_prompt(model, tokenizer, query, history, system, known, trusted) -> tuple[list[int], dict]:
  """Qwen-VL: the official prompt; every image of the conversation, in order, as pixel_values (as the official chat,
  an `<img>ref</img>` anywhere in a turn is an image; grounding tags in text are the tokenizer's, trusted or not)."""
  del trusted
  _, ids = make_context(tokenizer, query, history, system)
  all_refs = [r for q, _ in history for r in _IMG.findall(q)] + _IMG.findall(query)
  proc = model.processor()
  pixels = np.stack([proc.preprocess(known.get(r, r), name=r) for r in all_refs]) if all_refs else None
  return ids, {"pixel_values": pixels}


def _placeholder_prompt(model, tokenizer, query, history, system, known, trusted) -> tuple[list[int], dict]:
  """Qwen2-VL and InternVL: ChatML with a placeholder block per image / video (the family's `prompt_media`: its
  prompt parts and arrays); the arrays of every image and video of the conversation, each kind in prompt order. User text is
  text, except that `trusted` text (a data file's) has its grounding tags as the grounding tokens, as in training
  (families that define `trusted_text_parts`)."""
  cfg, proc, inputs = model.config, model.processor(), model.family.inputs
  inputs.check_tokenizer(cfg, tokenizer)
  turns, arrays = [], {}
  for q, answer in list(history) + [(query, None)]:
    media, text = split_media_prefix(q)
    parts: list = []
    for kind, ref in media:
      src = known[ref] if ref in known else (ref.split(_FRAME_SEP) if kind == "video" else ref)
      media_parts, got = inputs.prompt_media(cfg, proc, kind, src, name=ref)
      parts += media_parts
      for k, v in got.items():
        arrays.setdefault(k, []).append(v)
    trusted_parts = getattr(inputs, "trusted_text_parts", None)
    turns.append((parts + (trusted_parts(tokenizer, text) if trusted and trusted_parts else [text]), answer))
  return chatml_ids(tokenizer, turns, system), {k: np.concatenate(v) for k, v in arrays.items()}


def _video_refs(videos, offset: int) -> tuple[list[str], dict]:
  """Video arguments (frame lists) -> references: frame paths joined by '|'; in-memory frames get a name."""
  refs, objects = [], {}
  for k, frames in enumerate(videos or []):
    frames = list(frames)
    if frames and all(isinstance(f, str) for f in frames):
      bad = [f for f in frames if _FRAME_SEP in f or "</video>" in f]
      if bad:
        raise ValueError(f"video frame path {bad[0]!r} holds '{_FRAME_SEP}' or '</video>'; pass the frame as an image")
      refs.append(_FRAME_SEP.join(frames))
    else:
      name = f"video_{offset + k}"
      refs.append(name)
      objects[name] = frames
  return refs, objects


_BUILDERS = {"qwen_vl": _span_prompt, "qwen2_vl": _placeholder_prompt, "internvl": _placeholder_prompt}


def prompt_inputs(model, tokenizer, query: str, history=(), system: str = DEFAULT_SYSTEM, media=None,
                  trusted: bool = False) -> tuple[list[int], dict]:
  """The family's prompt for `query` after `history` -> (ids, vision inputs of `model.generate`). Image and video
  references in the turns (`<img>ref</img>`, `<video>ref</video>`) are looked up in `media` (name -> image,
  frames or video file), else read as paths."""
  family = model.family.name
  if family not in _BUILDERS:
    raise ValueError(f"chat does not support the {family} family")
  return _BUILDERS[family](model, tokenizer, query, list(history), system, dict(media or {}), trusted)


def generate_answers(model, tokenizer, prompts, max_new_tokens: int = 512, **generate_kw) -> list[str]:
  """Answers to several `prompt_inputs` in one batched `generate` call (rows padded, each row's own images); only
  ids the tokenizer has are generated."""
  vision: dict = {}
  for _, row_vision in prompts:
    for k, v in row_vision.items():
      if v is not None:
        vision.setdefault(k, []).append(v)
  vision = {k: np.concatenate(v) for k, v in vision.items()}
  s = max(len(ids) for ids, _ in prompts)
  ids = np.zeros((len(prompts), s), np.int64)
  mask = np.zeros((len(prompts), s), np.int32)
  for i, (row, _) in enumerate(prompts):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  stops = [tokenizer.im_end_id, tokenizer.eod_id]
  generate_kw.setdefault("vocab_limit", tokenizer.vocab_size)
  out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, stop_ids=stops, **vision,
                       **generate_kw)
  return [decode_answer(tokenizer, row, stops) for row in out[:, s:]]


def chat(model, tokenizer, query: str, history=None, images=None, system: str = DEFAULT_SYSTEM,
         max_new_tokens: int = 512, image_objects: dict | None = None, videos=None,
         **generate_kw) -> tuple[str, list]:
  """-> (response, history + [(query_with_images, response)]). `images` (paths or PIL images) are shown before
  the query; images already in the history are fed again, in order, as the official chat does. `videos`
  (Qwen2-VL): a list of videos, each a list of frames (paths or PIL images; sample them first), shown after the
  images as `Video N: <video>ref</video>\\n`. In-memory images and videos are named `image_K` / `video_K` in the
  history; a later turn feeds them again when `image_objects` maps those names to them."""
  if videos and model.family.name != "qwen2_vl":
    raise ValueError(f"{model.family.name} takes no video input")
  history = list(history or [])
  known = dict(image_objects or {})
  n_before = sum(len(_IMG.findall(q)) for q, _ in history)
  refs, objects = _refs(images, n_before)
  known.update(objects)
  n_videos = sum(len(_VID.findall(q)) for q, _ in history)
  video_refs, objects = _video_refs(videos, n_videos)
  known.update(objects)
  if refs or video_refs:
    query = image_prompt(refs, n_before) + video_prompt(video_refs, n_videos) + query
  prompt = prompt_inputs(model, tokenizer, query, history, system, known)
  response, = generate_answers(model, tokenizer, [prompt], max_new_tokens, **generate_kw)
  history.append((query, response))
  return response, history


def decode_answer(tokenizer, new_ids, stops) -> str:
  """Generated ids -> text, up to the first stop id."""
  new = [int(t) for t in new_ids]
  cut = next((k for k, t in enumerate(new) if t in stops), len(new))
  return tokenizer.decode(new[:cut])


def chat_batch(model, tokenizer, queries, images=None, system: str = DEFAULT_SYSTEM, max_new_tokens: int = 512,
               **generate_kw) -> list[str]:
  """First-turn answers to several queries in one batched `generate` call (rows padded, each row's own images).
  images: None or one list of images (paths or PIL images) per query."""
  images = list(images) if images is not None else [None] * len(queries)
  if len(images) != len(queries):
    raise ValueError(f"{len(queries)} queries but {len(images)} image lists")
  prompts = []
  for query, imgs in zip(queries, images):
    refs, known = _refs(imgs, 0)
    prompts.append(prompt_inputs(model, tokenizer, image_prompt(refs) + query, (), system, known))
  return generate_answers(model, tokenizer, prompts, max_new_tokens, **generate_kw)

"""Chat as the released chat models do it, for every family: ChatML with the default system prompt and multi-turn
history, greedy or sampled generation until <|im_end|> / <|endoftext|>.

  * Qwen-VL: the official prompt, images as `Picture N: <img>ref</img>\\n` before the question.
  * Qwen2-VL: the chat template's layout, each image as `<|vision_start|>`, one `<|image_pad|>` per visual token of
    its grid (from the model's processor), `<|vision_end|>`, before the question; ids from config.json.

In the returned history a turn's images are written `Picture N: <img>ref</img>\\n` before its question (for both
families), so a later turn can feed them again.

    response, history = chat(model, tokenizer, "What is in the picture?", images=["cat.png"])
    response, history = chat(model, tokenizer, "Where is the cat?", history=history)
"""

from __future__ import annotations

import re

import numpy as np

from qwenvl_jax.data.conversation import DEFAULT_SYSTEM, chatml_ids, image_prompt, make_context, split_image_prefix

_IMG = re.compile(r"<img>(.*?)</img>", re.S)


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


def _span_prompt(model, tokenizer, query, history, system, known) -> tuple[list[int], dict]:
  """Qwen-VL: the official prompt; every image of the conversation, in order, as pixel_values (as the official chat,
  an `<img>ref</img>` anywhere in a turn is an image)."""
  _, ids = make_context(tokenizer, query, history, system)
  all_refs = [r for q, _ in history for r in _IMG.findall(q)] + _IMG.findall(query)
  proc = model.processor()
  pixels = np.stack([proc.preprocess(known.get(r, r), name=r) for r in all_refs]) if all_refs else None
  return ids, {"pixel_values": pixels}


def _placeholder_prompt(model, tokenizer, query, history, system, known) -> tuple[list[int], dict]:
  """Qwen2-VL: ChatML with a placeholder block per image; patches and grids of every image, in order."""
  proc, turns, patches, grids = model.processor(), [], [], []
  for q, answer in list(history) + [(query, None)]:
    refs, text = split_image_prefix(q)
    parts: list = []
    for r in refs:
      p, grid = proc.preprocess_image(known.get(r, r), name=r)
      patches.append(p)
      grids.append(grid)
      parts.append(model.family.inputs.vision_block(model.config, proc.tokens(grid)))
    turns.append((parts + [text], answer))
  vision = {"pixel_values": np.concatenate(patches), "image_grid_thw": np.stack(grids)} if patches else {}
  return chatml_ids(tokenizer, turns, system), vision


def chat(model, tokenizer, query: str, history=None, images=None, system: str = DEFAULT_SYSTEM,
         max_new_tokens: int = 512, image_objects: dict | None = None, **generate_kw) -> tuple[str, list]:
  """-> (response, history + [(query_with_images, response)]). `images` (paths or PIL images) are shown before
  the query; images already in the history are fed again, in order, as the official chat does."""
  history = list(history or [])
  known = dict(image_objects or {})
  n_before = sum(len(_IMG.findall(q)) for q, _ in history)
  refs, objects = _refs(images, n_before)
  known.update(objects)
  if refs:
    query = image_prompt(refs, n_before) + query
  build = _span_prompt if model.family.name == "qwen_vl" else _placeholder_prompt
  ids, vision = build(model, tokenizer, query, history, system, known)
  stops = [tokenizer.im_end_id, tokenizer.eod_id]
  out = model.generate(np.asarray([ids]), max_new_tokens=max_new_tokens, stop_ids=stops, **vision, **generate_kw)
  new = [int(t) for t in out[0, len(ids):]]
  for k, t in enumerate(new):
    if t in stops:
      new = new[:k]
      break
  response = tokenizer.decode(new)
  history.append((query, response))
  return response, history

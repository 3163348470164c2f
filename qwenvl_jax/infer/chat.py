"""Chat as the official Qwen-VL-Chat does it: ChatML prompt (default system prompt, multi-turn history, images as
`Picture N: <img>ref</img>\\n`), greedy or sampled generation until <|im_end|> / <|endoftext|>.

    response, history = chat(model, tokenizer, "What is in the picture?", images=["cat.png"])
    response, history = chat(model, tokenizer, "Where is the cat?", history=history)
"""

from __future__ import annotations

import re

import numpy as np

from qwenvl_jax.data.conversation import DEFAULT_SYSTEM, image_prompt, make_context

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


def chat(model, tokenizer, query: str, history=None, images=None, system: str = DEFAULT_SYSTEM,
         max_new_tokens: int = 512, image_objects: dict | None = None, **generate_kw) -> tuple[str, list]:
  """-> (response, history + [(query_with_images, response)]). `images` (paths or PIL images) are shown before
  the query as `Picture N:`; images already in the history are fed again, in order, as the official chat does."""
  history = list(history or [])
  known = dict(image_objects or {})
  n_before = sum(len(_IMG.findall(q)) for q, _ in history)
  refs, objects = _refs(images, n_before)
  known.update(objects)
  if refs:
    query = image_prompt(refs, n_before) + query
  _, ids = make_context(tokenizer, query, history, system)
  all_refs = [r for q, _ in history for r in _IMG.findall(q)] + _IMG.findall(query)
  proc = model.processor()
  pixels = np.stack([proc.preprocess(known.get(r, r), name=r) for r in all_refs]) if all_refs else None
  stops = [tokenizer.im_end_id, tokenizer.eod_id]
  out = model.generate(np.asarray([ids]), pixel_values=pixels, max_new_tokens=max_new_tokens, stop_ids=stops,
                       **generate_kw)
  new = [int(t) for t in out[0, len(ids):]]
  for k, t in enumerate(new):
    if t in stops:
      new = new[:k]
      break
  response = tokenizer.decode(new)
  history.append((query, response))
  return response, history

"""Zero-shot evaluation of a contrastive stage: image <-> text retrieval and classification over the shapes classes.

    metrics = evaluate_contrastive(model, head, params, tokenizer, image_fn, source, text_len=32)

Retrieval: the split's image-caption pairs (a record's only image and its last answer: `data.pairs.record_pair`),
every image against every caption, recall@1 and @5 both ways; a hit is an item whose caption equals the partner's
(captions repeat), with the matching chance level. Classification (shapes only): images of one object, each scored
against the 18 prompts "a {colour} {shape}." (the captions' own wording); chance 1/18. Records that are not pairs or
cannot be read are counted and skipped.
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

from qwenvl_jax.data.images import ImageError
from qwenvl_jax.data.pairs import IMAGE_PREFIX, caption_ids, record_pair
from qwenvl_jax.data.shapes import COLOR_NAMES, SHAPES
from qwenvl_jax.train.contrastive import image_embeddings, retrieval_recall, text_embeddings, zero_shot_accuracy

log = logging.getLogger("qwenvl_jax.evals")
CLASS_PROMPTS = tuple((f"a {color} {shape}.", (color, shape)) for color in COLOR_NAMES for shape in SHAPES)


def _batches(items, size):
  for start in range(0, len(items), size):
    yield items[start:start + size]


def evaluate_contrastive(model, head, params, tokenizer, image_fn, source, text_len: int = 32,
                         max_examples: int | None = None, batch_size: int = 32) -> dict:
  """-> {"n", "skipped", retrieval recalls and chance levels, "zero_shot_accuracy" / "zero_shot_chance" /
  "zero_shot_n" when the records carry shapes objects}."""
  n = len(source) if max_examples is None else min(max_examples, len(source))
  embed_images = jax.jit(functools.partial(image_embeddings, model, head))
  embed_texts = jax.jit(functools.partial(text_embeddings, model, head))
  pairs, labels, skipped = [], [], 0
  for i in range(n):
    try:
      record = source[i]
      pair = record_pair(record)
      if pair is None:
        skipped += 1
        continue
      image, caption, ref = pair
      arrays = image_fn(image, name=f"{record.get('id', i)}:{ref}")
    except (ImageError, ValueError, KeyError) as e:
      log.warning("contrastive eval: skipping record %d: %s", i, " ".join(str(e).split())[:200])
      skipped += 1
      continue
    objects = (record.get("objects") or [[]])[0]
    labels.append((objects[0]["color"], objects[0]["shape"]) if len(objects) == 1 and "color" in objects[0] else None)
    pairs.append((arrays, caption))
  if not pairs:
    raise ValueError(f"no image-caption pair among the {n} records evaluated")

  def texts(captions):
    rows = [caption_ids(tokenizer, c, text_len) for c in captions]
    out = [np.asarray(embed_texts(params, np.stack([r[0] for r in chunk]), np.stack([r[1] for r in chunk])))
           for chunk in _batches(rows, batch_size)]
    return np.concatenate(out)

  img = np.concatenate([np.asarray(embed_images(params, {IMAGE_PREFIX + k: np.stack([a[k] for a, _ in chunk])
                                                         for k in chunk[0][0]}))
                        for chunk in _batches(pairs, batch_size)])
  captions = [c for _, c in pairs]
  metrics = {"n": len(pairs), "skipped": skipped, **retrieval_recall(img, texts(captions), captions)}
  single = [k for k, label in enumerate(labels) if label is not None]
  if single:
    classes = [label for _, label in CLASS_PROMPTS]
    targets = np.asarray([classes.index(labels[k]) for k in single])
    metrics.update(zero_shot_accuracy=zero_shot_accuracy(img[single], texts([p for p, _ in CLASS_PROMPTS]), targets),
                   zero_shot_chance=1 / len(CLASS_PROMPTS), zero_shot_n=len(single))
  return metrics

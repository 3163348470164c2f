"""Image-text pairs for the contrastive stage: records with one image and an answer (a caption) -> fixed-shape rows.

    image/<arg>  [B, ...]  the image as the family's `pooled_vit` takes it (an `image_fn` handed in by the trainer:
                           data/ knows no family)
    text_ids     [B, T] int32   the caption's tokens, then the end-of-text id, then padding (0)
    text_mask    [B, T] int32   1 = real token

A pair is a record's only image and its last answer (shapes' caption task; a finetune JSONL with one image per
record). Records with no image or several, or no answer, are skipped and counted ("not_a_pair"); unreadable images
and captions are skipped and counted like the generative pipeline's (`pipeline.SampleEncoder`). Captions longer than
T - 1 tokens are cut (counted "truncated"). Same shuffling, host sharding and checkpointable iterator state as the
generative pipeline (`pipeline.encoded_samples`).
"""

from __future__ import annotations

from typing import Callable

import grain
import numpy as np

from qwenvl_jax.data.conversation import FormatError, normalize_roles
from qwenvl_jax.data.images import ImageError
from qwenvl_jax.data.jsonl import image_refs
from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder, encoded_samples, has_video
from qwenvl_jax.data.tokenizer import TokenizerError

IMAGE_PREFIX = "image/"


def record_pair(record: dict) -> tuple[object, str, str] | None:
  """(image, caption, image reference) of a record with exactly one image and an answer, else None."""
  if "conversations" not in record or has_video(record):
    return None
  refs = image_refs(record["conversations"])
  if len(refs) != 1:
    return None
  answers = [text for role, text in normalize_roles(record["conversations"]) if role == "assistant"]
  if not answers or not answers[-1].strip():
    return None
  return record["images"][refs[0]], answers[-1].strip(), refs[0]


def caption_ids(tokenizer, caption: str, text_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """-> (ids [T] int32, mask [T] int32, truncated): the caption's tokens, the end-of-text id, padding."""
  ids = list(tokenizer.encode(caption, allowed_special=()))
  cut = len(ids) > text_len - 1
  ids = ids[:text_len - 1] + [tokenizer.eod_id]
  out, mask = np.zeros(text_len, np.int32), np.zeros(text_len, np.int32)
  out[:len(ids)], mask[:len(ids)] = ids, 1
  return out, mask, cut


class PairEncoder(SampleEncoder):
  """record -> {'image/<arg>': ..., 'text_ids': [T], 'text_mask': [T]} or None (skipped, counted)."""

  def __init__(self, tokenizer, cfg: DataConfig, image_fn: Callable[..., dict], text_len: int):
    super().__init__(tokenizer, cfg)
    if text_len < 2:
      raise ValueError(f"text_len {text_len}: a caption needs at least one token and the end-of-text id")
    self.image_fn, self.text_len = image_fn, text_len

  def __call__(self, record: dict):
    where = record.get("source") or record.get("id", "?")
    try:
      pair = record_pair(record)
      if pair is None:
        self._count("not_a_pair")
        return None
      image, caption, ref = pair
      ids, mask, cut = caption_ids(self.tok, caption, self.text_len)
      arrays = self.image_fn(image, name=f"{where}:{ref}")
    except (ImageError, FormatError, TokenizerError, KeyError) as e:
      if self.cfg.strict:
        raise
      kind = "bad_image" if isinstance(e, (ImageError, KeyError)) else "bad_record"
      self._count(kind, record, str(e) if not isinstance(e, KeyError) else f"no image named {e}")
      return None
    if cut:
      self._count("truncated")
    self._count("ok")
    return {**{IMAGE_PREFIX + k: np.asarray(v) for k, v in arrays.items()}, "text_ids": ids, "text_mask": mask}


def build_pair_dataset(source, encoder: PairEncoder, cfg: DataConfig, *, seed: int = 0,
                       num_epochs: int | None = 1, shuffle: bool = True, **kw) -> grain.IterDataset:
  """Pairs of `source` as batches of `cfg.batch_size` rows (an IterDataset with a checkpointable iterator)."""
  it = encoded_samples(source, encoder, cfg, seed=seed, num_epochs=num_epochs, shuffle=shuffle, **kw)
  return it.batch(cfg.batch_size, drop_remainder=True)

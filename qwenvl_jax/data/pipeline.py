"""The Grain input pipeline: source -> seeded shuffle -> per-host shard -> encode -> pack (packing.py) -> batch.

Records (the common format of `qwenvl_jax.data.shapes` / `jsonl` / `tfds_sources`) are encoded into token ids,
a loss mask, a task id per token and preprocessed images; several samples are packed first-fit into rows of
`seq_len` tokens with at most `max_images` image slots, so every batch has static shapes:

    input_ids    [B, L] int32     segment_ids  [B, L] int32 (0 = padding; no attention across segments)
    positions    [B, L] int32     loss_mask    [B, L] int32 (1 = token is a target)
    task_ids     [B, L] int32 (index into `task_names` + 1 on a record's answer tokens, `answer_mask`; 0 = other)
    pixel_values [B, M, 3, S, S] float32 (row b's k-th <img> span takes slot k)    image_mask [B, M] bool

Samples that fail (unreadable image, too long under the 'drop' policy, too many images, a video: fixed image spans
cannot hold one) are skipped with a warning naming the record (the first 20 of each kind) and counted;
`strict=True` raises instead. Counts are logged after each epoch's worth of samples and at the end of the data; an
epoch without one usable sample raises `NoUsableData` (a run on such data would otherwise wait forever).
The iterator state is checkpointable (`get_state` / `set_state`). Families whose images keep their own resolution
(Qwen2-VL) bring their own sample encoder and pack on two budgets (`build_patch_dataset`, `patch_packing.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import threading

import grain
import jax
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from qwenvl_jax.data.conversation import (
  DEFAULT_SYSTEM,
  FormatError,
  Tokenized,
  answer_mask,
  format_chat,
  format_pretrain,
  format_text,
)
from qwenvl_jax.data.images import ImageError, preprocess_image
from qwenvl_jax.data.jsonl import image_refs
from qwenvl_jax.data.packing import WindowPackIterDataset
from qwenvl_jax.data.patch_packing import PatchPackIterDataset
from qwenvl_jax.data.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger("qwenvl_jax.data")
PACKERS = ("window", "first_fit")
WARNINGS_SHOWN = 20  # skip warnings of one kind logged per run before only the epoch counts are


class NoUsableData(ValueError):
  """A whole pass over the records gave no usable sample: every later pass would give none either."""
_VIDEO_REF = re.compile(r"<video>.*?</video>", re.S)


def has_video(record: dict) -> bool:
  """Whether a record holds or names a video (`videos` entries, or a `<video>..</video>` reference in a turn)."""
  if record.get("videos"):
    return True
  turns = record.get("conversations") or ()
  return any(isinstance(t, dict) and _VIDEO_REF.search(str(t.get("value", ""))) for t in turns)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  seq_len: int = 2048             # packed row length (512 in stage 1, 2048 in stages 2-3)
  max_images: int = 8             # image slots per packed row
  image_size: int = 448           # 224 in stage 1, 448 in stages 2-3
  batch_size: int = 8             # per host
  mode: str = "chat"              # chat (ChatML, stages 2-3) | pretrain (<img>..</img>caption<|endoftext|>)
  system: str = DEFAULT_SYSTEM
  truncation: str = "truncate"    # truncate | drop: what to do with a sample longer than seq_len
  strict: bool = False            # raise on a bad sample instead of skipping it
  packer: str = "window"          # window: subset-sum rows over a window (packing.py) | first_fit: Grain's online one
  packing_window: int = 512       # window: samples packed together (more: less padding, more host memory)
  packing_bins: int = 64          # first_fit: open bins
  task_names: tuple[str, ...] = ()
  num_threads: int = 2            # Grain read threads (decode + tokenise run there)

  def validate(self):
    if self.mode not in ("chat", "pretrain"):
      raise ValueError(f"data mode {self.mode!r}: expected 'chat' or 'pretrain'")
    if self.packer not in PACKERS:
      raise ValueError(f"packer {self.packer!r}: expected one of {sorted(PACKERS)}")
    if self.truncation not in ("truncate", "drop"):
      raise ValueError(f"truncation {self.truncation!r}: expected 'truncate' or 'drop'")


class SampleEncoder:
  """record -> {'ids', 'loss_mask', 'task', 'images'} or None (skipped, counted). Thread-safe counters."""

  def __init__(self, tokenizer: Tokenizer, cfg: DataConfig):
    cfg.validate()
    self.tok, self.cfg = tokenizer, cfg
    self.counts: collections.Counter = collections.Counter()
    self._lock = threading.Lock()
    self._task_index = {name: i + 1 for i, name in enumerate(cfg.task_names)}
    self.epoch_size = 0  # samples per epoch on this host; set by build_dataset so each epoch's counts get logged
    self._seen = 0
    self._ok_before_epoch = 0
    self._warned: collections.Counter = collections.Counter()

  def summary(self) -> str:
    c = self.counts
    skipped = {k: v for k, v in c.items() if k not in ("ok", "truncated") and v}
    return f"{c['ok']} samples used, {c['truncated']} truncated, skipped: {skipped or 'none'}"

  def _count(self, key: str, record: dict | None = None, why: str | None = None):
    """Count an outcome; at each epoch's end log the counts, and stop a run whose whole epoch gave nothing (records
    encode the same way every epoch, so it would loop forever)."""
    with self._lock:
      self.counts[key] += 1
      empty_epoch = False
      if key != "truncated":
        self._seen += 1
        if self.epoch_size and self._seen % self.epoch_size == 0:
          log.warning("data epoch %d done: %s", self._seen // self.epoch_size, self.summary())
          empty_epoch = self.counts["ok"] == self._ok_before_epoch
          self._ok_before_epoch = self.counts["ok"]
      self._warned[key] += bool(why)
      shown = self._warned[key]
    if why and shown <= WARNINGS_SHOWN:
      where = (record or {}).get("source") or (record or {}).get("id", "?")
      log.warning("skipping %s: %s", where, why)
      if shown == WARNINGS_SHOWN:
        log.warning("further '%s' skips are counted, not shown (the counts follow at each epoch's end)", key)
    if empty_epoch:
      raise NoUsableData(f"no usable sample in a whole pass over the {self.epoch_size} records of this host "
                         f"({self.summary()}): fix the data or the limits (seq_len, max_images, patch_budget)")

  def tokenize(self, record: dict) -> tuple[Tokenized, list[str]]:
    if "text" in record and "conversations" not in record:
      return format_text(self.tok, record["text"]), []
    conv = record["conversations"]
    refs = image_refs(conv)
    if self.cfg.mode == "pretrain" and refs:
      caption = [t["value"] for t in conv if str(t.get("from")).lower() in ("assistant", "gpt")][-1]
      return format_pretrain(self.tok, refs, caption), refs
    return format_chat(self.tok, conv, self.cfg.system, where=record.get("source", record.get("id", "sample"))), refs

  def _truncate(self, t: Tokenized, n_images: int) -> tuple[Tokenized, int] | None:
    """Cut to seq_len without splitting an image span; None if nothing to learn from is left."""
    ids, mask = t.ids[:self.cfg.seq_len], t.loss_mask[:self.cfg.seq_len]
    starts = [i for i, x in enumerate(ids) if x == self.tok.img_start_id]
    ends = [i for i, x in enumerate(ids) if x == self.tok.img_end_id]
    if len(starts) > len(ends):  # the cut fell inside a span: cut before it
      ids, mask = ids[:starts[-1]], mask[:starts[-1]]
    kept_images = min(n_images, sum(1 for x in ids if x == self.tok.img_start_id))
    if not any(mask[1:]):
      return None
    return Tokenized(ids, mask), kept_images

  def __call__(self, record: dict):
    if has_video(record):  # would otherwise train on the reference as text, the clip never seen
      why = "has a video; this pipeline's fixed image spans take images only (videos need a Qwen2-VL model)"
      if self.cfg.strict:
        raise FormatError(f"{record.get('source') or record.get('id', '?')}: {why}")
      self._count("unsupported_video", record, why)
      return None
    try:
      t, refs = self.tokenize(record)
    except (FormatError, TokenizerError, KeyError, IndexError) as e:
      if self.cfg.strict:
        raise
      self._count("bad_record", record, f"{type(e).__name__}: {e}")
      return None
    if len(refs) > self.cfg.max_images:
      if self.cfg.strict:
        raise ValueError(f"{record.get('id')}: {len(refs)} images > max_images {self.cfg.max_images}")
      self._count("too_many_images", record, f"{len(refs)} images > max_images {self.cfg.max_images}")
      return None
    n_images = len(refs)
    if len(t.ids) > self.cfg.seq_len:
      if self.cfg.truncation == "drop":
        if self.cfg.strict:
          raise ValueError(f"{record.get('id')}: {len(t.ids)} tokens > seq_len {self.cfg.seq_len}")
        self._count("dropped_too_long")
        return None
      cut = self._truncate(t, n_images)
      if cut is None:
        self._count("dropped_too_long")
        return None
      t, n_images = cut
      self._count("truncated")
    images = np.zeros((n_images, 3, self.cfg.image_size, self.cfg.image_size), np.float32)
    for k, ref in enumerate(refs[:n_images]):
      try:
        images[k] = preprocess_image(record["images"][ref], self.cfg.image_size, name=f"{record.get('id')}:{ref}")
      except (ImageError, KeyError) as e:
        if self.cfg.strict:
          raise
        self._count("bad_image", record, str(e) if isinstance(e, ImageError) else f"no image named {ref!r}")
        return None
    self._count("ok")
    task = self._task_index.get(record.get("task"), 0)
    return {"ids": np.asarray(t.ids, np.int32), "loss_mask": np.asarray(t.loss_mask, np.int32),
            "task": task * answer_mask(self.tok, t.ids, t.loss_mask), "images": images}


def _to_batch_row(x: dict) -> dict:
  return {"input_ids": x["ids"], "segment_ids": x["ids_segment_ids"], "positions": x["ids_positions"],
          "loss_mask": x["loss_mask"], "task_ids": x["task"], "pixel_values": x["images"],
          "image_mask": x["images_segment_ids"] > 0}


def encoded_samples(source, encoder, cfg: DataConfig, *, seed: int = 0, num_epochs: int | None = 1,
                    shuffle: bool = True, process_index: int | None = None,
                    process_count: int | None = None) -> grain.IterDataset:
  """source -> seeded shuffle -> this host's share -> encoder (failed samples dropped) as a Grain IterDataset."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds[process_index::process_count]  # disjoint per host within every (re)shuffled epoch
  if len(ds) == 0:
    raise NoUsableData(f"the data source has no records for host {process_index} of {process_count} "
                       f"({len(source)} records in all)")
  encoder.epoch_size = len(ds)
  ds = ds.repeat(num_epochs) if num_epochs != 1 else ds
  ds = ds.map(encoder).filter(lambda x: x is not None)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=4 * cfg.num_threads))


def build_dataset(source, tokenizer: Tokenizer, cfg: DataConfig, *, seed: int = 0, num_epochs: int | None = 1,
                  shuffle: bool = True, process_index: int | None = None, process_count: int | None = None,
                  encoder: SampleEncoder | None = None) -> grain.IterDataset:
  """The whole pipeline as a Grain IterDataset of packed batches (see the module docstring)."""
  encoder = encoder or SampleEncoder(tokenizer, cfg)
  it = encoded_samples(source, encoder, cfg, seed=seed, num_epochs=num_epochs, shuffle=shuffle,
                       process_index=process_index, process_count=process_count)
  L = cfg.seq_len
  if cfg.packer == "window":
    it = WindowPackIterDataset(it, seq_len=L, max_images=cfg.max_images, lookahead=cfg.packing_window, seed=seed,
                                shuffle_rows=shuffle)
  else:
    it = FirstFitPackIterDataset(it, length_struct={"ids": L, "loss_mask": L, "task": L, "images": cfg.max_images},
                                 num_packing_bins=cfg.packing_bins, seed=seed, shuffle_bins=shuffle)
  return it.map(_to_batch_row).batch(cfg.batch_size, drop_remainder=True)


def build_patch_dataset(source, encoder, cfg: DataConfig, *, patch_budget: int, patch_dim: int, merge: int,
                        seed: int = 0, **kw) -> grain.IterDataset:
  """Any-resolution samples (a family's encoder, e.g. Qwen2-VL's) packed on tokens and patches per row
  (`patch_packing.py`): an IterDataset of whole batches of `cfg.batch_size` rows."""
  it = encoded_samples(source, encoder, cfg, seed=seed, **kw)
  return PatchPackIterDataset(it, batch_size=cfg.batch_size, seq_len=cfg.seq_len, patch_budget=patch_budget,
                              patch_dim=patch_dim, merge=merge, lookahead=cfg.packing_window, seed=seed,
                              shuffle=kw.get("shuffle", True))


class DataPipeline:
  """Iterable over packed batches that logs the skip/truncation counts at the end of each epoch.

  `iterator = iter(pipeline)`; `iterator.get_state()` / `iterator.set_state(state)` checkpoint the position.
  """

  def __init__(self, source, tokenizer: Tokenizer, cfg: DataConfig, **kw):
    self.encoder = SampleEncoder(tokenizer, cfg)
    self.dataset = build_dataset(source, tokenizer, cfg, encoder=self.encoder, **kw)

  def __iter__(self):
    return _LoggingIterator(iter(self.dataset), self.encoder)

  def report(self) -> str:
    return self.encoder.summary()


class _LoggingIterator:
  def __init__(self, inner, encoder: SampleEncoder):
    self._inner, self._encoder = inner, encoder

  def __iter__(self):
    return self

  def __next__(self):
    try:
      return next(self._inner)
    except StopIteration:
      log.warning("end of data: %s", self._encoder.summary())
      raise

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)

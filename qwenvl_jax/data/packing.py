"""Packing over a lookahead window by subset sums, as a checkpointable Grain IterDataset.

Online first-fit packers emit a bin as soon as nothing fits it; with image samples of ~300 tokens in 2048-token
rows that leaves ~9% padding. Here `lookahead` samples are read and rows are filled one at a time with the
subset of the remaining samples that comes closest to `seq_len` (an exact subset-sum over token counts), within
the row's image slots. Only the last rows of each window are partly empty.

Rows hold, for L = seq_len and M = max_images:
    ids, loss_mask, task [L]; ids_segment_ids, ids_positions [L] (segment 0 = padding, positions restart per
    sample); images [M, ...]; images_segment_ids [M] (which sample each image slot belongs to, 0 = empty).
Samples keep their stream order inside a row, so a row's k-th `<img>` span meets its k-th image slot.

Checkpointing: the state is the parent's state at the start of the current window plus the number of rows
already emitted from it; restoring re-reads and re-packs that window (packing is deterministic).
"""

from __future__ import annotations

import grain
import numpy as np

TOKEN_FEATURES = ("ids", "loss_mask", "task")


def _fullest_subset(lengths: np.ndarray, capacity: int) -> list[int]:
  """Indices of a subset of `lengths` whose sum is the largest possible <= capacity (subset-sum DP).

  first[s] = the item that first reached sum s; following first[] back from the best sum gives distinct items
  because each step goes to a sum reached by an earlier item.
  """
  first = np.full(capacity + 1, -2, np.int64)
  first[0] = -1
  for i, n in enumerate(lengths):
    if n > capacity:
      continue
    newly = (first[:capacity + 1 - n] != -2) & (first[n:] == -2)
    first[n:][newly] = i
    if first[capacity] != -2:
      break
  s = int(np.flatnonzero(first != -2).max())
  chosen = []
  while s > 0:
    i = int(first[s])
    chosen.append(i)
    s -= int(lengths[i])
  return chosen


def pack_window(samples: list[dict], seq_len: int, max_images: int) -> list[list[int]]:
  """Rows as lists of sample indices (each in stream order), filled one at a time as full as possible.

  Each row takes the subset of the remaining samples with the most tokens that fits `seq_len` (longest
  samples preferred); if it has more than `max_images` images, image-carrying samples are returned to the
  pool, most images first, until it fits.
  """
  remaining = sorted(range(len(samples)), key=lambda i: -len(samples[i]["ids"]))
  rows = []
  while remaining:
    lengths = np.array([len(samples[i]["ids"]) for i in remaining])
    picked = [remaining[k] for k in _fullest_subset(lengths, seq_len)]
    picked.sort(key=lambda i: -len(samples[i]["images"]))
    while sum(len(samples[i]["images"]) for i in picked) > max_images:
      picked.pop(0)
    if not picked:  # only possible if one sample alone exceeds the limits (the encoder prevents that)
      raise ValueError(f"a sample does not fit a row of {seq_len} tokens and {max_images} images")
    taken = set(picked)
    remaining = [i for i in remaining if i not in taken]
    rows.append(sorted(picked))
  return rows


def assemble_row(samples: list[dict], seq_len: int, max_images: int) -> dict:
  """Concatenate samples into one padded row with segment ids and per-sample positions."""
  out = {k: np.zeros(seq_len, samples[0][k].dtype) for k in TOKEN_FEATURES}
  seg = np.zeros(seq_len, np.int32)
  pos = np.zeros(seq_len, np.int32)
  image_shape = samples[0]["images"].shape[1:]
  images = np.empty((max_images,) + image_shape, np.float32)  # filled below; only empty slots are zeroed
  image_seg = np.zeros(max_images, np.int32)
  t = k = 0
  for s_id, s in enumerate(samples, 1):
    n, m = len(s["ids"]), len(s["images"])
    for key in TOKEN_FEATURES:
      out[key][t:t + n] = s[key]
    seg[t:t + n] = s_id
    pos[t:t + n] = np.arange(n)
    images[k:k + m] = s["images"]
    image_seg[k:k + m] = s_id
    t, k = t + n, k + m
  images[k:] = 0
  return {**out, "ids_segment_ids": seg, "ids_positions": pos, "images": images, "images_segment_ids": image_seg}


class WindowPackIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_images: int, lookahead: int = 512,
               seed: int = 0, shuffle_rows: bool = True):
    super().__init__(parent)
    self.seq_len, self.max_images, self.lookahead = seq_len, max_images, lookahead
    self.seed, self.shuffle_rows = seed, shuffle_rows

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, spec: WindowPackIterDataset):
    super().__init__(parent)
    self._spec = spec
    self._window_state = parent.get_state()
    self._window = 0
    self._rows: list[list[int]] = []
    self._samples: list[dict] = []
    self._emitted = 0

  def _fill(self) -> None:
    spec = self._spec
    self._window_state = self._parent.get_state()
    samples = []
    for _ in range(spec.lookahead):
      try:
        samples.append(next(self._parent))
      except StopIteration:
        break
    if not samples:
      raise StopIteration
    rows = pack_window(samples, spec.seq_len, spec.max_images)
    if spec.shuffle_rows:  # otherwise long-sample rows would always come first in a window
      np.random.default_rng([spec.seed, self._window]).shuffle(rows)
    self._samples, self._rows = samples, rows  # rows are assembled when emitted
    self._emitted = 0

  def __next__(self) -> dict:
    if self._emitted >= len(self._rows):
      if self._rows:
        self._window += 1
      self._fill()
    row = self._rows[self._emitted]
    self._emitted += 1
    if self._emitted == len(self._rows):
      samples, self._samples = [self._samples[i] for i in row], []  # release the window's samples early
    else:
      samples = [self._samples[i] for i in row]
    return assemble_row(samples, self._spec.seq_len, self._spec.max_images)

  def get_state(self) -> dict:
    return {"parent": self._window_state, "window": self._window, "emitted": self._emitted}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._window = state["window"]
    self._rows = []
    if state["emitted"]:
      self._fill()
      self._emitted = state["emitted"]

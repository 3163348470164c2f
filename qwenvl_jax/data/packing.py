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


def segment_lengths(segment_ids) -> np.ndarray:
  """Lengths of the packed segments (1.. per row; 0 = padding) of [..., N] segment ids, row by row -> [n] int64."""
  seg = np.asarray(segment_ids)
  rows = seg.reshape(-1, seg.shape[-1]) if seg.size else np.zeros((0, 0), np.int64)
  lengths = [np.bincount(row[row > 0])[1:] for row in rows]
  return np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)


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


class WindowIterator(grain.DatasetIterator):
  """Reads a window of samples, plans groups over it (rows here; whole batches in patch_packing.py) and emits them
  one at a time. Subclasses give `_plan` (read the window with `_read` -> (samples, groups)) and `_emit` (the
  samples of one group -> the output). Checkpoint: the parent's state at the window start and the groups emitted;
  restoring re-reads and re-plans that window (planning is deterministic)."""

  def __init__(self, parent: grain.DatasetIterator, seed: int, shuffle: bool):
    super().__init__(parent)
    self._seed, self._shuffle = seed, shuffle
    self._window_state = parent.get_state()
    self._window = 0
    self._groups: list = []
    self._samples: list[dict] = []
    self._emitted = 0

  def _plan(self) -> tuple[list[dict], list]:
    raise NotImplementedError

  def _emit(self, samples) -> dict:
    raise NotImplementedError

  def _read(self, n: int, into: list) -> int:
    """Append up to n samples of the parent to `into` -> how many there were."""
    for k in range(n):
      try:
        into.append(next(self._parent))
      except StopIteration:
        return k
    return n

  def _fill(self) -> None:
    self._window_state = self._parent.get_state()
    samples, groups = self._plan()
    if not samples:
      raise StopIteration
    if self._shuffle:  # otherwise the window's largest groups would always come first
      np.random.default_rng([self._seed, self._window]).shuffle(groups)
    self._samples, self._groups, self._emitted = samples, groups, 0  # groups are assembled when emitted

  def __next__(self) -> dict:
    if self._emitted >= len(self._groups):
      if self._groups:
        self._window += 1
      self._fill()
    group = self._groups[self._emitted]
    self._emitted += 1
    out = self._emit(group)
    if self._emitted == len(self._groups):
      self._samples = []  # release the window's samples early
    return out

  def get_state(self) -> dict:
    return {"parent": self._window_state, "window": self._window, "emitted": self._emitted}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._window = state["window"]
    self._groups = []
    if state["emitted"]:
      self._fill()
      self._emitted = state["emitted"]


class _PackIterator(WindowIterator):
  def __init__(self, parent: grain.DatasetIterator, spec: WindowPackIterDataset):
    super().__init__(parent, spec.seed, spec.shuffle_rows)
    self._spec = spec

  def _plan(self):
    samples: list[dict] = []
    self._read(self._spec.lookahead, samples)
    return samples, (pack_window(samples, self._spec.seq_len, self._spec.max_images) if samples else [])

  def _emit(self, row) -> dict:
    return assemble_row([self._samples[i] for i in row], self._spec.seq_len, self._spec.max_images)

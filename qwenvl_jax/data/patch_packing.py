"""Packing any-resolution samples on two budgets per row: tokens (seq_len) and ViT patches (patch_budget).

Samples of families whose images become as many tokens as their size says (Qwen2-VL) carry different numbers of
patches. Every row of a batch holds whole samples within both budgets, and a batch has static shapes so nothing
recompiles:

    input_ids, segment_ids, loss_mask, task_ids [B, L] int32 (segment 0 = padding; samples never cross rows)
    positions        [B, 3, L] int32  (each sample's own M-RoPE ids, as computed for it alone)
    pixel_values     [B, P, D] float32 (the row's patches: its images in sample order, then its videos; zeros after)
    vision_rows_cols [B, P, 2] int32  (each patch's row and column in its image)
    vision_segments  [B, P] int32     (attention segment: one per image / video frame pair, 1.. within the row;
                                       0 = padding)
    n_image_tokens   [B] int32        (merged image rows of the row: its video features follow them)

for B = batch_size, L = seq_len, P = patch_budget. Keeping a row's patches with the row (rather than one pool per
batch) lets the vision tower shard with the batch like the decoder: each device encodes its own rows' images, each
host builds its own rows, micro-batches split rows with their patches, and the block-diagonal ViT mask is [P, P]
per row, not over the whole batch. Merged feature k of row b goes to the row's k-th image placeholder.

Samples (from a family's sample encoder) are dicts: ids, loss_mask, task [n]; positions [3, n]; image_patches
[p, D], image_rows_cols [p, 2], image_segments [p] (1.. within the sample), image_grid_thw [N, 3] and the same
four for videos.

A window of `lookahead` samples is read and rows are filled one at a time (`pack_rows`): each next sample is the
largest that still fits, taken from the patch-heavy end of the window when the row's patch budget is the less used
one and from the token-heavy end otherwise, so that neither budget fills long before the other (windows and
checkpoints: `packing.WindowIterator`). The window's last batches, which take what is left, are refilled with further
samples (up to twice the window) until one of each batch's budgets is 90% used. Checkpointing as `packing.py`: the
state is the parent's state at the window start plus the batches emitted from it; restoring re-reads and re-packs
that window.
"""

from __future__ import annotations

import grain
import numpy as np

from qwenvl_jax.data.packing import WindowIterator

TOKEN_KEYS = ("ids", "loss_mask", "task")
MEDIA = ("image", "video")
VISION_KEYS = ("vision_rows_cols", "vision_segments", "n_image_tokens")  # with pixel_values
FULL = 0.9  # a batch with either budget this full needs no refill


def num_patches(sample: dict) -> int:
  return int(len(sample["image_patches"]) + len(sample["video_patches"]))


def budget_for(samples, seq_len: int, merge: int) -> int:
  """The per-row patch budget matching a mix: its patches per token x seq_len, rounded up to whole merge windows,
  so that a row's tokens and patches run out together."""
  samples = [s for s in samples if s is not None]
  ratio = sum(num_patches(s) for s in samples) / max(sum(len(s["ids"]) for s in samples), 1)
  window = merge ** 2
  return max(window, -(-int(np.ceil(ratio * seq_len)) // window) * window)


def pack_rows(tokens, patches, seq_len: int, patch_budget: int) -> list[list[int]]:
  """Rows as lists of sample indices (in stream order), every sample once, each row within seq_len tokens and
  patch_budget patches; rows come fullest first. tokens / patches: per-sample counts, each within the budgets."""
  tokens, patches = np.asarray(tokens, np.int64), np.asarray(patches, np.int64)
  if (tokens > seq_len).any() or (patches > patch_budget).any():
    raise ValueError(f"a sample exceeds a row of {seq_len} tokens or {patch_budget} patches")
  # patch-heavy first and token-heavy first (ties: larger first): where each next sample is taken from
  ratio = patches / np.maximum(tokens, 1)
  heavy, light = np.lexsort((-tokens, -ratio)), np.lexsort((-tokens, ratio))
  left = np.ones(len(tokens), bool)
  rows = []
  while left.any():
    row, t_free, p_free = [], seq_len, patch_budget
    while True:
      fits = left & (tokens <= t_free) & (patches <= p_free)
      if not fits.any():
        break
      patch_side = 1 - p_free / patch_budget <= 1 - t_free / seq_len
      order = heavy if patch_side else light
      i = int(order[np.argmax(fits[order])])
      row.append(i)
      left[i] = False
      t_free -= tokens[i]
      p_free -= patches[i]
    rows.append(sorted(row))
  return rows


def pack_batches(tokens, patches, batch_size: int, seq_len: int, patch_budget: int) -> list[list[list[int]]]:
  """`pack_rows` grouped into batches of `batch_size` rows (the last one completed with empty rows)."""
  rows = pack_rows(tokens, patches, seq_len, patch_budget)
  rows += [[] for _ in range(-len(rows) % batch_size)]
  return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]


def assemble_batch(rows: list[list[dict]], seq_len: int, patch_budget: int, patch_dim: int, merge: int) -> dict:
  """Rows of samples -> the batch arrays of the module docstring."""
  b = len(rows)
  out = {k: np.zeros((b, seq_len), np.int32) for k in ("input_ids", "segment_ids", "loss_mask", "task_ids")}
  positions = np.zeros((b, 3, seq_len), np.int32)
  pixels = np.zeros((b, patch_budget, patch_dim), np.float32)
  rows_cols = np.zeros((b, patch_budget, 2), np.int32)
  segments = np.zeros((b, patch_budget), np.int32)
  n_image_tokens = np.zeros((b,), np.int32)
  for r, samples in enumerate(rows):
    t = 0
    for s_id, s in enumerate(samples, 1):
      n = len(s["ids"])
      out["input_ids"][r, t:t + n] = s["ids"]
      out["loss_mask"][r, t:t + n] = s["loss_mask"]
      out["task_ids"][r, t:t + n] = s["task"]
      out["segment_ids"][r, t:t + n] = s_id
      positions[r, :, t:t + n] = s["positions"]
      t += n
    k = seg = 0
    for media in MEDIA:  # the row's images (in sample order), then its videos: the order features are scattered in
      for s in samples:
        x = s[f"{media}_patches"]
        n = len(x)
        if not n:
          continue
        pixels[r, k:k + n] = x
        rows_cols[r, k:k + n] = s[f"{media}_rows_cols"]
        local = s[f"{media}_segments"]
        segments[r, k:k + n] = local + seg
        seg += int(local.max())
        k += n
      if media == "image":
        n_image_tokens[r] = k // merge ** 2
  return {**out, "positions": positions, "pixel_values": pixels, "vision_rows_cols": rows_cols,
          "vision_segments": segments, "n_image_tokens": n_image_tokens}


class PatchPackIterDataset(grain.IterDataset):
  """Grain IterDataset: encoded samples -> packed batches (see the module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, seq_len: int, patch_budget: int,
               patch_dim: int, merge: int, lookahead: int = 512, seed: int = 0, shuffle: bool = True):
    super().__init__(parent)
    if patch_budget % merge ** 2:
      raise ValueError(f"patch_budget {patch_budget} must be a multiple of {merge ** 2} (the merge window)")
    self.batch_size, self.seq_len, self.patch_budget = batch_size, seq_len, patch_budget
    self.patch_dim, self.merge, self.lookahead, self.seed, self.shuffle = patch_dim, merge, lookahead, seed, shuffle

  def __iter__(self) -> grain.DatasetIterator:
    return _Iterator(self._parent.__iter__(), self)


class _Iterator(WindowIterator):
  def __init__(self, parent: grain.DatasetIterator, spec: PatchPackIterDataset):
    super().__init__(parent, spec.seed, spec.shuffle)
    self._spec = spec

  def _pack(self, samples: list[dict], indices: list[int]) -> list[list[list[int]]]:
    spec = self._spec
    local = pack_batches([len(samples[i]["ids"]) for i in indices], [num_patches(samples[i]) for i in indices],
                         spec.batch_size, spec.seq_len, spec.patch_budget)
    return [[[indices[i] for i in row] for row in b] for b in local]

  def _full(self, samples: list[dict], batch) -> bool:
    spec = self._spec
    tokens = sum(len(samples[i]["ids"]) for row in batch for i in row) / (spec.batch_size * spec.seq_len)
    patches = sum(num_patches(samples[i]) for row in batch for i in row) / (spec.batch_size * spec.patch_budget)
    return max(tokens, patches) >= FULL

  def _plan(self):
    spec = self._spec
    samples: list[dict] = []
    if not self._read(spec.lookahead, samples):
      return samples, []
    batches = self._pack(samples, list(range(len(samples))))
    # the last batches take what is left: read on (deterministically, from the same parent state) and repack the
    # batches that are not full with the new samples until all are, or the data ends
    while not all(self._full(samples, b) for b in batches) and len(samples) < 2 * spec.lookahead:
      start = len(samples)
      if not self._read(max(1, spec.lookahead // 4), samples):
        break
      full = [b for b in batches if self._full(samples, b)]
      tail = sorted(i for b in batches if not self._full(samples, b) for row in b for i in row)
      batches = full + self._pack(samples, tail + list(range(start, len(samples))))
    return samples, batches

  def _emit(self, rows) -> dict:
    spec = self._spec
    return assemble_batch([[self._samples[i] for i in row] for row in rows], spec.seq_len, spec.patch_budget,
                          spec.patch_dim, spec.merge)

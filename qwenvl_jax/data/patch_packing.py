"""Packing any-resolution samples on two budgets at once: tokens per row and ViT patches per batch.

Samples of families whose images become as many tokens as their size says (Qwen2-VL) carry different numbers of
patches. A batch has static shapes so nothing recompiles:

    input_ids, segment_ids, loss_mask, task_ids [B, L] int32 (segment 0 = padding; samples never cross rows)
    positions        [B, 3, L] int32  (each sample's own M-RoPE ids, as computed for it alone)
    pixel_values     [P, D] float32   (every patch of the batch: images batch-major, then videos; zeros after)
    vision_rows_cols [P, 2] int32     (each patch's row and column in its image)
    vision_segments  [P] int32        (attention segment: one per image / video frame pair, unique in the batch;
                                       0 = padding)
    n_image_tokens   [] int32         (merged image rows: video features follow them)

for B = batch_size, L = seq_len, P = patch_budget. The ViT runs over all P patches as one packed sequence with a
block-diagonal mask; merged feature k goes to the k-th image placeholder of the batch (row-major), which is the
order patches are laid out here.

Samples (from a family's sample encoder) are dicts: ids, loss_mask, task [n]; positions [3, n]; image_patches
[p, D], image_rows_cols [p, 2], image_segments [p] (1.. within the sample), image_grid_thw [N, 3] and the same
four for videos.

A window of `lookahead` samples is read and batches are filled one at a time (`pack_batches`): samples are taken
largest first, alternating between patch-heavy and token-heavy ones so that neither budget fills long before the
other, and each goes to the row it fits most tightly (windows and checkpoints: `packing.WindowIterator`). The
window's last batches, which take what is left, are refilled with further samples (up to twice the window) until one
of each batch's budgets is 90% used. Checkpointing as `packing.py`: the state is the parent's state at the window
start plus the batches emitted from it; restoring re-reads and re-packs that window.
"""

from __future__ import annotations

import grain
import numpy as np

from qwenvl_jax.data.packing import WindowIterator

TOKEN_KEYS = ("ids", "loss_mask", "task")
MEDIA = ("image", "video")
VISION_KEYS = ("vision_rows_cols", "vision_segments", "n_image_tokens")  # with pixel_values: no batch axis
BATCH_KEYS = ("input_ids", "segment_ids", "loss_mask", "task_ids", "positions", "pixel_values") + VISION_KEYS
FULL = 0.9  # a batch with either budget this full needs no refill


def num_patches(sample: dict) -> int:
  return int(len(sample["image_patches"]) + len(sample["video_patches"]))


def budget_for(samples, batch_size: int, seq_len: int, merge: int) -> int:
  """The patch budget matching a mix: its patches per token x the batch's tokens, rounded up to whole merge
  windows, so that tokens and patches run out together."""
  samples = [s for s in samples if s is not None]
  ratio = sum(num_patches(s) for s in samples) / max(sum(len(s["ids"]) for s in samples), 1)
  window = merge ** 2
  return max(window, -(-int(np.ceil(ratio * batch_size * seq_len)) // window) * window)


def pack_batches(tokens, patches, batch_size: int, seq_len: int, patch_budget: int) -> list[list[list[int]]]:
  """Batches as lists of `batch_size` rows, each a list of sample indices (in stream order), using every sample.

  tokens / patches: per-sample counts, each sample within (seq_len, patch_budget) alone."""
  tokens, patches = np.asarray(tokens, np.int64), np.asarray(patches, np.int64)
  if (tokens > seq_len).any() or (patches > patch_budget).any():
    raise ValueError(f"a sample exceeds a row of {seq_len} tokens or the batch's {patch_budget} patches")
  remaining = list(range(len(tokens)))
  batches = []
  while remaining:
    rows, free, p_free = [[] for _ in range(batch_size)], np.full(batch_size, seq_len), patch_budget
    # two queues over the candidates: patch-heavy first and token-heavy first (ties: larger first)
    ratio = patches[remaining] / np.maximum(tokens[remaining], 1)
    size = tokens[remaining]
    heavy = [remaining[k] for k in np.lexsort((-size, -ratio))]
    light = [remaining[k] for k in np.lexsort((-size, ratio))]
    tried = set()
    queues = [heavy, light]
    while heavy or light:
      t_used = 1 - free.sum() / (batch_size * seq_len)
      p_used = 1 - p_free / patch_budget if patch_budget else 1.0
      q = queues[0] if (p_used <= t_used and heavy) or not light else queues[1]
      i = q.pop(0)
      if i in tried:
        continue
      tried.add(i)
      if patches[i] > p_free:
        continue
      fits = np.flatnonzero(free >= tokens[i])
      if not len(fits):
        continue
      r = fits[np.argmin(free[fits])]
      rows[r].append(i)
      free[r] -= tokens[i]
      p_free -= patches[i]
    taken = {i for row in rows for i in row}
    if not taken:  # cannot happen: every sample fits an empty batch alone
      raise ValueError("no sample fits an empty batch")
    remaining = [i for i in remaining if i not in taken]
    batches.append([sorted(row) for row in rows])
  return batches


def assemble_batch(rows: list[list[dict]], seq_len: int, patch_budget: int, patch_dim: int, merge: int) -> dict:
  """Rows of samples -> the batch arrays of the module docstring."""
  b = len(rows)
  out = {k: np.zeros((b, seq_len), np.int32) for k in ("input_ids", "segment_ids", "loss_mask", "task_ids")}
  positions = np.zeros((b, 3, seq_len), np.int32)
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
  pixels = np.zeros((patch_budget, patch_dim), np.float32)
  rows_cols = np.zeros((patch_budget, 2), np.int32)
  segments = np.zeros((patch_budget,), np.int32)
  k = seg = 0
  image_patches = 0
  for media in MEDIA:  # all images of the batch (row-major), then all videos: the order features are scattered in
    for samples in rows:
      for s in samples:
        x = s[f"{media}_patches"]
        n = len(x)
        if not n:
          continue
        pixels[k:k + n] = x
        rows_cols[k:k + n] = s[f"{media}_rows_cols"]
        local = s[f"{media}_segments"]
        segments[k:k + n] = local + seg
        seg += int(local.max())
        k += n
    if media == "image":
      image_patches = k
  return {**out, "positions": positions, "pixel_values": pixels, "vision_rows_cols": rows_cols,
          "vision_segments": segments, "n_image_tokens": np.int32(image_patches // merge ** 2)}


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
    patches = sum(num_patches(samples[i]) for row in batch for i in row) / spec.patch_budget
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

"""Qwen2-VL positions, computed on the host from input_ids, grids and attention_mask (numpy, exact integers).

M-RoPE (decoder): over each row's real tokens, with p = 1 + the largest position id so far (0 at the first real
token), a text token gets (p, p, p); a vision block whose merged grid is (T, H, W) = (t, h/m, w/m) gives its token
(ti, hi, wi) (row-major over T, H, W) the position (p + ti, p + hi, p + wi). Text after a block starts at
1 + the block's largest id (`rule="paper"`: the Qwen2-VL paper, transformers 4.45, vLLM) or at p + max(H, W)
(`rule="transformers_5_23"`, which ignores T). Decoding continues at 1 + the largest id of the row either way.

Vision (ViT): each patch's (row, column) in its image, in the processor's patch order (2x2 merge windows
contiguous), and an attention segment per image and per temporal slice of a video.
"""

from __future__ import annotations

import numpy as np


def merged_grid(grid, merge: int) -> tuple[int, int, int]:
  t, h, w = (int(x) for x in grid)
  return t, h // merge, w // merge


def tokens_of(grid, merge: int) -> int:
  """LLM tokens of one image / video with patch grid (t, h, w)."""
  t, h, w = merged_grid(grid, merge)
  return t * h * w


def vision_block(grid, merge: int) -> np.ndarray:
  """[3, T*H*W] offsets (ti, hi, wi) of one block's tokens, row-major over (T, H, W)."""
  t, h, w = merged_grid(grid, merge)
  ti, hi, wi = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([ti.reshape(-1), hi.reshape(-1), wi.reshape(-1)])


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray, image_grids, video_grids, *, image_token_id: int,
               video_token_id: int, merge: int, rule: str = "paper") -> tuple[np.ndarray, np.ndarray]:
  """-> (positions [3, B, S] int32 (0 on padding), next_pos [B] int32 = 1 + the row's largest id).

  Images (videos) are consumed in order of appearance, batch-major. Each run of `image_token_id` (`video_token_id`)
  tokens is one block and must hold exactly the tokens of the next grid: ValueError otherwise.
  """
  b, s = input_ids.shape
  positions = np.zeros((3, b, s), np.int64)
  next_pos = np.zeros((b,), np.int64)
  grids = {image_token_id: [np.asarray(g) for g in (image_grids if image_grids is not None else [])],
           video_token_id: [np.asarray(g) for g in (video_grids if video_grids is not None else [])]}
  used = {image_token_id: 0, video_token_id: 0}
  kind = {image_token_id: "image", video_token_id: "video"}
  for r in range(b):
    cols = np.flatnonzero(np.asarray(attention_mask[r]).astype(bool))
    ids = np.asarray(input_ids[r])[cols]
    out = np.zeros((3, len(ids)), np.int64)
    p, top, i = 0, -1, 0
    while i < len(ids):
      tok = int(ids[i])
      if tok not in grids:
        out[:, i] = p
        top = max(top, p)
        p, i = p + 1, i + 1
        continue
      j = i
      while j < len(ids) and ids[j] == tok:
        j += 1
      k = used[tok]
      if k >= len(grids[tok]):
        raise ValueError(f"row {r}: more {kind[tok]} placeholder runs than {kind[tok]} grids ({len(grids[tok])})")
      grid = grids[tok][k]
      need = tokens_of(grid, merge)
      if j - i != need:
        raise ValueError(f"row {r}: {kind[tok]} {k} has {j - i} placeholder tokens but its grid {list(map(int, grid))} "
                         f"makes {need}")
      block = vision_block(grid, merge)
      out[:, i:j] = p + block
      top = max(top, int(out[:, i:j].max()))
      _, h_m, w_m = merged_grid(grid, merge)
      p = top + 1 if rule == "paper" else p + max(h_m, w_m)
      used[tok], i = k + 1, j
    positions[:, r, cols] = out
    next_pos[r] = top + 1
  for tok, n in used.items():
    if n != len(grids[tok]):
      raise ValueError(f"{len(grids[tok])} {kind[tok]} grids given but input_ids hold {n} {kind[tok]} blocks")
  return positions.astype(np.int32), next_pos.astype(np.int32)


def patch_positions(grids, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Patch grids [N, 3] -> (rows_cols [P, 2] int32 in processor patch order, segments [P] int32 from 1: one per
  image and per temporal slice of a video)."""
  rows_cols, segments, seg = [], [], 0
  for grid in grids:
    t, h, w = (int(x) for x in grid)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    def window_order(a):
      return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    rc = np.stack([window_order(hh), window_order(ww)], axis=-1)
    for _ in range(t):
      seg += 1
      rows_cols.append(rc)
      segments.append(np.full((h * w,), seg, np.int32))
  if not rows_cols:
    return np.zeros((0, 2), np.int32), np.zeros((0,), np.int32)
  return np.concatenate(rows_cols).astype(np.int32), np.concatenate(segments)

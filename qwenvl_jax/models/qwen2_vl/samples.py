"""Qwen2-VL training samples: a record (the common format of the data sources) -> ids, targets, M-RoPE positions
and the patches of its images and videos at their own resolution (naive dynamic resolution).

    encoder = Qwen2VLSampleEncoder(tokenizer, model_cfg, processor, DataConfig(seq_len=..., ...), patch_budget=...)
    sample = encoder(record)     # dict for `data.patch_packing`, or None (skipped with a warning, counted)

Layout and targets: `data.conversation.chatml_sample` (answers and their `<|im_end|>` are the targets). A user turn
starting with `Picture k: <img>name</img>\\n` / `Video k: <video>name</video>\\n` lines gets one
`<|vision_start|><|image_pad|>*n<|vision_end|>` block per image (n from the image's grid after `smart_resize`
between the processor's min_pixels and max_pixels), then its text. A video (`record["videos"][name]`) is a video file
(path or bytes, sampled at the processor's `video_fps`) or a list of frames, sized within its `video_max_tokens`.
Grounding written the Qwen-VL way in the data (`<ref>..</ref><box>(x1,y1),(x2,y2)</box>`, coordinates in [0, 1000)
as in Qwen2-VL) becomes Qwen2-VL's tokens (`<|object_ref_start|>..<|object_ref_end|><|box_start|>..<|box_end|>`).
Positions are each sample's own (`positions.rope_index` over the sample alone), so packing never changes them.

Skipped (or raised with strict=True): an unreadable image or video, an aspect ratio beyond 200:1, a sample longer
than seq_len (visual tokens are never cut) or with more patches than a row's patch budget.
"""

from __future__ import annotations

import numpy as np

from qwenvl_jax.data.conversation import (
  FormatError,
  answer_mask,
  chatml_sample,
  normalize_roles,
  split_media_prefix,
)
from qwenvl_jax.data.images import ImageError
from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder
from qwenvl_jax.data.tokenizer import TokenizerError
from qwenvl_jax.models.qwen2_vl.inputs import check_tokenizer, qwen2_grounding, trusted_text_parts, vision_block
from qwenvl_jax.models.qwen2_vl.positions import patch_positions, rope_index


class Qwen2VLSampleEncoder(SampleEncoder):
  """record -> sample dict (see `data.patch_packing`) or None. Thread-safe counters (SampleEncoder's)."""

  def __init__(self, tokenizer, model_cfg, processor, cfg: DataConfig, patch_budget: int):
    super().__init__(tokenizer, cfg)
    if cfg.mode != "chat":
      raise ValueError(f"data.mode {cfg.mode!r}: Qwen2-VL samples are ChatML conversations (data.mode=chat)")
    check_tokenizer(model_cfg, tokenizer)
    self.model_cfg, self.proc, self.patch_budget = model_cfg, processor, int(patch_budget)

  def _media(self, record: dict, kind: str, ref: str):
    where = f"{record.get('id', '?')}:{ref}"
    table = record.get("images" if kind == "image" else "videos") or {}
    if ref not in table:
      raise ImageError(where, f"no {kind} named {ref!r} in the record", kind=kind)
    try:
      if kind == "image":
        return self.proc.preprocess_image(table[ref], name=where)
      return self.proc.preprocess_video(table[ref], name=where)
    except ImageError:
      raise
    except ValueError as e:  # smart_resize: no area, aspect ratio beyond 200:1
      raise ImageError(where, str(e), kind=kind) from None

  def encode(self, record: dict) -> dict:
    """The sample of one record; FormatError / ImageError / TokenizerError / ValueError name what is wrong."""
    cfg, m = self.model_cfg, self.model_cfg.vision.spatial_merge_size
    where = record.get("source", record.get("id", "sample"))
    turns, media = [], {"image": [], "video": []}
    conv = normalize_roles(record["conversations"], where)
    for k in range(0, len(conv), 2):
      (role, question), answer = conv[k], (conv[k + 1][1] if k + 1 < len(conv) else None)
      if role != "user" or (k + 1 < len(conv) and conv[k + 1][0] != "assistant"):
        raise FormatError(f"{where}: turns must alternate user, assistant")
      if answer is None:
        raise FormatError(f"{where}: the last user turn has no answer")
      refs, text = split_media_prefix(question)
      parts: list = []
      for kind, ref in refs:
        patches, grid = self._media(record, kind, ref)
        media[kind].append((patches, grid))
        parts.append(vision_block(cfg, self.proc.tokens(grid), video=kind == "video"))
      turns.append((parts + trusted_text_parts(self.tok, text), qwen2_grounding(answer)))
    t = chatml_sample(self.tok, turns, self.cfg.system)
    ids = np.asarray(t.ids, np.int32)
    if len(ids) > self.cfg.seq_len:
      raise _TooLong(f"{len(ids)} tokens > seq_len {self.cfg.seq_len}")
    n_patches = sum(len(p) for kind in media for p, _ in media[kind])
    if n_patches > self.patch_budget:
      raise _TooLong(f"{n_patches} patches > patch_budget {self.patch_budget}")
    grids = {kind: np.asarray([g for _, g in media[kind]], np.int64).reshape(-1, 3) for kind in media}
    positions, _ = rope_index(ids[None], np.ones((1, len(ids)), np.int32), grids["image"], grids["video"],
                              image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id, merge=m,
                              rule=cfg.position_rule)
    sample = {"ids": ids, "loss_mask": np.asarray(t.loss_mask, np.int32),
              "task": self._task_index.get(record.get("task"), 0) * answer_mask(self.tok, t.ids, t.loss_mask),
              "positions": positions[:, 0]}
    for kind in media:
      rows_cols, segments = patch_positions(grids[kind], m)
      sample[f"{kind}_patches"] = (np.concatenate([p for p, _ in media[kind]]) if media[kind]
                                   else np.zeros((0, self.proc.patch_dim), np.float32))
      sample[f"{kind}_rows_cols"], sample[f"{kind}_segments"] = rows_cols, segments
      sample[f"{kind}_grid_thw"] = grids[kind]
    return sample

  def __call__(self, record: dict):
    try:
      sample = self.encode(record)
    except _TooLong as e:
      if self.cfg.strict:
        raise ValueError(f"{record.get('id')}: {e}") from None
      self._count("dropped_too_long", record, str(e))
      return None
    except ImageError as e:
      if self.cfg.strict:
        raise
      self._count("bad_image", record, str(e))
      return None
    except (FormatError, TokenizerError, KeyError, IndexError, TypeError) as e:
      if self.cfg.strict:
        raise
      self._count("bad_record", record, f"{type(e).__name__}: {e}")
      return None
    self._count("ok")
    return sample


class _TooLong(ValueError):
  """A sample beyond the row's tokens or the batch's patches (never cut: its visual tokens would be lost)."""

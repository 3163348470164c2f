"""Host-side model inputs of Qwen2-VL: checks with one-line errors, M-RoPE positions, the packed vision batch.

    kwargs = prepare(cfg, input_ids, attention_mask, pixel_values=..., image_grid_thw=..., pixel_values_videos=...,
                     video_grid_thw=...)                                    # -> module(input_ids, **kwargs)

Images and videos go through the ViT as one packed sequence: image patches, then video patches, then padding up to
a bucket (`patch_bucket`: the next power of two, at least 64), so only a new bucket compiles a new program; padding
patches form their own attention segment and their merged rows are never read.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from qwenvl_jax.data.hf_tokenizer import (
  BOX_END,
  BOX_START,
  IMAGE_PAD,
  OBJECT_REF_END,
  OBJECT_REF_START,
  VIDEO_PAD,
  VISION_END,
  VISION_START,
)
from qwenvl_jax.models.qwen2_vl.config import Qwen2VLConfig
from qwenvl_jax.models.qwen2_vl.positions import patch_positions, rope_index, tokens_of

VISION_ARGS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
MIN_PATCH_BUCKET = 64


def patch_bucket(n: int) -> int:
  """Patch rows the ViT runs for n real patches: the next power of two (>= 64)."""
  return max(MIN_PATCH_BUCKET, 1 << max(0, int(n) - 1).bit_length())


def _grids(cfg: Qwen2VLConfig, grid, pixels, kind: str):
  """Validate one modality's (pixels, grids) -> (pixels [P, D] float32 or None, grids [N, 3] int64)."""
  if grid is None and pixels is None:
    return None, np.zeros((0, 3), np.int64)
  names = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
  if grid is None or pixels is None:
    raise ValueError(f"{names[0]} and {names[1]} go together; got only {names[0] if grid is None else names[1]}")
  g = np.asarray(grid)
  if g.ndim != 2 or g.shape[1] != 3 or not np.issubdtype(g.dtype, np.integer) or (g.size and g.min() < 1):
    raise ValueError(f"{names[1]} must be a [N, 3] array of positive integers; got {g.tolist()}")
  m = cfg.vision.spatial_merge_size
  if kind == "image" and g.size and (g[:, 0] != 1).any():
    raise ValueError(f"{names[1]}: an image has t = 1; got {g.tolist()}")
  if g.size and ((g[:, 1] % m).any() or (g[:, 2] % m).any()):
    raise ValueError(f"{names[1]}: h and w must be multiples of the merge size {m}; got {g.tolist()}")
  x = np.asarray(pixels, np.float32)
  need = int(np.prod(g, axis=1).sum())
  if x.ndim != 2 or x.shape[1] != cfg.vision.patch_dim or x.shape[0] != need:
    raise ValueError(f"{names[0]} has shape {list(x.shape)} but {names[1]} {g.tolist()} needs "
                     f"[{need}, {cfg.vision.patch_dim}]")
  return x, g


def vision_batch(cfg: Qwen2VLConfig, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                 video_grid_thw=None) -> tuple[dict, np.ndarray, np.ndarray]:
  """-> (module kwargs: pixel_values [Pb, D], vision_rows_cols [Pb, 2], vision_segments [Pb], n_image_tokens;
  image grids, video grids). Empty kwargs when there is no image and no video."""
  img, ig = _grids(cfg, image_grid_thw, pixel_values, "image")
  vid, vg = _grids(cfg, video_grid_thw, pixel_values_videos, "video")
  parts = [x for x in (img, vid) if x is not None]
  if not parts:
    return {}, ig, vg
  x = np.concatenate(parts)
  rows_cols, segments = patch_positions(np.concatenate([ig, vg]), cfg.vision.spatial_merge_size)
  n, pb = x.shape[0], patch_bucket(x.shape[0])
  padded = np.zeros((pb, x.shape[1]), np.float32)
  padded[:n] = x
  rc = np.zeros((pb, 2), np.int32)
  rc[:n] = rows_cols
  seg = np.zeros((pb,), np.int32)
  seg[:n] = segments
  n_image_tokens = sum(tokens_of(g, cfg.vision.spatial_merge_size) for g in ig)
  kw = {"pixel_values": jnp.asarray(padded), "vision_rows_cols": jnp.asarray(rc),
        "vision_segments": jnp.asarray(seg), "n_image_tokens": jnp.int32(n_image_tokens)}
  return kw, ig, vg


def prepare(cfg: Qwen2VLConfig, ids: np.ndarray, mask: np.ndarray, **vision) -> dict:
  """Check placeholders against grids and grids against pixels -> keyword arguments of `Qwen2VL.__call__`."""
  kw, ig, vg = vision_batch(cfg, **vision)
  positions, _ = rope_index(ids, mask, ig, vg, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                            merge=cfg.vision.spatial_merge_size, rule=cfg.position_rule)
  return {"positions": jnp.asarray(positions), **kw}


def check_tokenizer(cfg: Qwen2VLConfig, tokenizer) -> None:
  """The placeholder ids come from config.json; a tokenizer that disagrees belongs to another model."""
  want = {VISION_START: cfg.vision_start_token_id, VISION_END: cfg.vision_end_token_id,
          IMAGE_PAD: cfg.image_token_id, VIDEO_PAD: cfg.video_token_id}
  have = getattr(tokenizer, "special_ids", {})
  for token, i in want.items():
    if have.get(token, i) != i:
      raise ValueError(f"tokenizer {getattr(tokenizer, 'path', '')} has {token} = {have[token]} but the model's "
                       f"config.json says {i}: not this model's tokenizer")


QWEN_VL_GROUNDING = {"<ref>": OBJECT_REF_START, "</ref>": OBJECT_REF_END, "<box>": BOX_START, "</box>": BOX_END}
_TAG = re.compile("|".join(map(re.escape, QWEN_VL_GROUNDING)))


def qwen2_grounding(text: str) -> str:
  """Qwen-VL grounding tags -> Qwen2-VL's (the coordinates are the same [0, 1000) integers)."""
  return _TAG.sub(lambda m: QWEN_VL_GROUNDING[m.group()], text)


def trusted_text_parts(tokenizer, text: str) -> list:
  """User text of a data file (trusted; chat input never is) as `chatml_ids` parts: text, with its Qwen-VL
  grounding tags (`<ref>`, `<box>`, ...) as the ids of Qwen2-VL's grounding tokens the tokenizer has."""
  parts, end = [], 0
  for m in _TAG.finditer(text):
    token = QWEN_VL_GROUNDING[m.group()]
    if token not in tokenizer.special_ids:
      continue
    parts += [text[end:m.start()], [tokenizer.special_id(token)]]
    end = m.end()
  return parts + [text[end:]]


def vision_block(cfg: Qwen2VLConfig, n_tokens: int, video: bool = False) -> list[int]:
  """The ids of one image (video) in a prompt: <|vision_start|>, n_tokens placeholders, <|vision_end|>."""
  pad = cfg.video_token_id if video else cfg.image_token_id
  return [cfg.vision_start_token_id] + [pad] * int(n_tokens) + [cfg.vision_end_token_id]


def prompt_media(cfg: Qwen2VLConfig, processor, kind: str, media, name: str | None = None) -> tuple[list, dict]:
  """One image or video of a chat prompt -> (prompt parts: its placeholder block's ids, its arrays for
  `generate`)."""
  if kind == "image":
    patches, grid = processor.preprocess_image(media, name=name)
    keys = ("pixel_values", "image_grid_thw")
  else:
    patches, grid = processor.preprocess_video(media, name=name)
    keys = ("pixel_values_videos", "video_grid_thw")
  return [vision_block(cfg, processor.tokens(grid), video=kind == "video")], dict(zip(keys, (patches, grid[None])))


def decode_kwargs(cfg: Qwen2VLConfig, longest_prompt: int) -> dict:
  """Nothing beyond the cache: each row's next position travels in it (`KVCache.next_pos`)."""
  del cfg, longest_prompt
  return {}


def encode_args(cfg: Qwen2VLConfig, pixel_values, image_grid_thw=None, video: bool = False):
  """-> (arguments of `Qwen2VL.encode_images` / `Qwen2VL.vit`, (real patches, real merged rows))."""
  if image_grid_thw is None:
    raise ValueError("Qwen2-VL needs the grids with the pixels: encode_images(pixel_values, image_grid_thw)")
  names = {"pixel_values_videos": pixel_values, "video_grid_thw": image_grid_thw} if video else {
      "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
  kw, ig, vg = vision_batch(cfg, **names)
  grids = vg if video else ig
  n = int(np.prod(grids, axis=1).sum())
  args = (kw["pixel_values"], kw["vision_rows_cols"], kw["vision_segments"])
  return args, (n, n // cfg.vision.spatial_merge_size ** 2)


def contrastive_image(cfg: Qwen2VLConfig, processor, image, size: int, name: str | None = None) -> dict:
  """One image as the contrastive stage feeds `Qwen2VL.pooled_vit`, resized to size x size (a multiple of 28) so
  every image has the same patches: {"pixel_values": [P, C*T*p*p], "vision_rows_cols": [P, 2],
  "vision_segments": [P]}."""
  from PIL import Image

  from qwenvl_jax.data.images import load_image
  if size % processor.factor:
    raise ValueError(f"contrastive image size {size} must be a multiple of {processor.factor}")
  img = load_image(image, name=name).resize((size, size), Image.Resampling.BICUBIC)
  patches, grid = processor.preprocess_image(img, name=name)
  if tuple(grid[1:]) != (size // processor.patch_size,) * 2:  # the pixel budget resized it again
    raise ValueError(f"contrastive image size {size} is outside the processor's pixel range")
  rows_cols, segments = patch_positions(grid[None], cfg.vision.spatial_merge_size)
  return {"pixel_values": patches, "vision_rows_cols": rows_cols, "vision_segments": segments}

"""InternVL pixels and image tokens: dynamic tiling, and how many tokens an image becomes.

An image is cut into a grid of S x S tiles (S = 448 for the released models) whose aspect ratio is closest to the
image's, among grids of min_tiles..max_tiles tiles: candidates (columns, rows) ordered by tile count (then columns,
then rows, as transformers' GotOcr2 processor); the first closest wins, except that on an exact tie a later grid
wins while the image's area exceeds half the grid's pixel area. The image is resized to the grid (PIL bicubic) and
cut row by row, left to right; with more than one tile a thumbnail (the whole image resized to S x S) comes last.
Each tile: / 255, ImageNet mean / std, [3, S, S]. Every tile becomes `tokens_per_tile` `<IMG_CONTEXT>` tokens
((S / patch / 2)^2: 256 at 448 px), so an image of n tiles is `<img>` + n * 256 `<IMG_CONTEXT>` + `</img>`.

    proc = InternVLProcessor.from_pretrained(folder)          # preprocessor_config.json, else config.json's fields
    out = proc(images=[img, ...])     # {"pixel_values": [N_tiles, 3, S, S] float32, "num_patches": [N_images]}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
from PIL import Image

from qwenvl_jax.data.images import load_image, normalized_chw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
  """(columns, rows) with min_tiles <= columns * rows <= max_tiles, by tile count (ties: columns, then rows)."""
  grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
           if min_tiles <= c * r <= max_tiles]
  return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
  """(columns, rows) of the tiling of a width x height image (module docstring)."""
  aspect, area = width / height, width * height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in candidate_grids(min_tiles, max_tiles):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
      best = (cols, rows)
  return best


@dataclasses.dataclass(frozen=True)
class InternVLProcessor:
  image_size: int = 448
  min_tiles: int = 1
  max_tiles: int = 12
  use_thumbnail: bool = True
  tokens_per_tile: int = 256
  image_mean: tuple[float, float, float] = IMAGENET_MEAN
  image_std: tuple[float, float, float] = IMAGENET_STD
  rescale_factor: float = 1 / 255

  def __post_init__(self):
    if not 1 <= self.min_tiles <= self.max_tiles:
      raise ValueError(f"need 1 <= min_tiles <= max_tiles; got {self.min_tiles}, {self.max_tiles}")

  fixed_image_tokens = None  # images become as many tokens as their tiles (`tokens`)

  @classmethod
  def for_config(cls, cfg, **overrides) -> "InternVLProcessor":
    return cls(**{"image_size": cfg.vision.image_size, "min_tiles": cfg.min_tiles, "max_tiles": cfg.max_tiles,
                  "use_thumbnail": cfg.use_thumbnail, "tokens_per_tile": cfg.tokens_per_tile, **overrides})

  @classmethod
  def from_pretrained(cls, folder: str, cfg, **overrides) -> "InternVLProcessor":
    """The native folder's `preprocessor_config.json` (GotOcr2ImageProcessor settings); the original format keeps
    its tiling in config.json (already in `cfg`). Keyword overrides (e.g. max_tiles) win."""
    path = os.path.join(folder, "preprocessor_config.json")
    kw = {}
    if cfg.checkpoint_format == "native" and os.path.isfile(path):
      kw = _read_settings(path)
    return cls.for_config(cfg, **{**kw, **overrides})

  # --- sizes and token counts ---------------------------------------------------------------------
  def grid(self, width: int, height: int) -> tuple[int, int]:
    return tile_grid(width, height, self.image_size, self.min_tiles, self.max_tiles)

  def num_tiles(self, width: int, height: int) -> int:
    """Tiles of an image, the thumbnail included."""
    cols, rows = self.grid(width, height)
    return cols * rows + (1 if self.use_thumbnail and cols * rows > 1 else 0)

  def tokens(self, num_tiles: int) -> int:
    """`<IMG_CONTEXT>` tokens of an image of `num_tiles` tiles."""
    return int(num_tiles) * self.tokens_per_tile

  # --- pixels ------------------------------------------------------------------------------------
  def tiles(self, img: Image.Image) -> list[Image.Image]:
    s = self.image_size
    cols, rows = self.grid(img.width, img.height)
    big = img.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
    out = [big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    if self.use_thumbnail and len(out) > 1:
      out.append(img.resize((s, s), Image.Resampling.BICUBIC))
    return out

  def preprocess(self, image, name: str | None = None) -> np.ndarray:
    """One image (path, bytes or PIL) -> its tiles [n, 3, S, S] float32."""
    img = load_image(image, name=name)
    return np.stack([normalized_chw(t, self.image_mean, self.image_std, self.rescale_factor)
                     for t in self.tiles(img)])

  def __call__(self, images=None) -> dict:
    """images: list of images -> {"pixel_values": [N_tiles, 3, S, S], "num_patches": [N_images]}."""
    parts = [self.preprocess(im, name=None if isinstance(im, str) else f"images[{i}]")
             for i, im in enumerate(images or [])]
    s = self.image_size
    return {"pixel_values": np.concatenate(parts) if parts else np.zeros((0, 3, s, s), np.float32),
            "num_patches": np.asarray([len(p) for p in parts], np.int64)}


def _read_settings(path: str) -> dict:
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable processor config ({e})") from None
  kw: dict = {}
  size = d.get("size") or {}
  if size:
    h, w = size.get("height"), size.get("width")
    if h != w:
      raise ValueError(f"{path}: size {size}: square tiles only")
    kw["image_size"] = int(h)
  if "crop_to_patches" in d and not d["crop_to_patches"]:
    kw["max_tiles"] = 1
  else:
    for ours, theirs in (("min_tiles", "min_patches"), ("max_tiles", "max_patches")):
      if theirs in d:
        kw[ours] = int(d[theirs])
  for key in ("image_mean", "image_std"):
    if key in d:
      kw[key] = tuple(float(x) for x in d[key])
  if "rescale_factor" in d:
    kw["rescale_factor"] = float(d["rescale_factor"])
  if d.get("resample", 3) != 3:
    raise ValueError(f"{path}: resample {d['resample']} is not supported (bicubic = 3)")
  return kw

"""Qwen2-VL pixels and image tokens: smart_resize, patchify, and how many tokens an image or video becomes.

Images keep their aspect ratio: each side is rounded to a multiple of patch * merge (28), then the whole image is
scaled into [min_pixels, max_pixels] (`smart_resize`, as the transformers processor: Python `round`, i.e. half to
even). Pixels: PIL bicubic resize of the RGB uint8 image, / 255 (in float64, then float32), CLIP mean/std. Patches
are rows [C * T * p * p] walked in merge x merge windows (window row, window column, row in window, column in
window), so the merger's 2x2 groups are 4 consecutive rows; an image repeats itself over the T = 2 temporal slots.
Videos are video files (a path or the file's bytes: decoded by `data.video.read_video`, `video_fps` frames per
second, 2 as in Qwen2-VL) or lists of frames (all frames used: sample them before), padded to a multiple of T by
repeating the last frame, frame 2k and 2k+1 forming temporal patch k; frames are resized like images (PIL bicubic).

Token cap (`video_max_tokens`, 16384 as in the Qwen2-VL paper; 0 / None: none): a video whose t * h * w / merge^2
tokens at its smart_resize'd size would exceed the cap gets a smaller frame size instead (all frames alike, aspect
kept, multiples of 28, at least one 28 x 28 merged patch), so it keeps its whole duration. Only when even the
smallest size is too much for that many frames are frames dropped, evenly over the video and to an even count
(whole temporal patches, no padding frame). Either way the grid says what was produced, so the placeholder count
(`tokens(grid)`) always matches the features: nothing is cut later.

    proc = Qwen2VLProcessor.from_pretrained(folder, max_pixels=512 * 28 * 28)
    out = proc(images=[img, ...])     # {"pixel_values": [P, 1176] float32, "image_grid_thw": [N, 3] int64}
    out = proc(videos=["clip.mp4", [f0, f1, ...]])  # {"pixel_values_videos": [...], "video_grid_thw": [...]}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from PIL import Image

from qwenvl_jax.data.images import CLIP_MEAN, CLIP_STD, ImageError, load_image, normalized_chw
from qwenvl_jax.data.video import DEFAULT_FPS, read_video, spread
from qwenvl_jax.models.qwen2_vl.positions import tokens_of


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """(height, width) -> resized (height, width): multiples of `factor`, area within [min_pixels, max_pixels]."""
  if min(height, width) <= 0:
    raise ValueError(f"image of {width}x{height} pixels has no area")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200 ({width}x{height})")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class Qwen2VLProcessor:
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  rescale_factor: float = 1 / 255
  video_min_pixels: int | None = None   # None: the image budget
  video_max_pixels: int | None = None
  video_fps: float = DEFAULT_FPS          # frames per second sampled from a video file
  video_max_tokens: int | None = 16384    # LLM tokens per video at most (module docstring); 0 / None: no cap

  def __post_init__(self):
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f"need 0 < min_pixels <= max_pixels; got min_pixels={self.min_pixels}, "
                       f"max_pixels={self.max_pixels}")
    factor = self.factor
    if self.max_pixels < factor * factor:
      raise ValueError(f"max_pixels {self.max_pixels} is below one {factor}x{factor} merged patch")
    if not self.video_fps > 0 or (self.video_max_tokens or 0) < 0:
      raise ValueError(f"need video_fps > 0 and video_max_tokens >= 0; got {self.video_fps}, {self.video_max_tokens}")

  @classmethod
  def for_config(cls, cfg, **overrides) -> "Qwen2VLProcessor":
    """The processor for a model config (the released defaults: 56*56 .. 28*28*1280 pixels)."""
    v = cfg.vision
    return cls(**{"patch_size": v.patch_size, "merge_size": v.spatial_merge_size,
                  "temporal_patch_size": v.temporal_patch_size, **overrides})

  @classmethod
  def from_pretrained(cls, folder: str, cfg=None, **overrides) -> "Qwen2VLProcessor":
    """Read `preprocessor_config.json` (and `video_preprocessor_config.json` if present) of an HF folder; keyword
    overrides (e.g. max_pixels) win. Without the file, the config's defaults."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
      if cfg is None:
        raise FileNotFoundError(f"no preprocessor_config.json in {folder}")
      return cls.for_config(cfg, **overrides)
    kw = _read_settings(path)
    video = os.path.join(folder, "video_preprocessor_config.json")
    if os.path.isfile(video):
      v = _read_settings(video)
      kw["video_min_pixels"], kw["video_max_pixels"] = v.get("min_pixels"), v.get("max_pixels")
    kw.update(overrides)
    return cls(**kw)

  fixed_image_tokens = None  # images become as many tokens as their grid says (`tokens`)

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size ** 2

  # --- sizes and token counts ---------------------------------------------------------------------
  def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
    """Patch grid (1, h, w) of an image of height x width pixels."""
    h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
    return 1, h // self.patch_size, w // self.patch_size

  def video_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(frames kept, height, width in pixels) of a video of `frames` frames of height x width: smart_resize'd, then
    fitted to `video_max_tokens` (module docstring: smaller frames first, fewer frames only past the smallest)."""
    f, t_size = self.factor, self.temporal_patch_size
    lo, hi = self.video_min_pixels or self.min_pixels, self.video_max_pixels or self.max_pixels
    h, w = smart_resize(height, width, f, lo, hi)
    cap, t = self.video_max_tokens, -(-frames // t_size)
    if not cap or t * (h // f) * (w // f) <= cap:
      return frames, h, w
    budget = cap // t  # tokens (merged patches) one temporal patch may take
    while budget >= 1:
      px = budget * f * f
      h, w = smart_resize(height, width, f, min(lo, px), min(hi, px))
      per = (h // f) * (w // f)  # can exceed the budget: smart_resize keeps every side >= 28
      if t * per <= cap:
        return frames, h, w
      budget = min(budget - 1, budget * cap // (t * per))
    # still too many frames at the smallest size: keep as many whole temporal patches as fit
    h, w = smart_resize(height, width, f, min(lo, f * f), f * f)
    per = (h // f) * (w // f)
    if per > cap:
      raise ValueError(f"video of {width}x{height} needs {per} tokens per frame pair even at its smallest size, "
                       f"over video_max_tokens={cap}")
    return cap // per * t_size, h, w

  def video_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of a video of `frames` frames of height x width pixels (after the token cap)."""
    frames, h, w = self.video_size(frames, height, width)
    return -(-frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

  def tokens(self, grid) -> int:
    """LLM tokens (`<|image_pad|>` / `<|video_pad|>` count) of one grid."""
    return tokens_of(grid, self.merge_size)

  def tokens_per_image(self, height: int, width: int) -> int:
    return self.tokens(self.image_grid(height, width))

  # --- pixels ------------------------------------------------------------------------------------
  def _normalized(self, img: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB PIL -> float32 [3, height, width], resized (PIL bicubic) and normalised."""
    if img.size != (width, height):
      img = img.resize((width, height), Image.Resampling.BICUBIC)
    return normalized_chw(img, self.image_mean, self.image_std, self.rescale_factor)

  def _patchify(self, frames: np.ndarray) -> np.ndarray:
    """[F, 3, H, W] with F a multiple of T -> [F/T * H/p * W/p, 3 * T * p * p] in merge-window order."""
    f, c, h, w = frames.shape
    p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
    x = frames.reshape(f // t, t, c, h // p // m, m, p, w // p // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # T', window row, window col, row in w., col in w., C, T, p, p
    return x.reshape(-1, c * t * p * p)

  def preprocess_image(self, image, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image (path, bytes or PIL) -> (patches [h*w, C*T*p*p] float32, grid [3] int64)."""
    img = load_image(image, name=name)
    _, gh, gw = grid = self.image_grid(img.height, img.width)
    x = self._normalized(img, gh * self.patch_size, gw * self.patch_size)
    frames = np.broadcast_to(x[None], (self.temporal_patch_size,) + x.shape)
    return self._patchify(frames), np.asarray(grid, np.int64)

  def preprocess_video(self, video, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One video: a video file (path or bytes, sampled at video_fps) or its frames (paths, bytes or PIL images)
    -> (patches [t*h*w, C*T*p*p] float32, grid [3] int64)."""
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
      imgs = read_video(video, fps=self.video_fps, name=name)
      name = name or "video"
    else:
      name = name or "video"
      if len(video) == 0:
        raise ImageError(name, "a video needs at least one frame", kind="video")
      imgs = [load_image(f, name=f"{name} frame {i}") for i, f in enumerate(video)]
    sizes = {im.size for im in imgs}
    if len(sizes) > 1:
      raise ImageError(name, f"frames differ in size: {sorted(sizes)}", kind="video")
    kept, h, w = self.video_size(len(imgs), imgs[0].height, imgs[0].width)
    if kept < len(imgs):  # past the token cap even at the smallest size: frames spread evenly over the video
      imgs = spread(imgs, kept)
    grid = (-(-kept // self.temporal_patch_size), h // self.patch_size, w // self.patch_size)
    x = np.stack([self._normalized(im, h, w) for im in imgs])
    pad = -len(imgs) % self.temporal_patch_size
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return self._patchify(x), np.asarray(grid, np.int64)

  def __call__(self, images=None, videos=None) -> dict:
    """images: list of images; videos: list of frame lists -> the HF processor's arrays (only those asked for)."""
    out = {}
    if images is not None:
      parts = [self.preprocess_image(im, name=None if isinstance(im, str) else f"images[{i}]")
               for i, im in enumerate(images)]
      out["pixel_values"] = np.concatenate([p for p, _ in parts]) if parts else np.zeros((0, self.patch_dim),
                                                                                          np.float32)
      out["image_grid_thw"] = np.stack([g for _, g in parts]) if parts else np.zeros((0, 3), np.int64)
    if videos is not None:
      parts = [self.preprocess_video(v, name=None if isinstance(v, (str, os.PathLike)) else f"videos[{i}]")
               for i, v in enumerate(videos)]
      out["pixel_values_videos"] = np.concatenate([p for p, _ in parts]) if parts else np.zeros(
          (0, self.patch_dim), np.float32)
      out["video_grid_thw"] = np.stack([g for _, g in parts]) if parts else np.zeros((0, 3), np.int64)
    return out


def _read_settings(path: str) -> dict:
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable processor config ({e})") from None
  size = d.get("size") or {}
  kw = {"min_pixels": d.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": d.get("max_pixels", size.get("longest_edge"))}
  for key in ("patch_size", "merge_size", "temporal_patch_size", "rescale_factor"):
    if key in d:
      kw[key] = d[key]
  for key in ("image_mean", "image_std"):
    if key in d:
      kw[key] = tuple(float(x) for x in d[key])
  if d.get("resample", 3) != 3:
    raise ValueError(f"{path}: resample {d['resample']} is not supported (bicubic = 3)")
  return {k: v for k, v in kw.items() if v is not None}

"""Image loading and the official Qwen-VL image transform (PIL bicubic resize, CLIP normalisation).

`preprocess_image` reproduces `Image.open(p).convert('RGB')` -> `resize((s, s), BICUBIC)` -> `/255` ->
`(x - mean) / std` in float32, bit for bit. `load_image` adds what the official code lacks: every failure
(missing, corrupt, truncated, empty, oversized, not a regular file) is one `ImageError` whose message never quotes
the file's bytes, and high-bit-depth modes keep their contrast.
No EXIF transposition is applied, because the official code does not apply one either.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.asarray(CLIP_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.asarray(CLIP_STD, np.float32).reshape(3, 1, 1)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


class ImageError(ValueError):
  """An image (or video: kind="video") that cannot be used; the message is one line naming it and the problem."""

  def __init__(self, name: str, problem: str, kind: str = "image"):
    # callers log these per sample: keep them on one line whatever PIL (or FFmpeg) put in its message
    name = " ".join(str(name).splitlines())
    super().__init__(f"cannot load {kind} {name}: {' '.join(str(problem).split())}")
    self.name = name


_BYTES_REPR = re.compile(r"\bb'(?:[^'\\]|\\.)*'" r'|\bb"(?:[^"\\]|\\.)*"')  # b'...' / b"..." in a message
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _without_bytes(e: Exception) -> str:
  """An exception's message without file contents: PIL's PNM parser puts raw header bytes in its messages (as a
  bytes argument, or b'...' inside the text), and a non-image file's bytes may be anything."""
  if any(isinstance(a, (bytes, bytearray)) for a in e.args):
    text = " ".join(str(a) for a in e.args if not isinstance(a, (bytes, bytearray)))
  else:
    text = str(e)
  text = _BYTES_REPR.sub("<file bytes>", text)
  return f"{type(e).__name__}: {text[:200]}" if text.strip() else f"{type(e).__name__}: corrupt or unsupported data"


def _regular_file(path, name: str) -> None:
  """A FIFO would block open() until a writer comes and a device like /dev/zero never ends: refuse both at once."""
  mode = os.stat(path).st_mode
  if not stat.S_ISREG(mode):
    kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
    raise ImageError(name, f"{kind}, not an image file")


def _to_8bit(img: Image.Image) -> Image.Image:
  """Scale a 16/32-bit integer or float image [H, W] to mode "L" (PIL's own convert would clip it to 255)."""
  a = np.asarray(img)
  if img.mode.startswith("I;16"):
    out = np.round(a.astype(np.float64) / 257.0)  # 65535 / 257 == 255 exactly
  else:  # "I" (int32) or "F" (float32): no fixed range, so stretch min..max to 0..255
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    lo, hi = (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 0.0)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    # a flat image has no range to stretch: keep it black rather than divide by zero
    out = np.round((a - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(a)
  return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))  # 2-D uint8 -> mode "L"


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any mode -> RGB; alpha is dropped (not composited) exactly like the official `convert('RGB')`."""
  if img.mode.startswith("I;16") or img.mode in ("I", "F"):
    img = _to_8bit(img)
  return img if img.mode == "RGB" else img.convert("RGB")


def _checked(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
  """Check the header size, then fully decode and convert to RGB."""
  w, h = img.size
  if w <= 0 or h <= 0:
    raise ImageError(name, f"zero-sized image ({w}x{h})")
  if w * h > max_pixels:
    raise ImageError(name, f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} (decompression bomb?)")
  img.load()  # decode now so a truncated or corrupt body fails here and not inside a later resize
  out = _to_rgb(img)
  return out.copy() if out is img else out  # never hand back (or later mutate) the caller's object


def load_image(src: ImageSource, name: str | None = None, max_pixels: int = 64_000_000) -> Image.Image:
  """Path, encoded bytes or PIL image -> fully decoded RGB PIL image. Raises ImageError for any failure."""
  if isinstance(src, (str, os.PathLike)):
    name = name if name is not None else os.fsdecode(src)
  elif isinstance(src, (bytes, bytearray, memoryview)):
    name = name if name is not None else f"<{len(src)} bytes>"
  elif isinstance(src, Image.Image):
    name = name if name is not None else "<PIL image>"
  else:
    raise ImageError(name if name is not None else repr(src)[:80], f"unsupported source type {type(src).__name__}")
  try:
    # PIL warns (beyond MAX_IMAGE_PIXELS) before raising (beyond twice that): both are bombs for us. The filter is
    # process-global, but a race between threads can only leave this one warning class escalated, which is harmless.
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      if isinstance(src, Image.Image):
        return _checked(src, name, max_pixels)
      if isinstance(src, (str, os.PathLike)):
        _regular_file(src, name)
      with Image.open(io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src) as img:
        return _checked(img, name, max_pixels)
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError(name, "no such file") from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageError(name, f"decompression bomb: {e}") from None
  except Image.UnidentifiedImageError:
    raise ImageError(name, "not a recognised image (unknown format, corrupt or empty header)") from None
  except Exception as e:  # noqa: BLE001 -- truncated data, bad chunks, unsupported modes, I/O errors: one type
    raise ImageError(name, _without_bytes(e)) from None


def preprocess_image(src: ImageSource, size: int, name: str | None = None) -> np.ndarray:
  """One image -> float32 [3, size, size], the official Qwen-VL transform (PIL bicubic, CLIP mean/std)."""
  img = load_image(src, name=name).resize((size, size), Image.Resampling.BICUBIC)
  x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
  return (x - _MEAN) / _STD


def normalized_chw(img: Image.Image, mean, std, rescale_factor: float = 1 / 255) -> np.ndarray:
  """RGB PIL image -> float32 [3, H, W] as transformers' image processors make it: uint8 * rescale_factor in
  float64, cast to float32, then (x - mean) / std in float32."""
  x = np.asarray(img, np.uint8).transpose(2, 0, 1)
  x = (x.astype(np.float64) * rescale_factor).astype(np.float32)
  return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def preprocess_images(srcs: Sequence[ImageSource], size: int) -> np.ndarray:
  """Images -> float32 [N, 3, size, size] (N may be 0)."""
  out = np.empty((len(srcs), 3, size, size), np.float32)
  for i, src in enumerate(srcs):
    # paths name themselves; in-memory sources get their position so a failing sample can be found
    out[i] = preprocess_image(src, size, name=None if isinstance(src, (str, os.PathLike)) else f"srcs[{i}]")
  return out

"""Video files -> frames sampled at a fixed rate (PyAV), and small clips -> video files.

    frames = read_video("clip.mp4", fps=2.0)          # [PIL RGB, ...]: one frame per 1/fps seconds
    data = write_video(frames, fps=2.0)              # bytes of a lossless FFV1 / Matroska file

Sampling follows the stream's own timestamps (pts * time_base, counted from the first frame), not frame indices, so
variable frame rates and odd container rates sample the same instants: for each time t = 0, 1/fps, 2/fps, ... up to
the last frame's time, the frame nearest to t (the earlier one on a tie). A frame is taken once even when the video
has fewer frames per second than `fps` (repeating it would only cost tokens), and a video shorter than one interval
gives its first frame. 2 fps is Qwen2-VL's rate. Frames are decoded one at a time and only the sampled ones are
kept, so memory grows with the sampled frames, not the video's.

Every failure (missing file, undecodable data, no video stream, no frame) is one `ImageError` naming the video; a
file cut short gives the frames before the cut.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from PIL import Image

from qwenvl_jax.data.images import ImageError

VideoSource = str | os.PathLike | bytes | bytearray | memoryview
DEFAULT_FPS = 2.0


def _name(src, name: str | None) -> str:
  if name is not None:
    return name
  if isinstance(src, (str, os.PathLike)):
    return os.fsdecode(src)
  return f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else repr(src)[:80]


def read_video(src: VideoSource, fps: float = DEFAULT_FPS, max_frames: int | None = None,
               name: str | None = None) -> list[Image.Image]:
  """A video file (path or encoded bytes) -> its frames sampled at `fps` per second, as PIL RGB images.

  max_frames: keep at most this many, spread evenly over the sampled ones (first and last included)."""
  import av  # imported here: only video data needs it

  name = _name(src, name)
  if not fps > 0 or (max_frames is not None and max_frames < 1):
    raise ValueError(f"need fps > 0 and max_frames >= 1 (or None); got fps={fps}, max_frames={max_frames}")
  if isinstance(src, (str, os.PathLike)):
    if not os.path.isfile(src):
      raise ImageError(name, "no such file", kind="video")
    file = src
  elif isinstance(src, (bytes, bytearray, memoryview)):
    if not len(src):
      raise ImageError(name, "empty data", kind="video")
    file = io.BytesIO(bytes(src))
  else:
    raise ImageError(name, f"unsupported source type {type(src).__name__}", kind="video")
  try:
    with av.open(file, "r") as container:
      if not container.streams.video:
        raise ImageError(name, "no video stream", kind="video")
      stream = container.streams.video[0]
      rate = float(stream.average_rate or stream.guessed_rate or 0) or None
      frames = _sample(_until_eof(container.decode(stream), av.error.EOFError), fps, rate)
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001 -- av.error.* (invalid data, unsupported codec), EOF, I/O: one type
    raise ImageError(name, f"not a decodable video ({type(e).__name__}: {e})", kind="video") from None
  if not frames:
    raise ImageError(name, "no frames could be decoded", kind="video")
  if max_frames is not None and len(frames) > max_frames:
    frames = spread(frames, max_frames)
  return frames


def spread(frames: Sequence, n: int) -> list:
  """n of the frames (n <= len), evenly spaced over them, the first and the last included."""
  return [frames[i] for i in np.linspace(0, len(frames) - 1, n).round().astype(int)]


def _until_eof(decoded, eof):
  """The decoded frames; FFmpeg's end-of-file error (a stream with no frame, or cut short) just ends them."""
  try:
    yield from decoded
  except eof:
    return


def _sample(decoded, fps: float, rate: float | None) -> list[Image.Image]:
  """The frames nearest to t = k / fps (k = 0, 1, ...) among decoded frames, each at most once."""
  out: list[Image.Image] = []
  step = 1.0 / fps
  k, taken = 0, -1          # next sample index; index of the last frame taken
  prev = prev_t = None      # the previous decoded frame, its time
  t0 = None
  for i, frame in enumerate(decoded):
    # a frame without a timestamp (rare: raw streams) takes its place from the stream's rate
    t = float(frame.time) if frame.time is not None else (i / rate if rate else i * step)
    t0 = t if t0 is None else t0
    t -= t0
    while k * step <= t + 1e-9:  # sample time k lies between prev and this frame: take the nearer
      target = k * step
      pick, j = ((prev, i - 1) if prev is not None and target - prev_t <= t - target else (frame, i))
      if j != taken:
        out.append(pick.to_image())  # converted to RGB by PyAV
        taken = j
      k += 1
    prev, prev_t = frame, t
  return out


def write_video(frames: Sequence, fps: float = DEFAULT_FPS) -> bytes:
  """Frames (PIL images or [H, W, 3] uint8 arrays, one size) -> an FFV1 video in Matroska, as bytes.

  FFV1 with 8-bit RGB is lossless, so reading it back at `fps` gives the same pixels (the shapes clips round-trip
  exactly through TFDS); frame k is stamped at k / fps."""
  import av

  arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f, np.uint8) for f in frames]
  if not arrays or any(a.shape != arrays[0].shape or a.ndim != 3 or a.shape[2] != 3 for a in arrays):
    raise ValueError("write_video needs at least one frame, all [H, W, 3] of one size")
  buf = io.BytesIO()
  with av.open(buf, "w", format="matroska") as container:
    stream = container.add_stream("ffv1", rate=Fraction(fps).limit_denominator(1000))
    stream.height, stream.width = arrays[0].shape[:2]
    stream.pix_fmt = "bgr0"  # FFV1's 8-bit RGB layout: no YUV conversion, so no loss
    for a in arrays:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
    container.mux(stream.encode())
  return buf.getvalue()

"""Comparing shapes records (the synthetic dataset's, and what its TFDS builder reads back): the same texts and the
same pixels in every image and video frame."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qwenvl_jax.data import video as video_lib


def image_array(image: Image.Image) -> np.ndarray:
  return np.asarray(image)


def video_frames(video) -> list:
  """A video's frames, decoded (at 2 fps: every frame of a shapes clip) when it is a file's bytes."""
  return video_lib.read_video(video) if isinstance(video, bytes) else video


def same_record(a: dict, b: dict) -> bool:
  """Same text everywhere and the same pixels in every image and every video frame."""
  if (a["id"], a["task"], a["conversations"], a["objects"]) != (b["id"], b["task"], b["conversations"], b["objects"]):
    return False
  if list(a["images"]) != list(b["images"]) or list(a.get("videos", {})) != list(b.get("videos", {})):
    return False
  for name in a.get("videos", {}):
    fa, fb = video_frames(a["videos"][name]), video_frames(b["videos"][name])
    if len(fa) != len(fb) or not all(np.array_equal(image_array(x), image_array(y)) for x, y in zip(fa, fb)):
      return False
  return all(np.array_equal(image_array(a["images"][k]), image_array(b["images"][k])) for k in a["images"])

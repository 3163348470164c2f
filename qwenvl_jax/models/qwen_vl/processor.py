"""Qwen-VL pixels and image tokens: the one home of the input resolution and of how many tokens an image becomes.

Every image is resized to a fixed square (448 px for the released model; the paper's stage 1 feeds 224 px into the
same model, whose position table is resized to the patch grid) and becomes `n_queries` resampler outputs, which
fill the slots between `<img>` and `</img>`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwenvl_jax.data.images import preprocess_image
from qwenvl_jax.models.qwen_vl.config import QwenVLConfig


@dataclasses.dataclass(frozen=True)
class QwenVLProcessor:
  image_size: int = 448
  patch_size: int = 14
  n_queries: int = 256

  @classmethod
  def for_config(cls, cfg: QwenVLConfig, image_size: int | None = None) -> "QwenVLProcessor":
    """The processor of a model config; `image_size` overrides the resolution (e.g. 224 px in stage 1)."""
    v = cfg.visual
    size = v.image_size if image_size is None else int(image_size)
    if size <= 0 or size % v.patch_size:
      raise ValueError(f"image_size {size} must be a positive multiple of the patch size {v.patch_size}")
    return cls(image_size=size, patch_size=v.patch_size, n_queries=v.n_queries)

  @property
  def tokens_per_image(self) -> int:
    """Slots between `<img>` and `</img>` (the tokenizer's `image_span`)."""
    return self.n_queries

  @property
  def fixed_image_tokens(self) -> int:
    """Every image becomes this many tokens (what a tokenizer's fixed image span is sized to)."""
    return self.n_queries

  @property
  def patches_per_image(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def pixel_shape(self) -> tuple[int, int, int]:
    return (3, self.image_size, self.image_size)

  def preprocess(self, image, name: str | None = None) -> np.ndarray:
    """One image (path, bytes or PIL) -> float32 [3, S, S] (official transform: PIL bicubic, CLIP mean/std)."""
    return preprocess_image(image, self.image_size, name=name)

  def __call__(self, images=()) -> dict:
    """images: list of paths / bytes / PIL images -> {"pixel_values": float32 [N, 3, S, S]}."""
    out = np.empty((len(images),) + self.pixel_shape, np.float32)
    for i, img in enumerate(images):
      out[i] = self.preprocess(img, name=None if isinstance(img, str) else f"images[{i}]")
    return {"pixel_values": out}

"""Host-side model inputs of Qwen-VL: checks with one-line errors, then the arrays the Flax module takes.

    kwargs = prepare(cfg, input_ids, attention_mask, pixel_values=...)     # -> module(input_ids, **kwargs)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qwenvl_jax.models.qwen_vl.config import QwenVLConfig
from qwenvl_jax.nn.rotary import ntk_alpha

VISION_ARGS = ("pixel_values",)


def find_image_spans(input_ids: np.ndarray, cfg: QwenVLConfig) -> list[tuple[int, int, int]]:
  """[(row, pos of <img>, pos of </img>)] in consumption order; raises ValueError on malformed spans."""
  v = cfg.visual
  spans = []
  for b, row in enumerate(np.asarray(input_ids)):
    starts = np.flatnonzero(row == v.image_start_id)
    ends = np.flatnonzero(row == v.image_end_id)
    if len(starts) != len(ends):
      raise ValueError(f"row {b}: {len(starts)} <img> tokens but {len(ends)} </img> tokens")
    for k, (a, e) in enumerate(zip(starts, ends)):
      if e < a or (k + 1 < len(starts) and starts[k + 1] < e):
        raise ValueError(f"row {b}: nested or unbalanced <img> / </img> tokens")
      if e - a - 1 != v.n_queries:
        raise ValueError(f"row {b}: image span <img>@{a} .. </img>@{e} holds {e - a - 1} tokens; "
                         f"the model needs exactly {v.n_queries}")
      spans.append((b, int(a), int(e)))
  return spans


def pixels(cfg: QwenVLConfig, pixel_values) -> jnp.ndarray:
  x = jnp.asarray(pixel_values, jnp.float32)
  p = cfg.visual.patch_size
  if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
    raise ValueError(f"pixel_values must be [N, 3, H, W] with H, W multiples of {p}; got {tuple(x.shape)}")
  return x


def prepare(cfg: QwenVLConfig, ids: np.ndarray, mask: np.ndarray, pixel_values=None) -> dict:
  """Check that the image spans fit the images -> keyword arguments of `QwenVL.__call__`."""
  spans = find_image_spans(np.where(mask.astype(bool), ids, -1), cfg)
  x = None if pixel_values is None else pixels(cfg, pixel_values)
  n_images = 0 if x is None else x.shape[0]
  if len(spans) != n_images:
    raise ValueError(f"input_ids contain {len(spans)} image spans but {n_images} images were given")
  return {"pixel_values": x}


def decode_kwargs(cfg: QwenVLConfig, longest_prompt: int) -> dict:
  """Keyword arguments of every forward of one generation: the NTK alpha is fixed at the prefill from the longest
  prompt, as the official code does."""
  alpha = ntk_alpha(longest_prompt, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
  return {"ntk_alpha_value": jnp.float32(alpha)}


def encode_args(cfg: QwenVLConfig, pixel_values) -> tuple[tuple, None]:
  """-> (arguments of `QwenVL.encode_images` / `QwenVL.vit`, None: every output row is real)."""
  return (pixels(cfg, pixel_values),), None


def contrastive_image(cfg: QwenVLConfig, processor, image, size: int, name: str | None = None) -> dict:
  """One image as the contrastive stage feeds `QwenVL.pooled_vit`: {"pixel_values": [3, size, size]} (the official
  transform)."""
  del cfg, processor
  from qwenvl_jax.data.images import preprocess_image
  return {"pixel_values": preprocess_image(image, size, name=name)}

"""Host-side model inputs of InternVL: checks with one-line errors, then the arrays the Flax module takes.

    kwargs = prepare(cfg, input_ids, attention_mask, pixel_values=..., num_patches=...)   # -> module(ids, **kwargs)

Tiles are padded to a bucket (the next power of two), so a new tile count compiles a new program only past a power
of two; padding tiles are encoded but their features are never read.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from PIL import Image

from qwenvl_jax.models.internvl.config import IMG_CONTEXT, IMG_END, IMG_START, InternVLConfig

VISION_ARGS = ("pixel_values", "num_patches")


def tile_bucket(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def tiles(cfg: InternVLConfig, pixel_values) -> np.ndarray:
  x = np.asarray(pixel_values, np.float32)
  s = cfg.vision.image_size
  if x.ndim != 4 or x.shape[1:] != (3, s, s):
    raise ValueError(f"pixel_values must be [N_tiles, 3, {s}, {s}]; got shape {list(x.shape)}")
  return x


def prepare(cfg: InternVLConfig, ids: np.ndarray, mask: np.ndarray, pixel_values=None, num_patches=None) -> dict:
  """Check that the `<IMG_CONTEXT>` tokens fit the tiles -> keyword arguments of `InternVL.__call__`."""
  n_ctx = int(((ids == cfg.image_token_id) & mask.astype(bool)).sum())
  x = None if pixel_values is None else tiles(cfg, pixel_values)
  n = 0 if x is None else x.shape[0]
  if num_patches is not None and int(np.asarray(num_patches).sum()) != n:
    raise ValueError(f"num_patches {np.asarray(num_patches).tolist()} sums to {int(np.asarray(num_patches).sum())} "
                     f"but pixel_values holds {n} tiles")
  if n_ctx != n * cfg.tokens_per_tile:
    raise ValueError(f"input_ids hold {n_ctx} <IMG_CONTEXT> tokens but {n} tiles need {n * cfg.tokens_per_tile} "
                     f"({cfg.tokens_per_tile} per tile)")
  if x is None or n == 0:
    return {}
  padded = np.zeros((tile_bucket(n),) + x.shape[1:], np.float32)
  padded[:n] = x
  return {"pixel_values": jnp.asarray(padded)}


def image_block(cfg: InternVLConfig, num_tiles: int) -> list[int]:
  """The ids of one image in a prompt: <img>, num_tiles * tokens_per_tile <IMG_CONTEXT>, </img>."""
  if cfg.image_start_token_id is None or cfg.image_end_token_id is None:
    raise ValueError("the model config has no <img> / </img> ids (read from the checkpoint's tokenizer files)")
  return [cfg.image_start_token_id] + [cfg.image_token_id] * (num_tiles * cfg.tokens_per_tile) + [
      cfg.image_end_token_id]


def prompt_media(cfg: InternVLConfig, processor, kind: str, media, name: str | None = None) -> tuple[list, dict]:
  """One image of a chat prompt -> (prompt parts: its block's ids and a newline, its tiles {"pixel_values":
  [n, 3, S, S]})."""
  if kind != "image":
    raise ValueError("InternVL takes images only (no video input)")
  tiles = processor.preprocess(media, name=name)
  return [image_block(cfg, len(tiles)), "\n"], {"pixel_values": tiles}


def check_tokenizer(cfg: InternVLConfig, tokenizer) -> None:
  """The image ids come from the checkpoint; a tokenizer that disagrees belongs to another model."""
  want = {IMG_CONTEXT: cfg.image_token_id, IMG_START: cfg.image_start_token_id, IMG_END: cfg.image_end_token_id}
  have = getattr(tokenizer, "special_ids", {})
  for token, i in want.items():
    if i is not None and have.get(token, i) != i:
      raise ValueError(f"tokenizer {getattr(tokenizer, 'path', '')} has {token} = {have[token]} but the model "
                       f"says {i}: not this model's tokenizer")


def decode_kwargs(cfg: InternVLConfig, longest_prompt: int) -> dict:
  """Nothing beyond the cache: each row's next position travels in it (`KVCache.next_pos`)."""
  del cfg, longest_prompt
  return {}


def encode_args(cfg: InternVLConfig, pixel_values) -> tuple[tuple, None]:
  """-> (arguments of `InternVL.encode_images` / `InternVL.vit`, None: every output row is real)."""
  return (jnp.asarray(tiles(cfg, pixel_values)),), None


def contrastive_image(cfg: InternVLConfig, processor, image, size: int, name: str | None = None) -> dict:
  """One image as the contrastive stage feeds `InternVL.pooled_vit`: the whole image as one tile,
  {"pixel_values": [3, size, size]}."""
  del cfg
  from qwenvl_jax.data.images import load_image, normalized_chw
  img = load_image(image, name=name).resize((size, size), Image.Resampling.BICUBIC)
  return {"pixel_values": normalized_chw(img, processor.image_mean, processor.image_std, processor.rescale_factor)}

"""Public API: load a model (HF folder or this project's checkpoint), run it, export it.

    import qwenvl_jax as qv
    model = qv.load(path, dtype="float32")
    feats = model.encode_images(pixel_values)          # [N, 3, H, W] -> [N, n_queries, D]
    logits = model.logits(input_ids, attention_mask=None, pixel_values=None)   # -> [B, S, vocab]
    qv.export_hf(model, out_dir, dtype="bfloat16")
    qv.count_params("qwen_vl_7b")
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import checkpoint
from qwenvl_jax.config import QwenVLConfig, get_config, load_hf_config
from qwenvl_jax.convert.hf import export_hf_folder, import_hf_params
from qwenvl_jax.convert.tensor_io import CheckpointError, checkpoint_files
from qwenvl_jax.model import QwenVL, abstract_params, init_params
from qwenvl_jax.model import count_params as _count_from_config
from qwenvl_jax.nn.layers import stack_layers, unstack_layers


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


class QwenVLModel:
  """A Qwen-VL model with its parameters; methods accept and return numpy or jax arrays."""

  def __init__(self, config: QwenVLConfig, params, assets_dir: str | None = None):
    self.config = config
    self.params = params
    self.module = QwenVL(config)
    self.assets_dir = assets_dir

  @classmethod
  def random(cls, config: str | QwenVLConfig = "qwen_vl_tiny", seed: int = 0, **overrides) -> "QwenVLModel":
    cfg = get_config(config, **overrides)
    return cls(cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)))

  # --- jitted entry points (compiled once per input shape) -------------------------------------------
  @functools.cached_property
  def _jit_images(self):
    return jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=QwenVL.encode_images))

  @functools.cached_property
  def _jit_vit(self):
    return jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=QwenVL.vit))

  @functools.cached_property
  def _jit_logits(self):
    def f(p, ids, mask, pixels):
      return self.module.apply({"params": p}, ids, attention_mask=mask, pixel_values=pixels)
    return jax.jit(f)

  # --- public methods ------------------------------------------------------------------------------
  def _pixels(self, pixel_values) -> jax.Array:
    x = jnp.asarray(pixel_values, jnp.float32)
    p = self.config.visual.patch_size
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
      raise ValueError(f"pixel_values must be [N, 3, H, W] with H, W multiples of {p}; got {tuple(x.shape)}")
    return x

  def vit_tokens(self, pixel_values) -> jax.Array:
    """[N, 3, H, W] -> ViT trunk output [N, (H/p)*(W/p), width]."""
    return self._jit_vit(self.params, self._pixels(pixel_values))

  def encode_images(self, pixel_values) -> jax.Array:
    """[N, 3, H, W] normalised pixels -> image features [N, n_queries, hidden_size]."""
    return self._jit_images(self.params, self._pixels(pixel_values))

  def check_inputs(self, ids: np.ndarray, mask: np.ndarray, pixel_values) -> None:
    """Raise a one-line ValueError for ids outside the vocabulary, malformed image spans, or a span count that
    differs from the number of images."""
    c = self.config
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"input_ids must be a [B, S] integer array; got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
      raise ValueError(f"input_ids outside the vocabulary [0, {c.vocab_size})")
    if mask.shape != ids.shape:
      raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    spans = find_image_spans(np.where(mask.astype(bool), ids, -1), c)
    n_images = 0 if pixel_values is None else self._pixels(pixel_values).shape[0]
    if len(spans) != n_images:
      raise ValueError(f"input_ids contain {len(spans)} image spans but {n_images} images were given")

  def logits(self, input_ids, attention_mask=None, pixel_values=None) -> jax.Array:
    """input_ids [B, S] (+ attention_mask [B, S], pixel_values [N, 3, H, W]) -> logits [B, S, vocab].

    Inference semantics of the official model: dynamic-NTK alpha from the padded length S and logn query
    scaling beyond `seq_length` (when the config enables them). Positions count real tokens, so left- and
    right-padded rows give the same logits as the unpadded row.
    """
    c = self.config
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    self.check_inputs(ids, mask, pixel_values)
    if ids.shape[1] > c.max_position_embeddings:
      raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_position_embeddings "
                       f"{c.max_position_embeddings}")
    pixels = None if pixel_values is None else self._pixels(pixel_values)
    return self._jit_logits(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), pixels)

  def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 64,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               stop_ids=None, seed: int = 0) -> np.ndarray:
    """Continue prompts with the KV cache -> [B, S + n] ids (the prompts as given, then the new tokens).

    Greedy unless do_sample (temperature, top_k, top_p); stops when every row produced one of `stop_ids` (e.g.
    the tokenizer's im_end_id and eod_id) or after max_new_tokens. Rows may be right- or left-padded
    (attention_mask); images as in `logits`.
    """
    from qwenvl_jax.infer.generate import generate
    return generate(self, input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
                    do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                    seed=seed)

  def save(self, path: str, overwrite: bool = False) -> None:
    """Write this project's checkpoint (Orbax params + config + assets)."""
    checkpoint.save(path, self.params, self.config, assets_from=self.assets_dir, overwrite=overwrite)


def _dtype_overrides(dtype: str | None) -> dict:
  return {} if dtype is None else {"param_dtype": dtype, "dtype": dtype}


def load(path: str, dtype: str | None = "float32", progress: bool = False, **overrides) -> QwenVLModel:
  """Load an HF Qwen-VL folder (safetensors or pytorch_model*.bin) or this project's checkpoint.

  dtype: parameter and compute dtype ('float32' | 'bfloat16' | None = keep the checkpoint's for ours).
  overrides: QwenVLConfig fields (e.g. use_logn_attn=False, or scan_layers=False: unrolled layers, whose
  per-layer KV-cache buffers make decoding faster; any checkpoint converts to either layout on load).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if checkpoint.is_checkpoint(path):
    stored = checkpoint.load_config(path).replace(**_dtype_overrides(dtype))
    cfg = stored.replace(**overrides)
    params = _relayout(checkpoint.load(path, abstract_params(stored)), stored.scan_layers, cfg.scan_layers)
    return QwenVLModel(cfg, params, assets_dir=checkpoint.assets_dir(path))
  if is_training_workdir(path):
    return _load_training_workdir(path, dtype, **overrides)
  try:
    checkpoint_files(path)
  except CheckpointError:
    raise CheckpointError(f"{path} is neither a Hugging Face Qwen-VL folder (config.json + model weights), "
                          f"a qwenvl_jax checkpoint ({checkpoint.CONFIG_FILE} + params/) nor a train.py workdir "
                          f"(config.json + checkpoints/)") from None
  cfg = load_hf_config(path, **_dtype_overrides(dtype or "float32"), **overrides)
  bar = _progress_bar(path) if progress else None
  params = import_hf_params(path, cfg, abstract_params(cfg), dtype=cfg.param_dtype,
                            progress=bar.update if bar else None)
  if bar:
    bar.close()
  params = jax.tree.map(jnp.asarray, params)
  return QwenVLModel(cfg, params, assets_dir=path)


def is_training_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "config.json"))


def _load_training_workdir(path: str, dtype: str | None, **overrides) -> QwenVLModel:
  """The params of the latest checkpoint of a `train.py` workdir (one stage), with its model config."""
  import json

  import ml_collections

  from qwenvl_jax.train.checkpointing import latest_params
  from qwenvl_jax.train.loop import model_config

  with open(os.path.join(path, "config.json")) as f:
    train_cfg = ml_collections.ConfigDict(json.load(f))
  stored = model_config(train_cfg).replace(**_dtype_overrides(dtype))
  cfg = stored.replace(**overrides)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = abstract_params(stored)
  params, _ = latest_params(path, abstract, jax.tree.map(lambda _: dev, abstract))
  return QwenVLModel(cfg, _relayout(params, stored.scan_layers, cfg.scan_layers))


def _relayout(params, stored_scan: bool, scan: bool):
  """Parameters saved with scanned (stacked) or unrolled layers, in the layout `scan` asks for."""
  if stored_scan == scan:
    return params
  return unstack_layers(params) if stored_scan else stack_layers(params)


def find_tokenizer(path: str) -> str | None:
  """The tokenizer file that belongs to a checkpoint: HF folder, our checkpoint's assets/, or a training workdir
  (or the chained run above it)."""
  candidates = [path, os.path.join(path, "assets"), os.path.dirname(os.path.abspath(path))]
  for folder in candidates:
    for name in ("qwen.tiktoken", "tokenizer.model"):
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
  return None


def export_hf(model: QwenVLModel, out_dir: str, dtype: str = "bfloat16", max_shard_size: int | str = "5GB",
              progress: bool = False) -> list[str]:
  """Write `model` as an official Qwen-VL folder (sharded safetensors + index + config.json; plus the
  tokenizer/remote-code files when the model was loaded from a folder that had them)."""
  bar = _progress_bar(out_dir, desc="export") if progress else None
  files = export_hf_folder(model.params, model.config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                           assets_dir=model.assets_dir, progress=bar.update if bar else None)
  if bar:
    bar.close()
  return files


def count_params(config: str | QwenVLConfig) -> int:
  """Parameter count of a named config or a QwenVLConfig, from shapes alone (nothing is allocated)."""
  return _count_from_config(get_config(config))


def _progress_bar(path: str, desc: str = "import"):
  from tqdm import tqdm
  return tqdm(desc=f"{desc} {os.path.basename(os.path.normpath(path))}", unit="B", unit_scale=True)

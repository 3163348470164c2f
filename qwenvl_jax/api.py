"""Public API: load a model of any family (HF folder, this project's checkpoint, train.py workdir), run it, export it.

    import qwenvl_jax as qv
    model = qv.load(path, dtype="float32")      # config.json model_type picks the family: qwen | qwen2_vl
    proc = qv.load_processor(path)
    logits = model.logits(input_ids, attention_mask=None, **vision_inputs)   # -> [B, S, vocab]
    ids = model.generate(input_ids, attention_mask=None, max_new_tokens=64, **vision_inputs)
    qv.export_hf(model, out_dir, dtype="bfloat16")
    qv.count_params("qwen_vl_7b")

Vision inputs are the family's: Qwen-VL `pixel_values` [N, 3, H, W]; Qwen2-VL `pixel_values` + `image_grid_thw`,
`pixel_values_videos` + `video_grid_thw` (the Hugging Face processor's names and layouts).
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.convert import checkpoint, loader
from qwenvl_jax.convert.hf import export_hf_folder
from qwenvl_jax.models import quantize as quantization
from qwenvl_jax.models import registry
from qwenvl_jax.models.qwen_vl.config import QwenVLConfig
from qwenvl_jax.models.qwen_vl.inputs import find_image_spans  # noqa: F401 - public (qv.find_image_spans)


class VLModel:
  """A model of any family with its parameters; methods accept and return numpy or jax arrays.

  With a `mesh` (a (data, fsdp, tensor) `jax.sharding.Mesh`: `qv.load(path, mesh=...)` or `model.to_mesh(mesh)`)
  the parameters live in their shards and `logits` / `generate` run on that mesh (the KV cache split over key/value
  heads where the tensor axis divides them, prompts over data x fsdp where that divides the batch).
  """

  def __init__(self, config, params, assets_dir: str | None = None, mesh=None, quantized: str | None = None,
               lora=None):
    self.lora = lora  # a LoRA run's adapters (`convert.loader.LoraWeights`); params then hold them merged
    self.config = config
    self.params = params
    self.family = registry.family_of(config)
    self.quantized = quantized
    self.module = quantization.quantized_module(config, quantized) if quantized else self.family.module(config)
    self.assets_dir = assets_dir
    self.mesh = mesh

  def to_mesh(self, mesh) -> "VLModel":
    """This model with its parameters placed into their shards on `mesh`."""
    if self.quantized:
      shardings = quantization.Quantizer(self.config, self.quantized, mesh).shardings
    else:
      shardings = loader.param_shardings(self.config, mesh)
    return VLModel(self.config, jax.device_put(self.params, shardings), self.assets_dir, mesh, self.quantized,
                   self.lora)

  def quantize(self, mode: str = "int8", mesh=None) -> "VLModel":
    """This model with weight-only quantized linear layers (`models/quantize.py`; layers unrolled first), placed
    on `mesh` (default: this model's) or the first device. The float parameters are left as they are."""
    if self.quantized:
      raise ValueError(f"this model is already quantized ({self.quantized})")
    quantization.check_mode(mode)
    cfg = self.config.replace(scan_layers=False)
    mesh = self.mesh if mesh is None else mesh
    params = quantization.Quantizer(cfg, mode, mesh).quantize_tree(
        loader.relayout(self.params, self.config.scan_layers, False))
    return VLModel(cfg, params, self.assets_dir, mesh, mode)

  def tokenizer(self, path: str | None = None):
    """The tokenizer stored with this model (its HF folder or checkpoint assets), or the one at `path`."""
    from qwenvl_jax.data.tokenizer import load_tokenizer
    path = path or (find_tokenizer(self.assets_dir) if self.assets_dir else None)
    if path is None:
      raise FileNotFoundError("no tokenizer is stored with this model; pass its path")
    return load_tokenizer(path, image_span=self.processor().fixed_image_tokens)

  def param_bytes(self) -> int:
    """Bytes of the parameters as stored (int8 values and scales of a quantized model)."""
    return quantization.param_bytes(self.params)

  def on_mesh(self):
    """Context for running this model's programs: its mesh and the logical-axis rules (no-op without a mesh)."""
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      import flax.linen as nn

      from qwenvl_jax.sharding import LOGICAL_RULES
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack

  def batch_sharding(self, batch: int):
    """Where [B, ...] inputs go on the mesh: split over data x fsdp when that divides B, else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec
    rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    return NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")) if batch % rows == 0 else PartitionSpec())

  @classmethod
  def random(cls, config="qwen_vl_tiny", seed: int = 0, **overrides) -> "VLModel":
    cfg = registry.get_config(config, **overrides)
    fam = registry.family_of(cfg)
    return cls(cfg, jax.jit(fam.init_params, static_argnums=0)(cfg, jax.random.key(seed)))

  # --- jitted entry points (compiled once per input shape) -------------------------------------------
  @functools.cached_property
  def _jit_logits(self):
    def f(p, ids, mask, kw):
      return self.module.apply({"params": p}, ids, attention_mask=mask, **kw)
    return jax.jit(f)

  @functools.cached_property
  def _jit_method(self):
    return jax.jit(lambda p, args, method: self.module.apply({"params": p}, *args, method=method),
                   static_argnums=2)

  # --- public methods ------------------------------------------------------------------------------
  def processor(self, **overrides):
    """The processor of this model (pixels and image tokens); overrides e.g. image_size (Qwen-VL) or
    min_pixels / max_pixels (Qwen2-VL)."""
    if self.assets_dir:
      return self.family.processor_from_pretrained(self.assets_dir, self.config, **overrides)
    return self.family.processor(self.config, **overrides)

  def vit_tokens(self, pixel_values, *args, **kwargs) -> jax.Array:
    """The ViT trunk's output. Qwen-VL: [N, 3, H, W] -> [N, (H/p)*(W/p), width]."""
    module_args, keep = self.family.inputs.encode_args(self.config, pixel_values, *args, **kwargs)
    out = self._jit_method(self.params, module_args, "vit")
    return out if keep is None else out[:keep[0]]

  def encode_images(self, pixel_values, *args, **kwargs) -> jax.Array:
    """Image features as the LLM receives them. Qwen-VL: [N, 3, H, W] -> [N, n_queries, D]; Qwen2-VL:
    (pixel_values [P, C*T*p*p], image_grid_thw [N, 3]) -> [sum of tokens per image, D]."""
    module_args, keep = self.family.inputs.encode_args(self.config, pixel_values, *args, **kwargs)
    out = self._jit_method(self.params, module_args, "encode_images")
    return out if keep is None else out[:keep[1]]

  def check_inputs(self, ids: np.ndarray, mask: np.ndarray, **vision) -> dict:
    """One-line ValueErrors for ids outside the vocabulary, a bad mask, or image tokens that do not fit the
    images; returns the module's keyword arguments."""
    c = self.config
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"input_ids must be a [B, S] integer array; got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
      raise ValueError(f"input_ids outside the vocabulary [0, {c.vocab_size})")
    if mask.shape != ids.shape:
      raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    unknown = set(vision) - set(self.family.inputs.VISION_ARGS)
    if unknown:
      raise TypeError(f"{self.family.name} models take no {sorted(unknown)}; vision inputs: "
                      f"{list(self.family.inputs.VISION_ARGS)}")
    return self.family.inputs.prepare(c, ids, mask, **{k: v for k, v in vision.items() if v is not None})

  def logits(self, input_ids, attention_mask=None, pixel_values=None, **vision) -> jax.Array:
    """input_ids [B, S] (+ attention_mask [B, S], the family's vision inputs) -> logits [B, S, vocab].

    Qwen-VL keeps the official model's inference behaviour: dynamic-NTK alpha from the padded length S and logn
    query scaling beyond `seq_length` (when the config enables them). Positions count real tokens, so left- and
    right-padded rows give the same logits as the unpadded row.
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    kw = self.check_inputs(ids, mask, pixel_values=pixel_values, **vision)
    limit = self.config.max_position_embeddings
    if ids.shape[1] > limit:
      raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_position_embeddings {limit}")
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    if self.mesh is not None:
      ids, mask = jax.device_put((ids, mask), self.batch_sharding(ids.shape[0]))
    with self.on_mesh():
      return self._jit_logits(self.params, ids, mask, kw)

  def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 64,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               stop_ids=None, seed: int = 0, vocab_limit: int | None = None, **vision) -> np.ndarray:
    """Continue prompts with the KV cache -> [B, S + n] ids (the prompts as given, then the new tokens).

    Greedy unless do_sample (temperature, top_k, top_p); stops when every row produced one of `stop_ids` (e.g.
    the tokenizer's im_end_id and eod_id) or after max_new_tokens. Rows may be right- or left-padded
    (attention_mask); vision inputs as in `logits`. `vocab_limit` (e.g. the tokenizer's vocab_size): ids at or
    beyond it are never generated (the Qwen-VL embedding has 151,936 rows for 151,860 token ids).
    """
    from qwenvl_jax.infer.generate import generate
    return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids, seed=seed,
                    vocab_limit=vocab_limit, pixel_values=pixel_values, **vision)

  def with_adapters(self, workdir: str) -> "VLModel":
    """This (float) model with a LoRA run's adapters (the latest checkpoint of its workdir) merged in, carrying
    them for `qv.export_peft`; one-line ValueError when they were trained on a model of another shape."""
    _refuse_quantized(self, "given adapters")
    cfg = self.config.replace(scan_layers=False)
    got = loader.lora_trained(workdir, loader.read_train_config(workdir), cfg)
    params = loader.merged(loader.relayout(self.params, self.config.scan_layers, False), got, cfg)
    model = VLModel(cfg, params, self.assets_dir, None, None, lora=got)
    return model.to_mesh(self.mesh) if self.mesh is not None else model

  def save(self, path: str, overwrite: bool = False) -> None:
    """Write this project's checkpoint (Orbax params + config + assets)."""
    _refuse_quantized(self, "saved")
    checkpoint.save(path, self.params, self.config, assets_from=self.assets_dir, overwrite=overwrite)


# The Qwen-VL facade's historical name (every family uses the same class).
QwenVLModel = VLModel


def _refuse_quantized(model, what: str) -> None:
  if model.quantized:
    raise ValueError(f"a {model.quantized} model cannot be {what}: its weights are rounded; use the float model "
                     f"(quantize again after loading)")


def load(path: str, dtype: str | None = "float32", progress: bool = False, mesh=None, quantize: str | None = None,
         **overrides) -> VLModel:
  """Load an HF folder (safetensors or pytorch_model*.bin; config.json `model_type` picks the family), this
  project's checkpoint, or a train.py workdir.

  dtype: parameter and compute dtype ('float32' | 'bfloat16' | None = keep the checkpoint's for ours).
  mesh: a (data, fsdp, tensor) mesh (`qwenvl_jax.sharding.make_mesh`): every parameter is placed straight into its
  shards as it is read (no host or device ever holds the whole model) and the model runs on that mesh.
  quantize: 'int8': weight-only int8 linear layers (Qwix; per-output-channel scales), quantized on the host as each
  tensor is read and placed as int8 (with `mesh` too); layers are unrolled. For inference (not saved or exported).
  Before any weight is read, a model whose parameters exceed a device's memory (as TPU/GPU runtimes report it)
  is refused with a one-line error.
  overrides: config fields (e.g. scan_layers=False: unrolled layers, whose per-layer KV-cache buffers make decoding
  faster; any checkpoint converts to either layout on load).
  """
  bar = _progress_bar(path) if progress else None
  from qwenvl_jax.infer.plan import check_fits
  got = loader.load(path, dtype=dtype, progress=bar.update if bar else None, mesh=mesh, quantize=quantize,
                    before_read=lambda cfg: check_fits(cfg, mesh, quantize, path), **overrides)
  if bar:
    bar.close()
  params = got.params if mesh is not None else jax.tree.map(jnp.asarray, got.params)
  return VLModel(got.config, params, assets_dir=got.assets_dir, mesh=mesh, quantized=got.quantize, lora=got.lora)


def _config_and_assets(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if checkpoint.is_checkpoint(path):
    return checkpoint.load_config(path), checkpoint.assets_dir(path)
  if loader.is_training_workdir(path):
    import json

    import ml_collections
    with open(os.path.join(path, "config.json")) as f:
      return loader.model_config(ml_collections.ConfigDict(json.load(f))), None
  return loader.load_hf_config(path), path


def load_config(path: str):
  """The model config of a checkpoint (HF folder, model checkpoint or workdir), without reading any weight."""
  return _config_and_assets(path)[0]


def load_processor(path: str, **overrides):
  """The processor of a checkpoint (HF folder, model checkpoint or workdir). Qwen2-VL reads
  preprocessor_config.json; overrides e.g. min_pixels / max_pixels (Qwen2-VL) or image_size (Qwen-VL)."""
  cfg, folder = _config_and_assets(path)
  fam = registry.family_of(cfg)
  return fam.processor_from_pretrained(folder, cfg, **overrides) if folder else fam.processor(cfg, **overrides)


def find_tokenizer(path: str) -> str | None:
  """The tokenizer file that belongs to a checkpoint: HF folder, our checkpoint's assets/, or a training workdir
  (or the chained run above it)."""
  candidates = [path, os.path.join(path, "assets"), os.path.dirname(os.path.abspath(path))]
  for folder in candidates:
    for name in ("qwen.tiktoken", "tokenizer.model", "tokenizer.json"):
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
  return None


def export_hf(model: VLModel, out_dir: str, dtype: str = "bfloat16", max_shard_size: int | str = "5GB",
              progress: bool = False) -> list[str]:
  """Write `model` as an HF folder in its family's official layout (sharded safetensors + index + config.json; plus
  the tokenizer / processor / remote-code files when the model was loaded from a folder that had them)."""
  _refuse_quantized(model, "exported")
  bar = _progress_bar(out_dir, desc="export") if progress else None
  files = export_hf_folder(model.params, model.config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                           assets_dir=model.assets_dir, progress=bar.update if bar else None)
  if bar:
    bar.close()
  return files


def export_peft(model: VLModel, out_dir: str) -> list[str]:
  """Write the adapters of a LoRA run's model (`qv.load(workdir)` or `model.with_adapters(workdir)`) as a PEFT
  folder (`adapter_config.json` + `adapter_model.safetensors`) named as PEFT names the official modules, so
  `peft.PeftModel.from_pretrained(hf_model, out_dir)` adds them to the HF model (`convert/peft.py`)."""
  if model.lora is None:
    raise ValueError("this model carries no adapters: load a LoRA run's workdir (qv.load(workdir)) or call "
                     "model.with_adapters(workdir)")
  from qwenvl_jax.convert.peft import export_peft as write
  return write(model.config.replace(scan_layers=False), model.lora.spec, model.lora.trained, out_dir,
               base_model=model.assets_dir or "")


def count_params(config) -> int:
  """Parameter count of a named config (any family) or a config object, from shapes alone (nothing is allocated);
  tied embeddings count once."""
  cfg = registry.get_config(config)
  return sum(int(x.size) for x in jax.tree.leaves(registry.family_of(cfg).abstract_params(cfg)))


def get_config(name, **overrides):
  """A named config of any family (`qwen_vl_7b`, `qwen2_vl_2b`, ...) with optional field overrides."""
  return registry.get_config(name, **overrides)


def _progress_bar(path: str, desc: str = "import"):
  from tqdm import tqdm
  return tqdm(desc=f"{desc} {os.path.basename(os.path.normpath(path))}", unit="B", unit_scale=True)


__all__ = ["VLModel", "QwenVLModel", "QwenVLConfig", "load", "load_processor", "export_hf", "count_params",
           "get_config", "find_tokenizer"]

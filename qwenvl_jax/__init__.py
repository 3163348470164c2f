"""qwenvl_jax: Qwen-VL family vision-language models (Qwen-VL, Qwen2-VL) in JAX/Flax."""

from qwenvl_jax.api import (
  QwenVLModel,
  VLModel,
  count_params,
  export_hf,
  export_peft,
  find_image_spans,
  get_config,
  load,
  load_config,
  load_processor,
)
from qwenvl_jax.convert.tensor_io import CheckpointError
from qwenvl_jax.data.images import ImageError, preprocess_image
from qwenvl_jax.data.tokenizer import load_tokenizer
from qwenvl_jax.models.qwen_vl.config import QwenVLConfig, VisionConfig

__all__ = ["VLModel", "QwenVLModel", "QwenVLConfig", "VisionConfig", "CheckpointError", "ImageError", "count_params",
           "export_hf", "export_peft", "find_image_spans", "get_config", "load", "load_config", "load_processor",
           "load_tokenizer", "preprocess_image"]
__version__ = "0.1.0"

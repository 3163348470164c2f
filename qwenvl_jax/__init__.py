"""qwenvl_jax: Qwen-VL family vision-language models in JAX/Flax."""

from qwenvl_jax.api import QwenVLModel, count_params, export_hf, find_image_spans, load
from qwenvl_jax.config import QwenVLConfig, VisionConfig, get_config
from qwenvl_jax.convert.tensor_io import CheckpointError
from qwenvl_jax.data.images import ImageError, preprocess_image
from qwenvl_jax.data.tokenizer import load_tokenizer

__all__ = ["QwenVLModel", "QwenVLConfig", "VisionConfig", "CheckpointError", "ImageError", "count_params",
           "export_hf", "find_image_spans", "get_config", "load", "load_tokenizer", "preprocess_image"]
__version__ = "0.1.0"

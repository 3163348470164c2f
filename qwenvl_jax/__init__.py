"""qwenvl_jax: Qwen-VL family vision-language models in JAX/Flax."""

from qwenvl_jax.api import QwenVLModel, count_params, export_hf, find_image_spans, load
from qwenvl_jax.config import QwenVLConfig, VisionConfig, get_config
from qwenvl_jax.convert.tensor_io import CheckpointError

__all__ = ["QwenVLModel", "QwenVLConfig", "VisionConfig", "CheckpointError", "count_params", "export_hf",
           "find_image_spans", "get_config", "load"]
__version__ = "0.1.0"

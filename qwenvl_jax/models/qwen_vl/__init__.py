"""Qwen-VL (v1): ViT-bigG/14 at a fixed resolution -> 256-query cross-attention resampler -> Qwen-7B."""

from qwenvl_jax.models.qwen_vl import config, inputs, model, params, processor
from qwenvl_jax.models.registry import Family


def _processor_from_pretrained(folder: str, cfg, image_size: int | None = None):
  del folder  # the resolution is part of config.json (visual.image_size)
  return processor.QwenVLProcessor.for_config(cfg, image_size=image_size)


# the official finetune.py's c_attn, attn.c_proj, w1, w2 (the LLM's attention and the MLP's two input
# projections; not c_proj, the MLP's output)
LORA_TARGETS = r"decoder/layers_\d+/(attn/(q|k|v|o)|mlp/(up|gate))"

FAMILY = Family(
    name=config.FAMILY, config_class=config.QwenVLConfig, named=config.NAMED,
    from_hf_dict=config.from_hf_dict, to_hf_dict=config.to_hf_dict,
    from_json_dict=config.from_json_dict, to_json_dict=config.to_json_dict,
    example_call=model.example_call,
    module=model.QwenVL,
    hf_slots=params.hf_slots, ignored_hf_keys=params.IGNORED_HF_KEYS,
    processor=processor.QwenVLProcessor.for_config, processor_from_pretrained=_processor_from_pretrained,
    param_groups=config.param_groups, image_flops=model.image_flops, inputs=inputs, lora_targets=LORA_TARGETS)

"""Qwen2-VL: any-resolution ViT with 2-D RoPE (images and videos) -> 2x2 patch merger -> Qwen2 with M-RoPE."""

from qwenvl_jax.models.qwen2_vl import config, inputs, model, params, processor, samples
from qwenvl_jax.models.registry import Family

# every linear layer of the LLM (q/k/v/o_proj, gate/up/down_proj): the usual PEFT targets of Qwen2
LORA_TARGETS = r"decoder/layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"

FAMILY = Family(
    name=config.FAMILY, config_class=config.Qwen2VLConfig, named=config.NAMED,
    from_hf_dict=config.from_hf_dict, to_hf_dict=config.to_hf_dict,
    from_json_dict=config.from_json_dict, to_json_dict=config.to_json_dict,
    example_call=model.example_call,
    module=model.Qwen2VL,
    hf_slots=params.hf_slots, ignored_hf_keys=params.IGNORED_HF_KEYS,
    processor=processor.Qwen2VLProcessor.for_config,
    processor_from_pretrained=lambda folder, cfg, **kw: processor.Qwen2VLProcessor.from_pretrained(folder, cfg, **kw),
    param_groups=config.param_groups, image_flops=model.image_flops, inputs=inputs,
    hf_key_alias=params.hf_key_alias, sample_encoder=samples.Qwen2VLSampleEncoder,
    batch_vision_flops=model.batch_vision_flops, lora_targets=LORA_TARGETS,
    peft_module_name=params.peft_module_name)

"""InternVL: InternViT on dynamic 448 px tiles -> pixel shuffle -> MLP projector -> a Qwen2 or LLaMA decoder."""

from qwenvl_jax.models.internvl import config, inputs, model, params, processor
from qwenvl_jax.models.registry import Family


def _folder_fields(folder: str, d: dict) -> dict:
  """<img>, </img>, <IMG_CONTEXT> ids from the folder's tokenizer files; config.json's image_token_id wins."""
  found = config.special_token_ids(folder)
  if "image_token_id" in d:
    found.pop("image_token_id", None)
  return found


# every linear layer of the LLM, as InternVL's own LoRA fine-tuning (its use_llm_lora)
LORA_TARGETS = r"decoder/layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"

FAMILY = Family(
    name=config.FAMILY, config_class=config.InternVLConfig, named=config.NAMED,
    from_hf_dict=config.from_hf_dict, to_hf_dict=config.to_hf_dict,
    from_json_dict=config.from_json_dict, to_json_dict=config.to_json_dict,
    example_call=model.example_call,
    module=model.InternVL,
    hf_slots=params.hf_slots, ignored_hf_keys=params.IGNORED_HF_KEYS,
    processor=processor.InternVLProcessor.for_config,
    processor_from_pretrained=lambda folder, cfg, **kw: processor.InternVLProcessor.from_pretrained(folder, cfg, **kw),
    param_groups=config.param_groups, image_flops=model.image_flops, inputs=inputs,
    hf_key_alias=params.hf_key_alias, folder_fields=_folder_fields, hf_export_config=params.export_config,
    lora_targets=LORA_TARGETS, peft_module_name=params.peft_module_name)

"""A LoRA model's two exports: `qv.export_peft` loads with `peft` onto the transformers model with the adapted
model's logits (Qwen2-VL, transformers-native), and `qv.export_hf` writes the merged weights that transformers runs
with the same logits; for Qwen-VL (remote code) the PEFT names and shapes are those PEFT gives the official modules,
checked by applying the folder with `peft` to a module tree named as the official one."""

import json

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from qwen2_vl_reference import reference_logits
from safetensors.numpy import load_file

import qwenvl_jax as qv
from qwenvl_jax.convert.loader import LoraWeights
from qwenvl_jax.models import lora

torch.set_num_threads(2)


def adapted(base, spec, trainable=()):
  """`base` with nonzero random adapters (and the `trainable` base parameters perturbed) merged in, carrying them."""
  flat = flatten_dict(lora.init_adapters(base.config, spec, jax.random.key(1)))
  trained = {p: x + 0.05 * jax.random.normal(jax.random.key(i), x.shape) for i, (p, x) in enumerate(flat.items())}
  params = flatten_dict(base.params)
  trained.update({p: params[p] + 0.01 for p in trainable})
  weights = LoraWeights(spec, unflatten_dict(trained), "")
  merged = lora.merge(lora.with_adapters(base.params, weights.trained), spec)
  return qv.VLModel(base.config, merged, base.assets_dir, lora=weights)


def test_peft_and_merged_exports_give_the_adapted_logits_in_transformers(q2_dir, q2_case, tmp_path):
  from peft import PeftModel
  from transformers import Qwen2VLForConditionalGeneration
  model = adapted(qv.load(q2_dir, scan_layers=False), lora.LoraSpec(rank=4, alpha=8))
  c = q2_case("batch")
  kw = {k: c[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
  ours = np.asarray(model.logits(c["input_ids"], c["attention_mask"], pixel_values=c["pixel_values"],
                                 image_grid_thw=c["image_grid_thw"]))
  m = c["attention_mask"].astype(bool)
  assert np.abs(ours[m] - c["logits"][m]).max() > 0.1  # the adapters change the model

  assert qv.export_peft(model, str(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
  assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
  peft_model = PeftModel.from_pretrained(
      Qwen2VLForConditionalGeneration.from_pretrained(q2_dir, dtype=torch.float32), str(tmp_path / "peft")).eval()
  assert np.abs(reference_logits(peft_model, kw)[m] - ours[m]).max() <= 1e-4

  qv.export_hf(model, str(tmp_path / "merged"), dtype="float32")
  merged = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
  assert np.abs(reference_logits(merged, kw)[m] - ours[m]).max() <= 1e-4


def _official_qwen_vl_tree(weights: dict) -> torch.nn.Module:
  """torch modules named as the official QWenLMHeadModel's (`transformer.h.{i}.attn.c_attn`, `transformer.wte`,
  ...) holding the 2-D `weights` (an HF state dict) and their biases: what PEFT walks in the official model."""
  class CausalLM(torch.nn.Module):  # PEFT's CAUSAL_LM wrapper asks its model for this
    def prepare_inputs_for_generation(self, *args, **kwargs):
      raise NotImplementedError

  root = CausalLM()
  for key in sorted(weights, key=lambda k: k.endswith(".bias")):  # each weight before its bias
    w = weights[key]
    *names, leaf = key.split(".")
    if weights[".".join(names) + ".weight"].ndim != 2:
      continue  # norms
    node = root
    for name in names[:-1]:
      if name not in node._modules:
        node.add_module(name, torch.nn.Module())
      node = node._modules[name]
    if names[-1] not in node._modules:
      node.add_module(names[-1], torch.nn.Embedding(*w.shape) if names[-1] == "wte" else torch.nn.Linear(
          w.shape[1], w.shape[0], bias=".".join(names) + ".bias" in weights))
    getattr(node._modules[names[-1]], leaf).data = torch.from_numpy(np.array(w))
  return root


def test_qwen_vl_peft_names_and_shapes_are_the_official_modules(fixture_dir, tmp_path):
  from peft import PeftModel
  spec = lora.LoraSpec(rank=4, alpha=16)
  model = adapted(qv.load(fixture_dir, scan_layers=False), spec, trainable=[("wte", "embedding")])
  model.lora = LoraWeights(spec, model.lora.trained, "^wte/")
  qv.export_peft(model, str(tmp_path / "peft"))
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  # the official finetune.py targets; c_attn holds q, k and v: one adapter of rank 3r, alpha 3x (same scale)
  assert config["target_modules"] == ["c_attn", "c_proj", "w1", "w2"]
  assert config["rank_pattern"] == {"c_attn": 12} and config["alpha_pattern"] == {"c_attn": 48}
  assert config["modules_to_save"] == ["wte"]
  tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  d = model.config.hidden_size
  p = "base_model.model.transformer.h.0."
  assert tensors[p + "attn.c_attn.lora_A.weight"].shape == (12, d)
  assert tensors[p + "attn.c_attn.lora_B.weight"].shape == (3 * d, 12)
  assert tensors[p + "attn.c_proj.lora_A.weight"].shape == (4, d)
  assert tensors[p + "mlp.w1.lora_B.weight"].shape == (model.config.intermediate_size // 2, 4)
  assert not any(".mlp.c_proj." in k for k in tensors)  # the MLP's output projection is not a target
  assert tensors["base_model.model.transformer.wte.weight"].shape == (model.config.vocab_size, d)

  # PEFT applied to modules named as the official model's reproduces our merged weights
  qv.export_hf(model, str(tmp_path / "merged"), dtype="float32")
  qv.export_hf(qv.load(fixture_dir, scan_layers=False), str(tmp_path / "base"), dtype="float32")
  base, want = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(
      str(tmp_path / "merged" / "model.safetensors"))
  decoder = {k: v for k, v in base.items() if k.startswith(("transformer.h.", "transformer.wte"))}
  tree = _official_qwen_vl_tree(decoder)
  peft_model = PeftModel.from_pretrained(tree, str(tmp_path / "peft"))
  got = {k: v.detach().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
  for k in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.w2.weight",
            "transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight"):
    np.testing.assert_allclose(got[k], want[k], atol=2e-6, err_msg=k)


def test_export_peft_needs_adapters(fixture_dir):
  with pytest.raises(ValueError, match="carries no adapters"):
    qv.export_peft(qv.load(fixture_dir), "/nonexistent")

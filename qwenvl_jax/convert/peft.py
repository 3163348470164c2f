"""A LoRA run's adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, named as PEFT names
the official model's modules, so `peft.PeftModel.from_pretrained(hf_model, folder)` adds them to the HF model.

Names come from the family's HF name map (`hf_slots`): the module of an adapted kernel is its HF weight's key
without `.weight` (then `Family.peft_module_name`, where the runtime module tree differs from the checkpoint keys,
as transformers 5's `model.language_model.*`). Our adapters A [in, r], B [r, out] become PEFT's
`lora_A.weight` [r, in] and `lora_B.weight` [out, r] in the HF layout (the rule's own to_hf, applied to the factors).
A fused HF module (Qwen-VL's `c_attn` = [q; k; v]) takes its three adapters as one of rank 3r: A stacked, B block
diagonal, its alpha 3x so alpha / rank stays the same (PEFT's `rank_pattern` / `alpha_pattern`). Every factor
pair is checked: B_hf @ A_hf equals the HF layout of the merged update (else a ValueError names the module).
Trained base parameters (`lora.trainable`, e.g. `wte`, `lm_head`) are written as PEFT's `modules_to_save`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax.traverse_util import flatten_dict

from qwenvl_jax.models import lora, registry
from qwenvl_jax.models.rules import param_location

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_tensors(cfg, spec: lora.LoraSpec, trained: dict) -> tuple[dict[str, np.ndarray], dict]:
  """Our trained tree (adapters + trained base parameters; unrolled layers) -> ({PEFT key: array},
  adapter_config.json fields that depend on the modules)."""
  fam = registry.family_of(cfg)
  export_cfg = fam.hf_export_config(cfg)
  flat = {k: np.asarray(v, np.float32) for k, v in flatten_dict(trained).items()}
  shapes = {p: tuple(x.shape) for p, x in flatten_dict(fam.abstract_params(cfg)).items()}
  rename = fam.peft_module_name
  tensors, rank_pattern, alpha_pattern, targets, saved = {}, {}, {}, set(), []
  used = set()
  for hf_key, slot in fam.hf_slots(export_cfg).items():
    if not hf_key.endswith(".weight"):
      continue
    paths = [param_location(p, slot.layer, False)[0] for p in slot.rule.ours]
    module = rename(hf_key[: -len(".weight")])
    if all(p[:-1] + ("kernel_lora_a",) in flat for p in paths):
      a_hf, b_hf = _factors(slot.rule, [flat[p[:-1] + ("kernel_lora_a",)] for p in paths],
                            [flat[p[:-1] + ("kernel_lora_b",)] for p in paths], [shapes[p] for p in paths], module)
      tensors[f"{PREFIX}{module}.lora_A.weight"] = a_hf
      tensors[f"{PREFIX}{module}.lora_B.weight"] = b_hf
      name = module.rsplit(".", 1)[-1]
      targets.add(name)
      if len(paths) > 1:  # a fused HF module: one adapter of rank n r, alpha n x (the same scale)
        rank_pattern[name], alpha_pattern[name] = spec.rank * len(paths), spec.alpha * len(paths)
      used.update(p[:-1] + (s,) for p in paths for s in lora.SUFFIXES)
    elif all(p in flat for p in paths):  # a trained base parameter: PEFT's modules_to_save
      tensors[f"{PREFIX}{module}.weight"] = np.asarray(slot.rule.to_hf(*[flat[p] for p in paths]), np.float32)
      saved.append(module)
      used.update(paths)
  left = sorted("/".join(p) for p in set(flat) - used)
  if left:
    raise ValueError(f"these trained parameters have no PEFT name in the {fam.name} layout: {', '.join(left[:4])}")
  modules_to_save = sorted({m.rsplit(".", 1)[-1] for m in saved}) or None
  return tensors, {"target_modules": sorted(targets), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                   "modules_to_save": modules_to_save}


def _factors(rule, a_list, b_list, shapes, module: str) -> tuple[np.ndarray, np.ndarray]:
  """Our factors of the kernels (of `shapes`) one HF weight holds -> (lora_A [n r, in], lora_B [out, n r]): A's
  stacked, B's block diagonal in the order the HF weight concatenates its outputs. Checked: lora_B @ lora_A must be
  the HF layout (`rule.to_hf`) of the merged update, else the layout permutes inputs and a ValueError names it."""
  r = a_list[0].shape[-1]
  a_hf = np.concatenate([a.reshape(-1, r).T for a in a_list], axis=0)
  bs = [b.reshape(r, -1).T for b in b_list]
  b_hf = np.zeros((sum(b.shape[0] for b in bs), r * len(bs)), np.float32)
  row = 0
  for j, b in enumerate(bs):
    b_hf[row:row + b.shape[0], j * r:(j + 1) * r] = b
    row += b.shape[0]
  deltas = [(a.reshape(-1, r) @ b.reshape(r, -1)).reshape(shape) for a, b, shape in zip(a_list, b_list, shapes)]
  want = np.asarray(rule.to_hf(*deltas), np.float32)
  if want.shape != (b_hf.shape[0], a_hf.shape[1]) or not np.allclose(
      b_hf @ a_hf, want, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(want).max()))):
    raise ValueError(f"the adapters of {module} have no PEFT form in this layout (its HF weight reorders inputs)")
  return a_hf, b_hf


def export_peft(cfg, spec: lora.LoraSpec, trained: dict, out_dir: str, base_model: str = "") -> list[str]:
  """Write the adapters (and trained base parameters) as a PEFT LoRA folder; returns the files written."""
  from safetensors.numpy import save_file
  tensors, fields = peft_tensors(cfg, spec, trained)
  os.makedirs(out_dir, exist_ok=True)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "layers_to_transform": None, "layers_pattern": None, **fields}
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  # contiguous copies: safetensors writes an array's buffer as it lies, so a transposed view would be garbled
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out_dir, ADAPTER_WEIGHTS),
            metadata={"format": "pt"})
  return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

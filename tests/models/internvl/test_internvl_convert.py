"""InternVL weights both ways: the native export is the fixture bit for bit and transformers loads it with the same
logits; the original OpenGVLab format (Qwen2 and InternLM2 inside) exports to the native layout, which transformers
runs with the original model's logits; a LLaMA text model with the other InternViT options (RMSNorm, q/k norm, a
final LayerNorm, no q/k/v bias) and a head_dim of its own, built by transformers; exact parameter counts of
InternVL3-1B / 8B; config.json layouts; this project's checkpoint and the CLI."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import qwenvl_jax as qv
from qwenvl_jax.convert.__main__ import main as convert_cli
from qwenvl_jax.models.internvl.config import INTERNVL_TINY, from_hf_dict, to_hf_dict

torch.set_num_threads(2)


def masked_maxdiff(a, b, mask):
  m = np.asarray(mask).astype(bool)
  return float(np.abs(np.asarray(a, np.float32)[m] - np.asarray(b, np.float32)[m]).max())


def transformers_logits(folder, c) -> np.ndarray:
  """InternVLForConditionalGeneration from `folder` on a case's batch (positions from the mask, as generate)."""
  from transformers import InternVLForConditionalGeneration
  tm = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
  mask = torch.tensor(c["attention_mask"])
  with torch.no_grad():
    out = tm(input_ids=torch.tensor(c["input_ids"]), attention_mask=mask,
             position_ids=(mask.cumsum(-1) - 1).clamp(min=0), pixel_values=torch.tensor(c["pixel_values"]))
  return out.logits.numpy()


@pytest.fixture(scope="module")
def exported(iv_model, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("iv_export"))
  qv.export_hf(iv_model, out, dtype="float32")
  return out


def test_export_is_the_fixture_bit_for_bit(exported, iv_dir):
  want, got = load_file(os.path.join(iv_dir, "model.safetensors")), load_file(os.path.join(exported,
                                                                                              "model.safetensors"))
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_transformers_loads_the_export(exported, iv_case):
  c = iv_case("batch")
  assert masked_maxdiff(transformers_logits(exported, c), c["logits"], c["attention_mask"]) <= 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "internlm2"])
def test_original_format_exports_to_the_native_layout(iv_orig_dir, iv_case, tmp_path, arch):
  """InternLM2 becomes transformers' LLaMA (wqkv split into q/k/v_proj); transformers runs the export with the
  original model's logits."""
  m = qv.load(os.path.join(iv_orig_dir, arch))
  qv.export_hf(m, str(tmp_path), dtype="float32")
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["model_type"] == "internvl" and cfg["text_config"]["model_type"] == (
      "qwen2" if arch == "qwen2" else "llama")
  keys = load_file(str(tmp_path / "model.safetensors"))
  assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys and not any("wqkv" in k for k in keys)
  back = qv.load(str(tmp_path))
  assert back.config.checkpoint_format == "native"
  c = iv_case("batch", arch)
  assert masked_maxdiff(transformers_logits(str(tmp_path), c), c["logits"], c["attention_mask"]) <= 2.5e-4
  assert masked_maxdiff(back.logits(c["input_ids"], c["attention_mask"], c["pixel_values"]),
                        m.logits(c["input_ids"], c["attention_mask"], c["pixel_values"]), c["attention_mask"]) == 0


@pytest.fixture(scope="module")
def llama_model(iv_case, tmp_path_factory):
  """A random transformers InternVL with a LLaMA text model (head_dim 32 != 64 / 4, tied embeddings) and an
  InternViT with RMSNorm, q/k norm, no q/k/v bias and a final LayerNorm."""
  from transformers import InternVLConfig, InternVLForConditionalGeneration
  folder = str(tmp_path_factory.mktemp("iv_llama"))
  text = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-5,
              max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
              tie_word_embeddings=True)
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=[56, 56],
                patch_size=[14, 14], attention_bias=False, use_qk_norm=True, norm_type="rms_norm",
                use_mean_pooling=False, layer_scale_init_value=0.1)
  torch.manual_seed(3)
  tm = InternVLForConditionalGeneration(InternVLConfig(text_config=text, vision_config=vision, image_token_id=490,
                                                       tie_word_embeddings=True)).eval()
  with torch.no_grad():
    for p in tm.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  tm.save_pretrained(folder)
  return folder, iv_case("batch")


def test_llama_text_and_the_other_vit_options(llama_model, tmp_path):
  folder, c = llama_model
  m = qv.load(folder)
  cfg, v = m.config, m.config.vision
  assert cfg.text_model_type == "llama" and cfg.head_dim == 32 and cfg.tie_word_embeddings
  assert v.norm_type == "rms_norm" and v.use_qk_norm and not v.attention_bias and not v.use_mean_pooling
  want = transformers_logits(folder, c)
  assert masked_maxdiff(m.logits(c["input_ids"], c["attention_mask"], c["pixel_values"]), want,
                        c["attention_mask"]) <= 1e-4
  qv.export_hf(m, str(tmp_path), dtype="float32")
  a, b = load_file(os.path.join(folder, "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_parameter_counts_of_released_models(iv_dir):
  with open(os.path.join(iv_dir, "param_counts.json")) as f:
    want = json.load(f)
  for name in ("internvl3_1b", "internvl3_8b"):
    assert qv.count_params(name) == want[name]["params"], name


def test_config_json_layouts(iv_dir, iv_orig_dir):
  with open(os.path.join(iv_dir, "config.json")) as f:
    native = json.load(f)
  tags = dict(image_start_token_id=488, image_end_token_id=489)  # the loader reads them from processor_config.json
  assert from_hf_dict(native, **tags) == INTERNVL_TINY == qv.load_config(iv_dir)
  assert from_hf_dict(to_hf_dict(INTERNVL_TINY, "float32"), **tags) == INTERNVL_TINY
  with open(os.path.join(iv_orig_dir, "qwen2", "config.json")) as f:
    original = json.load(f)
  with pytest.raises(ValueError, match="does not give <IMG_CONTEXT>'s id"):
    from_hf_dict(original)
  cfg = from_hf_dict(original, image_token_id=490)
  assert cfg.max_tiles == 6 and cfg.checkpoint_format == "original" and cfg.tokens_per_tile == 4
  with pytest.raises(ValueError, match="ps_version 'v1'"):
    from_hf_dict({**original, "ps_version": "v1"}, image_token_id=490)
  with pytest.raises(ValueError, match="language model 'phi3' is not supported"):
    from_hf_dict({**original, "llm_config": {"model_type": "phi3"}}, image_token_id=490)
  with pytest.raises(ValueError, match="rope scaling 'linear'"):
    from_hf_dict({**native, "text_config": {**native["text_config"], "rope_scaling": {"type": "linear"}}})


def test_checkpoint_and_cli_round_trip(iv_orig_dir, iv_case, tmp_path):
  src = os.path.join(iv_orig_dir, "internlm2")
  ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "hf")
  assert convert_cli(["hf-to-orbax", src, ckpt, "--dtype", "float32"]) == 0
  assert convert_cli(["orbax-to-hf", ckpt, back, "--dtype", "float32"]) == 0
  m = qv.load(ckpt, scan_layers=False)
  assert type(m.config).__name__ == "InternVLConfig" and m.config.max_tiles == 6
  assert os.path.isfile(os.path.join(back, "added_tokens.json"))  # tokenizer files travel with the weights
  c = iv_case("batch", "internlm2")
  for model in (m, qv.load(back)):
    assert masked_maxdiff(model.logits(c["input_ids"], c["attention_mask"], c["pixel_values"]), c["logits"],
                          c["attention_mask"]) <= 2.5e-4

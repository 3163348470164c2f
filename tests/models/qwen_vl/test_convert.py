"""HF import/export: layouts, bit-exact round trips, sharding, .bin input and clear errors."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import qwenvl_jax as qv
from qwenvl_jax.convert.__main__ import main as convert_cli
from qwenvl_jax.convert.hf import flatten
from qwenvl_jax.convert.tensor_io import iter_checkpoint, iter_safetensors


def read_folder(folder):
  return dict(iter_checkpoint(folder))


def assert_same_params(a, b):
  fa, fb = flatten(jax.tree.map(np.asarray, a)), flatten(jax.tree.map(np.asarray, b))
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def copy_fixture(fixture_dir, dst):
  shutil.copytree(fixture_dir, dst)
  return str(dst)


def test_export_reproduces_fixture_bit_for_bit(tiny_model, fixture_dir, fixture_tensors, tmp_path):
  qv.export_hf(tiny_model, tmp_path / "out", dtype="float32")
  out = read_folder(tmp_path / "out")
  assert out.keys() == fixture_tensors.keys()
  for k, ref in fixture_tensors.items():
    assert out[k].dtype == np.float32 and out[k].shape == ref.shape, k
    np.testing.assert_array_equal(out[k], ref.astype(np.float32), err_msg=k)
  with open(tmp_path / "out" / "config.json") as f:
    got_cfg = json.load(f)
  with open(os.path.join(fixture_dir, "config.json")) as f:
    ref_cfg = json.load(f)
  for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "kv_channels",
            "seq_length", "vocab_size", "use_dynamic_ntk", "use_logn_attn", "no_bias", "auto_map",
            "architectures", "model_type", "visual", "rotary_emb_base", "layer_norm_epsilon"):
    assert got_cfg[k] == ref_cfg[k], k


def test_export_then_import_is_identity(tiny_model, tmp_path):
  qv.export_hf(tiny_model, tmp_path / "out", dtype="float32")
  again = qv.load(str(tmp_path / "out"), dtype="float32")
  assert again.config == tiny_model.config
  assert_same_params(again.params, tiny_model.params)


def test_sharded_export_with_index(tiny_model, fixture_tensors, tmp_path):
  files = qv.export_hf(tiny_model, tmp_path / "out", dtype="float32", max_shard_size="1MB")
  assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  for name in files:
    assert os.path.getsize(tmp_path / "out" / name) < 1.5e6
  with open(tmp_path / "out" / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert set(index["weight_map"]) == set(fixture_tensors)
  assert index["metadata"]["total_size"] == sum(v.size * 4 for v in fixture_tensors.values())
  # a layer's tensors sit together: they fill a contiguous run of shards
  shards = sorted({files.index(f) for k, f in index["weight_map"].items() if k.startswith("transformer.h.0.")})
  assert shards == list(range(shards[0], shards[-1] + 1))
  assert_same_params(qv.load(str(tmp_path / "out")).params, tiny_model.params)


def test_bf16_export(tiny_model, tmp_path):
  qv.export_hf(tiny_model, tmp_path / "out", dtype="bfloat16")
  out = load_file(str(tmp_path / "out" / "model.safetensors"))
  ref = tiny_model.params["lm_head"]["kernel"]
  assert out["lm_head.weight"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["lm_head.weight"], np.asarray(ref).T.astype(ml_dtypes.bfloat16))
  with open(tmp_path / "out" / "config.json") as f:
    cfg = json.load(f)
  assert cfg["torch_dtype"] == "bfloat16"
  assert not (cfg["bf16"] or cfg["fp16"] or cfg["fp32"])  # precision left to the official auto-selection
  bf = qv.load(str(tmp_path / "out"), dtype="bfloat16")
  assert bf.params["lm_head"]["kernel"].dtype == jax.numpy.bfloat16


@pytest.mark.parametrize("sharded", [False, True])
def test_import_pytorch_bin(tiny_model, fixture_dir, fixture_tensors, tmp_path, sharded):
  folder = tmp_path / "bin"
  folder.mkdir()
  shutil.copy(os.path.join(fixture_dir, "config.json"), folder)
  state = {k: torch.from_numpy(v.copy()) for k, v in fixture_tensors.items()}
  state["transformer.rotary_emb.inv_freq"] = torch.ones(32)  # buffer some checkpoints carry: ignored
  if not sharded:
    torch.save(state, folder / "pytorch_model.bin")
  else:
    keys = sorted(state)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
      name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
      torch.save({k: state[k] for k in part}, folder / name)
      weight_map.update({k: name for k in part})
    with open(folder / "pytorch_model.bin.index.json", "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  assert_same_params(qv.load(str(folder)).params, tiny_model.params)


def test_import_bf16_pytorch_bin_casts(fixture_dir, fixture_tensors, tmp_path):
  folder = tmp_path / "bin"
  folder.mkdir()
  shutil.copy(os.path.join(fixture_dir, "config.json"), folder)
  torch.save({k: torch.from_numpy(v.astype(np.float32)).bfloat16() for k, v in fixture_tensors.items()},
             folder / "pytorch_model.bin")
  m = qv.load(str(folder), dtype="float32")
  ref = fixture_tensors["lm_head.weight"].astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(m.params["lm_head"]["kernel"]), ref.T)


def test_streaming_reader_matches_safetensors_library(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float16),
             "c": rng.normal(size=(2, 2, 2)).astype(ml_dtypes.bfloat16), "d": np.arange(4, dtype=np.int64)}
  save_file(tensors, str(tmp_path / "t.safetensors"))
  got = dict(iter_safetensors(str(tmp_path / "t.safetensors")))
  assert got.keys() == tensors.keys()
  for k in tensors:
    assert got[k].dtype == tensors[k].dtype
    np.testing.assert_array_equal(got[k], tensors[k])


# --- errors: one clear line naming the problem --------------------------------------------------------

def _rewrite_weights(folder, edit):
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def test_missing_and_unexpected_keys_are_named(fixture_dir, tmp_path):
  folder = copy_fixture(fixture_dir, tmp_path / "m")

  def edit(t):
    del t["transformer.h.1.mlp.w2.weight"]
    t["transformer.extra.weight"] = np.zeros(3, np.float32)
  _rewrite_weights(folder, edit)
  with pytest.raises(qv.CheckpointError) as e:
    qv.load(folder)
  msg = str(e.value)
  assert "missing keys: transformer.h.1.mlp.w2.weight" in msg
  assert "unexpected keys: transformer.extra.weight" in msg
  assert "\n" not in msg


def test_wrong_shape_is_named(fixture_dir, tmp_path):
  folder = copy_fixture(fixture_dir, tmp_path / "m")
  _rewrite_weights(folder, lambda t: t.update({"transformer.ln_f.weight": np.ones(255, np.float16)}))
  with pytest.raises(qv.CheckpointError, match=r"transformer.ln_f.weight: shape \(255,\) does not fit"):
    qv.load(folder)


def test_config_not_matching_weights(fixture_dir, tmp_path):
  folder = copy_fixture(fixture_dir, tmp_path / "m")
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  cfg["num_hidden_layers"] = 3
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(qv.CheckpointError, match="missing keys: transformer.h.2"):
    qv.load(folder)


def test_truncated_file(fixture_dir, tmp_path):
  folder = copy_fixture(fixture_dir, tmp_path / "m")
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(qv.CheckpointError, match="truncated"):
    qv.load(folder)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    qv.load(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(qv.CheckpointError, match="neither a Hugging Face folder"):
    qv.load(str(tmp_path / "empty"))


def test_bad_config_json(fixture_dir, tmp_path):
  folder = copy_fixture(fixture_dir, tmp_path / "m")
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "qwen", "hidden_size": 8}, f)
  with pytest.raises(ValueError, match="no 'visual' section"):
    qv.load(folder)


# --- CLI and Orbax checkpoints -----------------------------------------------------------------------

def test_cli_round_trip_through_orbax(fixture_dir, fixture_tensors, tiny_model, tmp_path, capsys):
  ck, hf = str(tmp_path / "ck"), str(tmp_path / "hf")
  assert convert_cli(["hf-to-orbax", fixture_dir, ck, "--dtype", "float32"]) == 0
  from_orbax = qv.load(ck, dtype=None)
  assert_same_params(from_orbax.params, tiny_model.params)
  assert convert_cli(["orbax-to-hf", ck, hf, "--dtype", "float32"]) == 0
  out = read_folder(hf)
  for k, ref in fixture_tensors.items():
    np.testing.assert_array_equal(out[k], ref.astype(np.float32), err_msg=k)
  assert os.path.isfile(os.path.join(hf, "tokenizer_cases.json"))  # non-weight files travel along
  capsys.readouterr()
  assert convert_cli(["hf-to-orbax", fixture_dir, ck]) == 2  # exists, no --overwrite
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error:") and "--overwrite" in err


def test_orbax_save_load_bf16(tiny_model, tmp_path):
  tiny_model.save(str(tmp_path / "ck"))
  bf = qv.load(str(tmp_path / "ck"), dtype="bfloat16")
  assert bf.config.param_dtype == "bfloat16"
  ref = np.asarray(tiny_model.params["wte"]["embedding"]).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(bf.params["wte"]["embedding"]), ref)

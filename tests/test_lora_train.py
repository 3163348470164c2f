"""LoRA and Q-LoRA through train.py (tiny config, CPU): checkpoints hold the adapters and their optimizer state
alone, a resumed run repeats the uninterrupted one bit for bit, the loaded workdir is the base with the adapters
merged (nothing else changed), adapters refuse a base of another shape, and the one-line errors."""

import os
import shutil

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from train_runs import (
  REF_OVERRIDES,
  assert_identical,
  checkpoint_steps,
  describe,
  error_line,
  load_state,
  metrics,
  train,
  write_config,
)

import qwenvl_jax as qv
from qwenvl_jax.convert import loader

LORA = ["--config.lora.rank=4", "--config.lora.alpha=8", "--config.optim.total_steps=8",
        "--config.checkpoint.async_save=False", "--config.log.tensorboard=False"]


@pytest.fixture(scope="module")
def lora_run(env, tmp_path_factory):
  d = tmp_path_factory.mktemp("lora")
  wd = d / "run"
  r = train(env, f"--config={write_config(d)}", f"--workdir={wd}", *REF_OVERRIDES, *LORA)
  assert r.returncode == 0, describe(r)
  return d, wd


def _dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def test_checkpoints_hold_the_adapters_and_their_optimizer_state_alone(lora_run, reference):
  _, wd = lora_run
  assert checkpoint_steps(wd) == [4, 8]
  state = load_state(wd, 8)
  params = [k for k in state if k.startswith("params/")]
  assert params and all(k.endswith(("kernel_lora_a", "kernel_lora_b")) for k in params)
  assert all(k.startswith("params/decoder/layers_") for k in params)
  moments = [k for k in state if k.startswith("opt_state/") and state[k].ndim >= 2]
  assert moments and all(k.endswith(("kernel_lora_a", "kernel_lora_b")) for k in moments)
  # B moved off zero: the adapters train
  assert all(np.abs(state[k]).max() > 0 for k in params if k.endswith("kernel_lora_b"))
  ratio = _dir_bytes(wd / "checkpoints" / "8") / _dir_bytes(os.path.join(reference["workdir"], "checkpoints", "16"))
  print(f"LoRA checkpoint / full checkpoint: {ratio:.3f}")
  assert ratio < 0.15
  losses = [m["last_loss"] for m in metrics(wd)]
  assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(lora_run, env):
  d, wd = lora_run
  resumed = d / "resumed"
  shutil.copytree(wd, resumed)
  shutil.rmtree(resumed / "checkpoints" / "8")  # as if killed after checkpoint 4
  r = train(env, f"--config={write_config(d)}", f"--workdir={resumed}", *REF_OVERRIDES, *LORA)
  assert r.returncode == 0, describe(r)
  assert "resumed from step 4" in r.stdout
  assert_identical(load_state(resumed, 8), load_state(wd, 8))
  assert [m["last_loss"] for m in metrics(resumed)] == [m["last_loss"] for m in metrics(wd)]


def test_the_workdir_loads_as_the_base_with_the_adapters_merged(lora_run):
  _, wd = lora_run
  model = qv.load(str(wd))
  assert model.lora is not None and model.lora.spec.rank == 4 and not model.config.scan_layers
  cfg = model.config
  base, _ = loader.start_params(loader.read_train_config(str(wd)).init, cfg, 0)  # the run's: seed 0's random base
  got, want = flatten_dict(model.params), flatten_dict(base)
  adapted = {p[:-1] + ("kernel",) for p in flatten_dict(model.lora.trained)}
  assert set(got) == set(want)
  changed = {p for p in got if not np.array_equal(np.asarray(got[p]), np.asarray(want[p]))}
  assert changed == adapted  # only the adapted kernels differ from the base

  # the same adapters applied to a given base model; a base of another shape is refused in one line
  again = qv.VLModel(cfg, base).with_adapters(str(wd))
  for p in adapted:
    np.testing.assert_array_equal(np.asarray(again.params[p[0]][p[1]][p[2]][p[3]]["kernel"]),
                                  np.asarray(got[p]))
  other = qv.VLModel.random("qwen_vl_tiny")
  with pytest.raises(ValueError, match="its adapters do not fit this model"):
    other.with_adapters(str(wd))


@pytest.mark.slow
def test_qlora_int8_trains_float_adapters_on_an_int8_base(env, tmp_path):
  wd = tmp_path / "qlora"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", *REF_OVERRIDES, *LORA,
            "--config.lora.quantize=int8", "--config.optim.total_steps=4")
  assert r.returncode == 0, describe(r)
  state = load_state(wd, 4)
  params = [k for k in state if k.startswith("params/")]
  assert params and all(k.endswith(("kernel_lora_a", "kernel_lora_b")) for k in params)
  assert {str(state[k].dtype) for k in params} == {"float32"}
  losses = [m["last_loss"] for m in metrics(wd)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  model = qv.load(str(wd))  # merged into the int8-rounded base it trained against
  assert model.lora.spec.quantize == "int8"


@pytest.mark.parametrize("override, message", [
    ("--config.lora.targets=decoder/nothing", "match no linear layer"),
    ("--config.lora.rank=5000", "rank 5000 exceeds the width"),
    ("--config.lora.quantize=fp3", "lora.quantize 'fp3'"),
    ("--config.lora.trainable=((", "lora.trainable '((' is not a regular expression"),
])
def test_bad_lora_settings_are_one_line_errors(env, tmp_path, override, message):
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={tmp_path / 'w'}", *LORA, override)
  assert r.returncode == 2, describe(r)
  assert message in error_line(r.stderr)


def test_qlora_on_a_prequantized_checkpoint_is_one_line(env, tmp_path, fixture_dir):
  """A GPTQ folder (config.json quantization_config, as Qwen-VL-Chat-Int4) with Q-LoRA of another scheme."""
  import json
  folder = tmp_path / "int4"
  shutil.copytree(fixture_dir, folder)
  d = json.loads((folder / "config.json").read_text())
  d["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
  (folder / "config.json").write_text(json.dumps(d))
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={tmp_path / 'w'}", *LORA,
            "--config.lora.quantize=nf4", "--config.init.source=hf", f"--config.init.path={folder}")
  assert r.returncode == 2, describe(r)
  assert "holds pre-quantized weights (gptq 4-bit)" in error_line(r.stderr)
  with pytest.raises(qv.CheckpointError, match="use the float checkpoint"):
    qv.load(str(folder))

"""train.py end to end on a tiny config (CPU): one-line errors with exit code 2 and the --dry_run memory plan of the
stage configs (the chained demo config: tests/test_demo.py). Every run is a `python train.py` subprocess (helpers:
train_runs.py)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from train_runs import (
  REF_OVERRIDES,
  ROOT,
  TOTAL,
  checkpoint_steps,
  describe,
  error_line,
  train,
  write_config,
)

# --- one-line errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expect", [
    (["--config.optim.bogus=1"], "unknown key 'bogus'"),
    (["--config.nonfinite=maybe"], "nonfinite 'maybe'"),
    (["--config.optim.lr=abc"], "could not convert string to float: 'abc'"),
    (["--config.optim.lr=1e39"], "optim.lr 1e+39 overflows float32"),
    (["--config.model.name=qwen_vl_8b"], "model.name 'qwen_vl_8b'"),
    (["--config=/nonexistent/config.py"], "/nonexistent/config.py"),
    (["--config=configs/stage1_pretrain.py", "--dry_run", "--config.mesh.fsdp=-1"], "explicit mesh sizes"),
    (["--config.data.max_images=0"], "data.max_images 0: must be at least 1"),
    (['--config.optim.freeze=("[",)'], "optim.freeze[0] '[' is not a regular expression"),
    (["stray"], "unexpected arguments: ['stray']"),
    (["--config={tmp}/dict_config.py"], "get_config() returned a dict, not an ml_collections.ConfigDict"),
    (["--config.optim.clip_norm=-1"], "optim.clip_norm -1.0: >= 0 (0 turns clipping off)"),
    (["--config.mesh.data=0"], "mesh sizes (0, -1, 1): each at least 1, or -1"),
], ids=["unknown-key", "bad-value", "bad-type", "lr-overflow", "bad-model", "no-config", "dry-run-mesh",
        "no-images", "bad-regex", "stray-argument", "not-a-config", "negative-clip-norm", "zero-mesh"])
def test_bad_config_is_one_error_line(env, tmp_path, args, expect):
  (tmp_path / "dict_config.py").write_text("def get_config():\n  return {'model': {'name': 'qwen_vl_demo'}}\n")
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  config = [] if any(a.startswith("--config=") for a in args) else [f"--config={write_config(tmp_path)}"]
  r = train(env, *config, f"--workdir={tmp_path / 'run'}", *args, timeout=120)
  assert r.returncode == 2, describe(r)
  assert expect in error_line(r.stderr)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_unusable_workdir_is_one_error_line(env, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  wd = tmp_path / "file" / "run"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", timeout=120)
  assert r.returncode == 2, describe(r)
  line = error_line(r.stderr)
  assert "Not a directory" in line and f"'{wd}'" in line  # the path, quotes intact
  r = train(env, f"--config={write_config(tmp_path)}", timeout=120)
  assert r.returncode == 2 and "--workdir is required" in error_line(r.stderr)
  r = train(env, f"--config={write_config(tmp_path)}", "--workdir=gs://bucket/run", timeout=120)
  assert r.returncode == 2 and "mount the bucket" in error_line(r.stderr)


def test_a_mistyped_init_path_is_one_error_line_and_creates_nothing(env, tmp_path):
  typo = tmp_path / "stage1_typo"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={tmp_path / 'run'}",
            "--config.init.source=checkpoint", f"--config.init.path={typo}", timeout=120)
  assert r.returncode == 2 and error_line(r.stderr) == f"error: init.path {typo} does not exist", describe(r)
  assert not typo.exists()


def test_any_resolution_configs_need_a_patch_budget_except_for_the_dry_run():
  from qwenvl_jax.train.config import base_config, validate
  c = base_config()
  c.model.name = "qwen2_vl_7b"
  validate(c, dry_run=True)  # the memory plan needs no data settings
  with pytest.raises(ValueError, match="data.patch_budget must be positive for qwen2_vl_7b"):
    validate(c)
  c.data.patch_budget = 4096
  validate(c)


@pytest.mark.parametrize("key", ["init.path", "data.path", "data.image_root", "data.tokenizer"])
def test_url_paths_are_refused_with_the_mount_hint(key):
  from qwenvl_jax.train.config import base_config, validate
  c = base_config()
  c.init.update(source="hf", path="/ckpt")
  c.data.update(source="jsonl", path="/data/train.jsonl")
  section, name = key.split(".")
  c[section][name] = "gs://bucket/x"
  with pytest.raises(ValueError, match=rf"^bad config value: {key} 'gs://bucket/x': .*mount the bucket"):
    validate(c)


@pytest.mark.parametrize("args, expect", [
    (["--config.model.scan_layers=False"], "does not match the configured model"),
    (["--config.model.name=qwen_vl_tiny"], "does not fit model qwen_vl_tiny"),
    # Stage-2 checkpoints hold no optimizer moments for the frozen resampler/pos_embed; unfreezing it cannot resume.
    (["--config.optim.freeze=()"], "arrays missing, e.g. opt_state/"),
], ids=["scan-layers", "other-model", "optimizer-state"])
def test_incompatible_checkpoint_is_one_error_line(reference, env, tmp_path, args, expect):
  wd = tmp_path / "run"
  wd.mkdir()
  src = reference["workdir"]
  for name in ("tokenizer.model", "config.json"):
    shutil.copy(os.path.join(src, name), wd / name)
  shutil.copytree(os.path.join(src, "checkpoints", str(TOTAL)), wd / "checkpoints" / str(TOTAL))
  config_before = (wd / "config.json").read_text()
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", *REF_OVERRIDES, *args,
            "--config.optim.total_steps=20")
  assert r.returncode == 2, describe(r)
  assert expect in error_line(r.stderr)
  assert checkpoint_steps(wd) == [TOTAL] and not os.path.exists(wd / "metrics.jsonl")
  assert (wd / "config.json").read_text() == config_before  # the run's record is not overwritten by the reject


# --- dry run --------------------------------------------------------------------------------------------------------

# model, its stage configs, parameters in billions (all, the ViT + adapter)
STAGE_CONFIGS = {"qwen_vl_7b": (("stage1_pretrain", "stage2_multitask", "stage3_sft"), (9.0, 10.0), 1.9),
                 "qwen2_vl_7b": (("qwen2_vl_stage1", "qwen2_vl_stage2", "qwen2_vl_stage3"), (8.2, 8.4), 0.67)}


@pytest.mark.parametrize("model", sorted(STAGE_CONFIGS))
def test_dry_run_memory_plan_of_the_stage_configs(env, model):
  stages, (low, high), vision = STAGE_CONFIGS[model]
  procs = {s: subprocess.Popen([sys.executable, "train.py", f"--config=configs/{s}.py", "--dry_run",
                                "--config.mesh.fsdp=64"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
           for s in stages}
  plan = {}
  for s, p in procs.items():
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    total = re.search(model + r": ([\d,]+) parameters \(([\d.]+) GiB as float32\); mesh data=1 fsdp=64 tensor=1 "
                      r"\(64 devices\)", out)
    per = re.search(r"per device: params ([\d.]+) GiB \+ optimizer state ([\d.]+) GiB = ([\d.]+) GiB", out)
    acts = re.search(r"activations \(estimate, remat full, .*= ([\d.]+) GiB per device; total ([\d.]+) GiB", out)
    assert total and per and acts, out
    plan[s] = {"n": int(total.group(1).replace(",", "")), "total": float(total.group(2)),
               "params": float(per.group(1)), "opt": float(per.group(2)), "sum": float(per.group(3))}
    assert float(acts.group(2)) == pytest.approx(float(per.group(3)) + float(acts.group(1)), abs=2e-3)
  s1, s2, s3 = (plan[s] for s in stages)
  for p in plan.values():
    assert p == dict(p, n=s2["n"], total=s2["total"], params=s2["params"])  # same model, same sharding
    assert p["sum"] == pytest.approx(p["params"] + p["opt"], abs=2e-3)
  assert low * 1e9 < s2["n"] < high * 1e9  # Qwen-VL: 7.7B LLM + 1.9B ViT and adapter; Qwen2-VL: 7.6B + 0.67B
  assert s2["total"] == pytest.approx(s2["n"] * 4 / 2 ** 30, abs=0.01)
  assert s2["params"] == pytest.approx(s2["total"] / 64, rel=0.02)  # FSDP over 64 devices
  assert s2["opt"] == pytest.approx(2 * s2["params"], rel=0.02)  # Adam: mu and nu for (nearly) everything
  assert s1["opt"] < s3["opt"] < s2["opt"]  # stage 1 freezes the LLM, stage 3 only the ViT
  assert s1["opt"] == pytest.approx(2 * vision * 1e9 * 4 / 2 ** 30 / 64, rel=0.1)  # the ViT + adapter only
  assert s3["opt"] + s1["opt"] == pytest.approx(s2["opt"], rel=0.02)

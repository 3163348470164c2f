"""The inference memory plan: per-device bytes from shapes and the sharding rules (no allocation)."""

import subprocess
import sys

import pytest

import qwenvl_jax as qv
from qwenvl_jax.infer.plan import GIB, plan


def test_qwen_vl_chat_needs_int8_on_one_v5e_chip():
  bf16, int8 = plan("qwen_vl_7b", "v5e-1", "bfloat16"), plan("qwen_vl_7b", "v5e-1", "int8")
  assert bf16["params_total"] == 2 * qv.count_params("qwen_vl_7b") and not bf16["fits"]  # 19.3 GB > 16 GiB
  assert int8["fits"] and 0.5 < int8["params_total"] / bf16["params_total"] < 0.56
  # KV cache: 2 (k, v) x 32 layers x 1 row x 32 heads x 2048 slots x 128 x 2 bytes = exactly 1 GiB
  assert bf16["kv_cache_total"] == bf16["kv_cache_per_device"] == GIB


def test_tensor_parallel_splits_params_and_cache():
  r = plan("qwen_vl_7b", "v2-8", "bfloat16", batch=2, context=4096)
  assert r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 8} and r["fits"]
  assert r["params_total"] / 8 <= r["params_per_device"] < r["params_total"] / 7  # little is replicated
  assert r["kv_cache_per_device"] * 8 == r["kv_cache_total"]
  # Qwen2-VL-7B has 4 key/value heads: on tensor=8 its cache (and K/V projections) replicate
  q2 = plan("qwen2_vl_7b", "v5e-8", "bfloat16", batch=4, context=8192)
  assert q2["kv_cache_per_device"] == q2["kv_cache_total"] == 2 * 28 * 4 * 4 * 8192 * 128 * 2
  q2_4 = plan("qwen2_vl_7b", "v4-8", "bfloat16", batch=4, context=8192)  # tensor=4 divides the 4 heads
  assert q2_4["kv_cache_per_device"] * 4 == q2_4["kv_cache_total"]
  data = plan("qwen2_vl_2b", "v5e-8", "bfloat16", batch=8, mesh=(8, 1, 1))  # pure data parallel: cache rows split
  assert data["params_per_device"] == data["params_total"] and data["kv_cache_per_device"] * 8 == data[
      "kv_cache_total"]


@pytest.mark.parametrize("kw,message", [
    (dict(devices="v5e-3"), "unknown devices"), (dict(dtype="int4"), "unknown dtype"),
    (dict(mesh=(2, 1, 2)), "needs 4 devices"), (dict(batch=0), "must be positive"),
    (dict(model="qwen_vl_8b"), "unknown model config")])
def test_bad_plan_requests(kw, message):
  args = dict(model="qwen_vl_7b", devices="v5e-8", dtype="bfloat16") | kw
  with pytest.raises(ValueError, match=message):
    plan(**args)


def test_plan_cli():
  base = [sys.executable, "-m", "qwenvl_jax.infer", "--plan", "--model", "qwen_vl_7b"]
  ok = subprocess.run(base + ["--devices", "v5e-1", "--dtype", "int8"], capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0 and "-> fits" in ok.stdout and "tensor 1" in ok.stdout, ok.stderr[-2000:]
  bad = subprocess.run(base + ["--devices", "v9"], capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown devices") and len(
      bad.stderr.strip().splitlines()) == 1


def test_load_refuses_a_model_that_does_not_fit_before_reading_it(fixture_dir, monkeypatch):
  """Where the runtime reports device memory (TPU/GPU), qv.load checks the plan first; here a device is said to
  hold 2 MiB: the float32 fixture model (6.7 MB) does not fit one device, its int8 form (2.4 MB) neither, 8-way
  tensor parallelism is not asked for. With 8 MiB both load."""
  import qwenvl_jax.infer.plan as plan_module
  from qwenvl_jax.convert import hf
  read = []
  monkeypatch.setattr(hf, "iter_checkpoint", lambda *a, **k: read.append(1) or iter(()))
  monkeypatch.setattr(plan_module, "device_memory", lambda devices: 2 << 20)
  for quantize, need in ((None, "float32 parameters need 0.01 GiB"), ("int8", "int8 parameters need 0.00 GiB")):
    with pytest.raises(ValueError, match=f"{fixture_dir}: the {need} per device on mesh 1x1x1 but a device has "
                                         "0.00 GiB; use more devices"):
      qv.load(fixture_dir, quantize=quantize)
  assert not read  # refused before any weight was read
  monkeypatch.undo()
  monkeypatch.setattr(plan_module, "device_memory", lambda devices: 8 << 20)
  assert qv.load(fixture_dir).param_bytes() > 6 << 20


def test_slice_name_and_choice():
  import types

  from qwenvl_jax.infer.plan import choose, slice_name

  def devs(kind, n, platform="tpu"):
    return [types.SimpleNamespace(platform=platform, device_kind=kind)] * n
  assert slice_name(devs("TPU v5 lite", 1)) == "v5e-1" and slice_name(devs("TPU v5 lite", 8)) == "v5e-8"
  assert slice_name(devs("TPU v2", 8)) == "v2-8" and slice_name(devs("TPU v4", 4)) == "v4-8"
  assert slice_name(devs("TPU v5 lite", 3)) is None and slice_name(devs("cpu", 1, "cpu")) is None
  # Qwen-VL-Chat: bfloat16 does not fit one v5e chip, int8 does; on a v5e-8 bfloat16 does
  assert choose("qwen_vl_7b", "v5e-1")["dtype"] == "int8" and choose("qwen_vl_7b", "v5e-8")["dtype"] == "bfloat16"

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

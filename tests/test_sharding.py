"""Logical-axis sharding: every parameter is named, and a (2,2,2) mesh reproduces single-device logits."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from qwenvl_jax.api import get_config
from qwenvl_jax.models import registry
from qwenvl_jax.sharding import LOGICAL_RULES, make_mesh


@pytest.mark.parametrize("name", ["qwen_vl_7b", "qwen2_vl_7b"])
def test_every_parameter_axis_is_named_and_in_the_rules(name):
  cfg = get_config(name)
  abstract_params = registry.family_of(cfg).abstract_params
  specs = nn.get_partition_spec(abstract_params(cfg, boxed=True))
  ruled = {name for name, _ in LOGICAL_RULES}
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(jax.tree.leaves(abstract_params(cfg)))
  for spec in leaves:
    assert len(spec) > 0 and all(a in ruled for a in spec), spec


def test_mesh_size_errors():
  with pytest.raises(ValueError, match="needs 8 devices, have 1"):
    make_mesh(2, 2, 2)


def test_sharded_forward_matches_single_device(fixture_dir, q2_dir):
  """Both families on one (2, 2, 2) mesh with the same rules table (Qwen2-VL: 2 key/value heads over tensor=2)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
  script = os.path.join(os.path.dirname(__file__), "sharded_forward.py")
  out = subprocess.run([sys.executable, script, fixture_dir, q2_dir], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
  assert [r["family"] for r in results] == ["qwen_vl", "qwen2_vl"]
  for r in results:
    assert r["maxdiff"] <= 1e-4
    # q kernel [layers, embed, heads, kv] is split over fsdp (embed) and tensor (heads)
    assert r["q_kernel_spec"] == "P(None, 'fsdp', 'tensor', None)"
    assert r["q_shard_shape"] == [r["q_shape"][0], r["q_shape"][1] // 2, r["q_shape"][2] // 2, r["q_shape"][3]]
    # nearly everything is sharded 4 ways (fsdp x tensor); only norms, biases and small tables are not (the tiny
    # Qwen2-VL has relatively more of those: 30% of its bytes per device)
    assert r["per_device_bytes"] < 0.32 * r["total_bytes"]


def test_loaded_onto_a_mesh_greedy_tokens_equal_one_device(fixture_dir, q2_dir):
  """qv.load(path, mesh=...) places the weights into their shards as they are read; generate runs on the mesh with
  the KV cache over key/value heads. tensor=8 (neither tiny model has 8 heads: those dims replicate) and data=2 x
  tensor=4 (Qwen2-VL's 2 key/value heads replicate, its query heads split)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
  script = os.path.join(os.path.dirname(__file__), "sharded_generate.py")
  out = subprocess.run([sys.executable, script, fixture_dir, q2_dir], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
  rows = {(r["family"], tuple(r["mesh"])): r for r in lines if "mesh" in r}
  restored = {r["family"]: r for r in lines if "checkpoint_on_mesh_maxdiff" in r}
  int8 = {(r["family"], r["int8_source"]): r for r in lines if "int8_source" in r}
  assert set(int8) == {(f, s) for f in ("qwen_vl", "qwen2_vl") for s in ("hf", "checkpoint")}
  for r in int8.values():  # int8 values split like the float kernel (4 heads over tensor=4), scales alike
    assert r["equal"] and r["dtype"] == "int8"
    assert r["qvalue_spec"] == "P('fsdp', 'tensor', None)" and r["scale_spec"] == "P(None, 'tensor', None)", r
  assert set(restored) == {"qwen_vl", "qwen2_vl"}
  for r in restored.values():  # the Orbax checkpoint restored into its shards (4 heads over tensor=4)
    assert r["checkpoint_on_mesh_maxdiff"] <= 1e-4 and r["q_spec"] == "P('fsdp', 'tensor', None)"
  assert set(rows) == {(f, m) for f in ("qwen_vl", "qwen2_vl") for m in ((1, 8), (2, 4))}
  for r in rows.values():
    assert r["equal"] and r["new"] == 8 and r["per_device_fraction"] < 0.7  # (heads that do not split replicate)
  assert rows["qwen_vl", (2, 4)]["kv"] == "P(None, 'tensor', None, None)"          # 4 heads over tensor=4; 1 row
  assert rows["qwen2_vl", (2, 4)]["kv"] == "P(('data', 'fsdp'), None, None, None)"  # 2 rows split; 2 kv heads < 4

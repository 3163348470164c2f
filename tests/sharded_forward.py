"""Run as a script with 8 fake CPU devices: the fixture model on a (data 2, fsdp 2, tensor 2) mesh.

Prints one JSON line: max |sharded - single-device| logits, and per-device vs total parameter bytes.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import qwenvl_jax as qv  # noqa: E402
from qwenvl_jax.models.qwen_vl.model import abstract_params  # noqa: E402
from qwenvl_jax.sharding import LOGICAL_RULES, logical_to_sharding, make_mesh, replicated  # noqa: E402


def main(fixture_dir):
  assert jax.device_count() == 8
  model = qv.load(fixture_dir)
  c = np.load(os.path.join(fixture_dir, "case_batch.npz"))
  ids = np.concatenate([c["input_ids"]] * 2)
  mask = np.concatenate([c["attention_mask"]] * 2)
  pixels = np.concatenate([c["pixel_values"]] * 2)
  single = np.asarray(model.logits(ids, mask, pixels))

  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  shardings = logical_to_sharding(abstract_params(model.config, boxed=True), mesh)
  params = jax.device_put(model.params, shardings)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  @jax.jit
  def forward(p, ids, mask, pixels):
    return model.module.apply({"params": p}, ids, attention_mask=mask, pixel_values=pixels)

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    sharded = np.asarray(forward(params, jax.device_put(ids, batch), jax.device_put(mask, batch),
                                 jax.device_put(pixels, replicated(mesh))))
  leaves = jax.tree.leaves(params)
  total = sum(x.nbytes for x in leaves)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  q = params["decoder"]["layers"]["attn"]["q"]["kernel"]
  print(json.dumps({"maxdiff": float(np.abs(sharded - single).max()), "total_bytes": total,
                    "per_device_bytes": per_device, "q_kernel_spec": str(q.sharding.spec),
                    "q_shard_shape": list(q.addressable_shards[0].data.shape), "q_shape": list(q.shape)}))


if __name__ == "__main__":
  main(sys.argv[1])

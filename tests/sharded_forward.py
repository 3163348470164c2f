"""Run as a script with 8 fake CPU devices: each fixture model on a (data 2, fsdp 2, tensor 2) mesh.

Prints one JSON line per fixture folder given: max |sharded - single-device| logits, per-device vs total parameter
bytes, and the q kernel's sharding.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import qwenvl_jax as qv  # noqa: E402
from qwenvl_jax.sharding import LOGICAL_RULES, logical_to_sharding, make_mesh, replicated  # noqa: E402

VISION = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def run(fixture_dir, case):
  model = qv.load(fixture_dir)
  c = np.load(os.path.join(fixture_dir, f"case_{case}.npz"))
  ids = np.concatenate([c["input_ids"]] * 2)
  mask = np.concatenate([c["attention_mask"]] * 2)
  if model.family.name == "qwen_vl":
    vision = {"pixel_values": np.concatenate([c["pixel_values"]] * 2)}
  else:  # the batch twice: its images twice, in order
    vision = {k: np.concatenate([c[k]] * 2) for k in VISION if k in c}
  single = np.asarray(model.logits(ids, mask, **vision))
  kw = model.check_inputs(ids, mask, **vision)

  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  shardings = logical_to_sharding(model.family.abstract_params(model.config, boxed=True), mesh)
  params = jax.device_put(model.params, shardings)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  @jax.jit
  def forward(p, ids, mask, kw):
    return model.module.apply({"params": p}, ids, attention_mask=mask, **kw)

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    kw = jax.device_put(kw, replicated(mesh))
    sharded = np.asarray(forward(params, jax.device_put(ids, batch), jax.device_put(mask, batch), kw))
  leaves = jax.tree.leaves(params)
  q = params["decoder"]["layers"]["attn"]["q"]["kernel"]
  valid = mask.astype(bool)
  return {"family": model.family.name, "maxdiff": float(np.abs(sharded - single)[valid].max()),
          "total_bytes": sum(x.nbytes for x in leaves),
          "per_device_bytes": sum(x.addressable_shards[0].data.nbytes for x in leaves),
          "q_kernel_spec": str(q.sharding.spec), "q_shard_shape": list(q.addressable_shards[0].data.shape),
          "q_shape": list(q.shape)}


if __name__ == "__main__":
  assert jax.device_count() == 8
  for folder in sys.argv[1:]:
    print(json.dumps(run(folder, "batch" if "qwen_vl_tiny" in folder else "video")))

"""Run as a script with 8 fake CPU devices: each fixture model loaded straight onto a mesh (tensor=8, then data=2 x
tensor=4) and decoded greedily; prints one JSON line per (fixture, mesh): whether the tokens equal the one-device
run, the fraction of the parameter bytes one device holds, and the KV cache's sharding; then the same for this
project's checkpoint restored onto the mesh, and for int8 weights (quantized from the HF folder and from the
checkpoint, on the mesh) against one device's int8 run."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import qwenvl_jax as qv  # noqa: E402
from qwenvl_jax.infer.generate import cache_sharding  # noqa: E402
from qwenvl_jax.sharding import make_mesh  # noqa: E402

VISION = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def main(folder, case, new):
  c = np.load(os.path.join(folder, f"case_{case}.npz"))
  kw = {k: c[k] for k in VISION if k in c}
  mask = c["attention_mask"] if "attention_mask" in c else None
  single = qv.load(folder, scan_layers=False)
  want = single.generate(c["input_ids"], mask, max_new_tokens=new, **kw)
  for data, tensor in ((1, 8), (2, 4)):
    mesh = make_mesh(data=data, fsdp=1, tensor=tensor)
    model = qv.load(folder, mesh=mesh, scan_layers=False)
    got = model.generate(c["input_ids"], mask, max_new_tokens=new, **kw)
    leaves = jax.tree.leaves(model.params)
    print(json.dumps({"family": model.family.name, "mesh": [data, tensor], "equal": bool(np.array_equal(got, want)),
                      "new": int(got.shape[1] - c["input_ids"].shape[1]),
                      "per_device_fraction": sum(x.addressable_shards[0].data.nbytes for x in leaves)
                      / sum(x.nbytes for x in leaves),
                      "kv": str(cache_sharding(model, c["input_ids"].shape[0]).spec)}), flush=True)
  # this project's checkpoint (Orbax) restored straight into the shards of the last mesh
  with tempfile.TemporaryDirectory() as tmp:
    single.save(os.path.join(tmp, "ckpt"))
    restored = qv.load(os.path.join(tmp, "ckpt"), mesh=mesh)
    q = restored.params["decoder"]["layers_0"]["attn"]["q"]["kernel"]
    diff = np.abs(np.asarray(restored.logits(c["input_ids"], mask, **kw)) - np.asarray(single.logits(
        c["input_ids"], mask, **kw))).max()
    print(json.dumps({"family": model.family.name, "checkpoint_on_mesh_maxdiff": float(diff),
                      "q_spec": str(q.sharding.spec)}), flush=True)
    # int8: quantized as read (HF folder and Orbax checkpoint) straight into the shards, against one device's int8
    single8 = qv.load(folder, quantize="int8")
    want8 = single8.generate(c["input_ids"], mask, max_new_tokens=new, **kw)
    for source in (folder, os.path.join(tmp, "ckpt")):
      model8 = qv.load(source, mesh=mesh, quantize="int8")
      got8 = model8.generate(c["input_ids"], mask, max_new_tokens=new, **kw)
      q8 = model8.params["decoder"]["layers_0"]["attn"]["q"]["kernel"].array
      print(json.dumps({"family": model.family.name, "int8_source": "hf" if source == folder else "checkpoint",
                        "equal": bool(np.array_equal(got8, want8)), "dtype": str(q8.qvalue.dtype),
                        "qvalue_spec": str(q8.qvalue.sharding.spec), "scale_spec": str(q8.scale.sharding.spec)}),
            flush=True)


if __name__ == "__main__":
  assert jax.device_count() == 8
  main(sys.argv[1], "generate", 8)
  main(sys.argv[2], "generate", 8)

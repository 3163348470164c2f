"""Run as a script with 4 fake CPU devices: the contrastive head and loss of a global batch sharded over a (4,)-device
data axis, against one device. Prints one JSON line: sharded loss, single-device loss, the mean of the 4 shards' own
losses (what negatives from the local shard only would give), and the logits' sharding."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from qwenvl_jax.sharding import make_mesh  # noqa: E402
from qwenvl_jax.train import contrastive as C  # noqa: E402


def main():
  """The head and loss over image and text features of a global batch of 8 pairs (what the family towers give; the
  towers' own sharding is tested elsewhere)."""
  rng = np.random.default_rng(0)
  n = 8
  image_features = jnp.asarray(rng.normal(size=(n, 24)), jnp.float32)
  text_features = jnp.asarray(rng.normal(size=(n, 40)), jnp.float32)
  mesh = make_mesh(data=4, fsdp=1, tensor=1)
  rows = NamedSharding(mesh, PartitionSpec("data"))
  out = {}
  for loss in ("clip", "siglip"):
    head = C.ContrastiveHead(C.ContrastiveSpec(loss=loss, embed_dim=16))
    params = C.init_head(head, 24, 40, jax.random.key(1))

    def f(p, img, txt):
      a, b, scale, bias = head.apply({"params": p}, img, txt)
      return C.clip_loss(a, b, scale) if loss == "clip" else C.siglip_loss(a, b, scale, bias)
    f = jax.jit(f)
    single = float(f(params, image_features, text_features))
    img, txt = jax.device_put((image_features, text_features), rows)
    with jax.set_mesh(mesh):
      sharded = float(f(params, img, txt))
    local = float(np.mean([f(params, image_features[i * 2:(i + 1) * 2], text_features[i * 2:(i + 1) * 2])
                           for i in range(4)]))
    shards = {s.index[0].start for s in img.addressable_shards}
    out[loss] = {"sharded": sharded, "single": single, "local_only": local, "row_shards": len(shards)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()

"""Run as a script with 4 fake CPU devices: the contrastive loss of a global batch sharded over a (4,)-device data
axis, against one device. Prints one JSON line: sharded loss, single-device loss, the mean of the 4 shards' own
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

from qwenvl_jax.models import registry  # noqa: E402
from qwenvl_jax.sharding import make_mesh  # noqa: E402
from qwenvl_jax.train import contrastive as C  # noqa: E402


def main():
  cfg = registry.get_config("qwen_vl_tiny")
  fam = registry.family_of(cfg)
  model = fam.module(cfg)
  rng = np.random.default_rng(0)
  n = 8
  batch = {"image/pixel_values": jnp.asarray(rng.normal(size=(n, 3, 56, 56)), jnp.float32),
           "text_ids": jnp.asarray(rng.integers(0, 200, (n, 6)), jnp.int32),
           "text_mask": jnp.asarray((np.arange(6)[None] < rng.integers(2, 7, (n, 1))).astype(np.int32))}
  out = {}
  for loss in ("clip", "siglip"):
    head = C.ContrastiveHead(C.ContrastiveSpec(loss=loss, embed_dim=16))
    params = {**fam.init_params(cfg, jax.random.key(0)),
              "contrastive": C.init_head(head, cfg.vit.width, cfg.decoder.hidden, jax.random.key(1))}
    f = jax.jit(lambda p, b: C.contrastive_loss(model, head, p, b))
    single = float(f(params, batch))
    mesh = make_mesh(data=4, fsdp=1, tensor=1)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    with jax.set_mesh(mesh):
      sharded = float(f(params, sharded_batch))
    local = float(np.mean([f(params, {k: v[i * 2:(i + 1) * 2] for k, v in batch.items()}) for i in range(4)]))
    shards = {s.index[0].start for s in sharded_batch["text_ids"].addressable_shards}
    out[loss] = {"sharded": sharded, "single": single, "local_only": local, "row_shards": len(shards)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()

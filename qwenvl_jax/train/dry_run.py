"""`train.py --dry_run`: the per-device memory plan of a training config on its mesh (an abstract mesh: no devices
needed) -- parameters (and a LoRA run's frozen base), optimizer state and an activation estimate."""

from __future__ import annotations

import jax
import numpy as np

from qwenvl_jax.convert.loader import model_config
from qwenvl_jax.models import registry
from qwenvl_jax.train.activations import activation_bytes
from qwenvl_jax.train.loop import contrastive_head, optimizer, processor_for
from qwenvl_jax.train.lora import nbytes
from qwenvl_jax.train.lora import plan_of as lora_plan_of
from qwenvl_jax.train.state import bytes_per_device, state_shardings


def dry_run(c) -> dict:
  """Shapes only: per-device bytes of params + optimizer state for the configured mesh (an abstract mesh: no
  devices needed) and an activation estimate (`activations.py`), printed and returned."""
  from jax.sharding import AbstractMesh, AxisType
  cfg = model_config(c)
  tx, _ = optimizer(c, cfg)
  sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  if -1 in sizes:
    raise ValueError("--dry_run needs explicit mesh sizes (no -1): e.g. --config.mesh.fsdp=64")
  mesh = AbstractMesh(tuple(sizes), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  head = contrastive_head(c)
  plan = lora_plan_of(c, cfg, mesh)
  abstract, sh = state_shardings(cfg, tx, mesh, head, plan)
  r = bytes_per_device(abstract, sh)
  gib = 2 ** 30
  n_model = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(registry.family_of(cfg).abstract_params(cfg)))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  print(f"model {c.model.name}: {n_model:,} parameters ({n_model * np.dtype(cfg.param_dtype).itemsize / gib:.2f} GiB "
        f"as {cfg.param_dtype}); mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} "
        f"({int(np.prod(sizes))} devices)")
  if plan is not None:  # the frozen base counts with the params; the state holds the trained part alone
    frozen_abs, frozen_sh = plan.frozen_abstract()
    r["frozen"] = nbytes(frozen_abs, frozen_sh)
    print(f"LoRA rank {plan.spec.rank} ({plan.spec.quantize or 'float'} base): {n_params:,} trained parameters "
          f"({n_params / n_model:.2%}); frozen base {nbytes(frozen_abs) / gib:.2f} GiB in all")
  frozen = r.get("frozen", 0)
  print(f"per device: params {(r['params'] + frozen) / gib:.3f} GiB + optimizer state {r['opt_state'] / gib:.3f} GiB = "
        f"{(r['params'] + frozen + r['opt_state']) / gib:.3f} GiB")
  if head is not None:
    print("activations: not estimated in contrastive mode (the estimate models packed generative rows)")
    return r
  act = activation_bytes(c, cfg, processor_for(c, cfg))
  groups = registry.family_of(cfg).param_groups(cfg)
  if plan is not None and not any(groups.group_of("/".join(p)) in ("vision", "adapter") for p in plan.trained):
    # nothing before the LLM trains: no gradient flows into the vision path, so none of its activations is kept
    act = {**act, "total": act["total"] - act["vision"], "vision": 0}
  r["activations"] = act["total"]
  print(f"activations (estimate, remat {cfg.remat_policy}, {c.data.batch_size // c.optim.grad_accum} rows of "
        f"{c.data.seq_len} tokens per micro-batch): decoder {act['decoder'] / gib:.3f} + vision "
        f"{act['vision'] / gib:.3f} + loss {act['loss'] / gib:.3f} = {act['total'] / gib:.3f} GiB per device; "
        f"total {(r['params'] + frozen + r['opt_state'] + act['total']) / gib:.3f} GiB")
  return r

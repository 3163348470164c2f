"""This project's checkpoints: the model checkpoint (an Orbax parameter tree plus the model config and optional
assets) and reading the parameters of a `train.py` workdir.

Layout of a model checkpoint folder:
    qwenvl_config.json   the model config (dtype fields included) and its `family`
    params/groups.json   which parameters (slash-joined paths) each group holds
    params/NNN/          one Orbax StandardCheckpointer tree per group (nested dicts, full paths)
    assets/              optional: tokenizer and other non-weight files carried over from an HF folder

Parameters are written in groups of about `GROUP_BYTES` because an Orbax save holds a transient copy of
what it writes: one group at a time keeps the peak near the model size (bench/convert_rss.py).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from qwenvl_jax.models import registry
from qwenvl_jax.sharding import on_first_local_device

CONFIG_FILE = "qwenvl_config.json"
GROUP_BYTES = 1 << 30


def _groups(flat: dict, max_bytes: int) -> list[list[tuple]]:
  """Consecutive parameters packed into groups of at most max_bytes (a larger parameter is alone)."""
  groups, used = [[]], 0
  for path, x in flat.items():
    n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    if groups[-1] and used + n > max_bytes:
      groups.append([])
      used = 0
    groups[-1].append(path)
    used += n
  return groups


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "params"))


def save(path: str, params, cfg, assets_from: str | None = None, overwrite: bool = False) -> None:
  """Write params (numpy or jax arrays) and config to `path`; copy non-weight files of `assets_from`."""
  from qwenvl_jax.convert.tensor_io import WEIGHT_FILE

  path = os.path.abspath(path)
  if os.path.exists(path):
    if not overwrite and os.listdir(path):
      raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True / --overwrite)")
    shutil.rmtree(path)
  os.makedirs(os.path.join(path, "params"))
  flat = flatten_dict(params)
  groups = _groups(flat, GROUP_BYTES)
  with ocp.StandardCheckpointer() as ckptr:
    for i, group in enumerate(groups):
      # jax arrays: on CPU device_put of a numpy array aliases it, and Orbax copies jax arrays less
      sub = unflatten_dict({p: jax.device_put(flat[p]) if isinstance(flat[p], np.ndarray) else flat[p] for p in group})
      ckptr.save(os.path.join(path, "params", f"{i:03d}"), sub)
      ckptr.wait_until_finished()
      del sub
  with open(os.path.join(path, "params", "groups.json"), "w") as f:
    json.dump([["/".join(p) for p in g] for g in groups], f)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(registry.family_of(cfg).to_json_dict(cfg), f, indent=2)
  if assets_from and os.path.isdir(assets_from):
    os.makedirs(os.path.join(path, "assets"))
    for name in sorted(os.listdir(assets_from)):
      src = os.path.join(assets_from, name)
      if os.path.isfile(src) and not WEIGHT_FILE.match(name):
        shutil.copy2(src, os.path.join(path, "assets", name))


def load_config(path: str):
  """The model config of a checkpoint (its `family` key picks the family; none = Qwen-VL, as written before)."""
  cfg_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(cfg_path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{cfg_path}: unreadable model config ({e})") from None
  return registry.family(d.get("family", "qwen_vl")).from_json_dict(d)


def load(path: str, abstract, shardings=None):
  """Restore params shaped like `abstract` (tree of ShapeDtypeStruct, dtypes included: a stored dtype is cast), placed
  with `shardings` (a matching tree of jax shardings) or on the first device."""
  path = os.path.abspath(path)
  if shardings is None:
    shardings = on_first_local_device(abstract)
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  flat_target = flatten_dict(target)
  try:
    with open(os.path.join(path, "params", "groups.json")) as f:
      groups = [[tuple(p.split("/")) for p in g] for g in json.load(f)]
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable params/groups.json ({e})") from None
  stored = {p for g in groups for p in g}
  if stored != set(flat_target):
    missing = sorted("/".join(p) for p in set(flat_target) - stored)[:5]
    extra = sorted("/".join(p) for p in stored - set(flat_target))[:5]
    raise ValueError(f"{path}: checkpoint does not match its config (missing {missing}, unexpected {extra})")
  out = {}
  with ocp.StandardCheckpointer() as ckptr:
    for i, group in enumerate(groups):
      try:
        sub = ckptr.restore(os.path.join(path, "params", f"{i:03d}"),
                            unflatten_dict({p: flat_target[p] for p in group}))
      except (ValueError, KeyError, FileNotFoundError) as e:
        raise ValueError(f"{path}: checkpoint group {i:03d} does not match its config ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]})") from None
      out.update(flatten_dict(sub))
  return unflatten_dict(out)


def assets_dir(path: str) -> str | None:
  a = os.path.join(path, "assets")
  return a if os.path.isdir(a) else None


def load_training_params(directory: str, abstract_params, param_shardings):
  """Params of the latest checkpoint of a `train.py` workdir (its `checkpoints/`, or that folder itself) -> (params,
  step). The train state is stored as Orbax item `state` (`qwenvl_jax.train.checkpointing`); only its params are
  read."""
  if not os.path.isdir(directory):  # checked here: the manager would create the folder it was asked to read
    raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
  nested = os.path.join(directory, "checkpoints")
  ckpt_dir = nested if os.path.isdir(nested) else directory
  mgr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=("state", "data"),
                              options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no training checkpoint in {ckpt_dir}")
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params,
                        param_shardings)
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": target}, restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding,
                                                                                          dtype=t.dtype),
                                                         {"params": target}), partial_restore=True)))
  mgr.close()
  return restored.state["params"], step

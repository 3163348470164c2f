"""This project's model checkpoint: an Orbax parameter tree plus the model config (and optional assets).

Layout of a checkpoint folder:
    qwenvl_config.json   the QwenVLConfig (dtype fields included)
    params/              Orbax StandardCheckpointer tree (nested dict of arrays)
    assets/              optional: tokenizer and other non-weight files carried over from an HF folder
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwenvl_jax.config import QwenVLConfig, as_dtype, from_json_dict, to_json_dict

CONFIG_FILE = "qwenvl_config.json"


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "params"))


def save(path: str, params, cfg: QwenVLConfig, assets_from: str | None = None, overwrite: bool = False) -> None:
  """Write params (numpy or jax arrays) and config to `path`; copy non-weight files of `assets_from`."""
  from qwenvl_jax.convert.hf import WEIGHT_FILE  # late: avoid an import cycle

  path = os.path.abspath(path)
  if os.path.exists(path):
    if not overwrite and os.listdir(path):
      raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True / --overwrite)")
    shutil.rmtree(path)
  os.makedirs(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params)
    ckptr.wait_until_finished()
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(to_json_dict(cfg), f, indent=2)
  if assets_from and os.path.isdir(assets_from):
    os.makedirs(os.path.join(path, "assets"))
    for name in sorted(os.listdir(assets_from)):
      src = os.path.join(assets_from, name)
      if os.path.isfile(src) and not WEIGHT_FILE.match(name):
        shutil.copy2(src, os.path.join(path, "assets", name))


def load_config(path: str) -> QwenVLConfig:
  cfg_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(cfg_path) as f:
      return from_json_dict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{cfg_path}: unreadable model config ({e})") from None


def load(path: str, abstract, dtype: str | None = None, shardings=None):
  """Restore params shaped like `abstract` (tree of ShapeDtypeStruct), cast to `dtype` if given, placed
  with `shardings` (a matching tree of jax shardings) or on the first device."""
  path = os.path.abspath(path)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, abstract)
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, as_dtype(dtype) if dtype else x.dtype, sharding=s),
      abstract, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(os.path.join(path, "params"), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(f"{path}: checkpoint does not match its config ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300]})") from None


def assets_dir(path: str) -> str | None:
  a = os.path.join(path, "assets")
  return a if os.path.isdir(a) else None


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)

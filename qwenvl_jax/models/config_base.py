"""What every family's config dataclass shares: nested `replace`, the implementation-switch checks, and the JSON
form of this project's checkpoints (`{"family": name, **fields}`)."""

from __future__ import annotations

import dataclasses

from qwenvl_jax.nn.layers import REMAT_POLICIES, as_dtype


def replace(cfg, sub: str, **kw):
  """dataclasses.replace that also takes the vision sub-config `sub` as a dict of its fields; validates."""
  vis = kw.pop(sub, None)
  out = dataclasses.replace(cfg, **kw)
  if vis is not None:
    vis = dataclasses.replace(getattr(cfg, sub), **vis) if isinstance(vis, dict) else vis
    out = dataclasses.replace(out, **{sub: vis})
  out.validate()
  return out


def check_switches(cfg, need) -> None:
  """dtype / param_dtype / remat_policy of any family's config."""
  for name in ("param_dtype", "dtype"):
    as_dtype(getattr(cfg, name))
  need(cfg.remat_policy in REMAT_POLICIES, f"remat_policy {cfg.remat_policy!r} not in {REMAT_POLICIES}")


def to_json(cfg, family: str) -> dict:
  return {"family": family, **dataclasses.asdict(cfg)}


def from_json(cls, sub_cls, sub: str, d: dict, **fix):
  """A config from its JSON form; `fix` maps field names to converters (e.g. lists back to tuples)."""
  d = dict(d)
  d.pop("family", None)
  vis = sub_cls(**d.pop(sub))
  unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"unknown model config keys: {sorted(unknown)}")
  for name, convert in fix.items():
    if d.get(name) is not None:
      d[name] = convert(d[name])
  cfg = cls(**d, **{sub: vis})
  cfg.validate()
  return cfg

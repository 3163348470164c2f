"""The package's floors: every import (module level or inside a function) goes down or sideways, never up.

  0  nn/, data/, sharding.py      family-free blocks and data (data never sees a model)
  1  models/                      families over the core; registry
  2  convert/                     every on-disk format; the one lowest loader
  3  train/, infer/, evals/       ask the family (via the registry), never the public API
  4  api.py, __init__.py          the public facade
  5  */__main__.py                command lines
"""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(__file__), "..", "qwenvl_jax")


def floor(module: str) -> int:
  parts = module.split(".")[1:]
  if parts and parts[-1] == "__main__":
    return 5
  if not parts or parts[0] in ("api", "__init__"):
    return 4
  return {"nn": 0, "data": 0, "sharding": 0, "models": 1, "convert": 2, "train": 3, "infer": 3, "evals": 3}[parts[0]]


def modules():
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__") if rel.endswith(".__init__") else rel, os.path.join(root, f)


def project_imports(path: str):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qwenvl_jax"):
      if node.module == "qwenvl_jax":  # from qwenvl_jax import x: x is a subpackage or module
        yield from (f"qwenvl_jax.{a.name}" for a in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("qwenvl_jax"))


@pytest.mark.parametrize("module,path", sorted(modules()))
def test_imports_go_down_or_sideways(module, path):
  own = floor(module if not module.endswith("__init__") else module)
  for target in project_imports(path):
    assert floor(target) <= own, f"{module} (floor {own}) imports {target} (floor {floor(target)})"
    if module.startswith("qwenvl_jax.data") or module.startswith("qwenvl_jax.nn"):
      assert not target.startswith("qwenvl_jax.models"), f"{module} imports {target}"


def test_no_family_modules_at_the_package_top():
  top = {f for f in os.listdir(PKG) if f.endswith(".py")}
  assert top == {"__init__.py", "api.py", "sharding.py"}, top

"""Data in the official Qwen-VL finetune format: a JSON list or JSON Lines of

    {"id": "...", "conversations": [{"from": "user", "value": "Picture 1: <img>img/a.jpg</img>\\nWhat is it?"},
                                    {"from": "assistant", "value": "A <ref>cat</ref><box>(12,40),(500,980)</box>."}]}

Image paths inside `<img>...</img>` are resolved against `image_root` (default: the data file's folder).
Bad records (malformed JSON, unknown roles, boxes outside [0, 1000), missing image files) are skipped with a
warning naming the file and line, and counted in `errors`; `strict=True` raises instead.
"""

from __future__ import annotations

import json
import logging
import os
import re

from qwenvl_jax.data.boxes import BOX_RE
from qwenvl_jax.data.conversation import FormatError, normalize_roles

log = logging.getLogger("qwenvl_jax.data")
IMG_REF = re.compile(r"<img>(.*?)</img>", re.S)


class DataError(ValueError):
  """A data record that cannot be used (message names the file and line)."""


def image_refs(conversations) -> list[str]:
  """Image references in order of appearance across the turns."""
  return [m.group(1) for turn in conversations for m in IMG_REF.finditer(str(turn.get("value", "")))]


def _check_record(obj, where: str, image_root: str) -> dict:
  if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
    raise DataError(f"{where}: expected an object with a 'conversations' list")
  try:
    normalize_roles(obj["conversations"], where)
  except FormatError as e:
    raise DataError(str(e)) from None
  for turn in obj["conversations"]:
    for m in BOX_RE.finditer(turn["value"]):
      if any(int(v) >= 1000 for v in m.groups()):
        raise DataError(f"{where}: box {m.group(0)} outside the normalised [0, 1000) range")
  images = {}
  for ref in image_refs(obj["conversations"]):
    if re.match(r"^[a-z]+://", ref):
      raise DataError(f"{where}: image {ref!r} is a URL; download it and reference the local file")
    path = ref if os.path.isabs(ref) else os.path.join(image_root, ref)
    if not os.path.isfile(path):
      raise DataError(f"{where}: image file {path} not found")
    images[ref] = path
  return {"id": str(obj.get("id", where)), "task": str(obj.get("task", "chat")), "images": images,
          "conversations": obj["conversations"], "source": where}


class JsonlSource:
  """Random-access source of records in the project's common format (see `qwenvl_jax.data.shapes`)."""

  def __init__(self, path: str, image_root: str | None = None, strict: bool = False):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data file {path} does not exist")
    self.path = path
    self.image_root = image_root or os.path.dirname(os.path.abspath(path))
    self.records: list[dict] = []
    self.errors = 0
    for where, obj in self._parse():
      try:
        if isinstance(obj, DataError):
          raise obj
        self.records.append(_check_record(obj, where, self.image_root))
      except DataError as e:
        if strict:
          raise
        self.errors += 1
        log.warning("skipping record: %s", e)
    if self.errors:
      log.warning("%s: %d of %d records skipped", path, self.errors, self.errors + len(self.records))

  def _parse(self):
    with open(self.path, encoding="utf-8") as f:
      text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON list (the official finetune files)
      try:
        items = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f"{self.path}:{e.lineno}: invalid JSON ({e.msg})") from None
      for k, obj in enumerate(items):
        yield f"{self.path}[{k}]", obj
      return
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      where = f"{self.path}:{lineno}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        yield where, DataError(f"{where}: malformed JSON ({e.msg})")

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return self.records[i]

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {len(self)} records)"

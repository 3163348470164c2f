"""Data in the official Qwen-VL finetune format: a JSON list or JSON Lines of

    {"id": "...", "conversations": [{"from": "user", "value": "Picture 1: <img>img/a.jpg</img>\\nWhat is it?"},
                                    {"from": "assistant", "value": "A <ref>cat</ref><box>(12,40),(500,980)</box>."}]}

Image paths inside `<img>...</img>` are resolved against `image_root` (default: the data file's folder). As in the
official code, a path may leave that folder (`../x.png`, an absolute path); `confine_images=True` refuses (skips)
records whose images resolve, symbolic links followed, outside `image_root`: for data from elsewhere.
Bad records (malformed JSON, a line that is not UTF-8, a lone surrogate, an integer too long for int(), nesting too
deep, unknown roles, boxes outside [0, 1000), missing image files) are skipped with a warning naming the file and line
(the first 20 of a file; all are counted in `errors`); `strict=True` raises instead. In a JSON list each record is
named by the line it starts on and its index, and a syntax error is one error for the file (nothing after it can be
found). A leading UTF-8 byte order mark is ignored; a file without one usable record is an error.
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


_MAX_WARNINGS = 20  # skipped records warned about one by one per file; the rest only counted


class _HugeInt:
  """An integer literal too long for int() (more than sys.get_int_max_str_digits() digits): makes its record bad."""

  def __init__(self, digits: str):
    self.n = len(digits)


def _int(text: str):
  try:
    return int(text)
  except ValueError:
    return _HugeInt(text)


_DECODER = json.JSONDecoder(parse_int=_int)


def _unusable(obj) -> str | None:
  """Why a parsed record cannot be used as text (a huge integer, a lone surrogate, a byte that is not UTF-8), or
  None."""
  def huge(o):
    if isinstance(o, _HugeInt):
      raise ValueError(f"an integer of {o.n} digits")
    raise TypeError(type(o).__name__)
  try:
    json.dumps(obj, ensure_ascii=False, default=huge).encode("utf-8")
  except ValueError as e:  # UnicodeEncodeError is one too
    return "not UTF-8 text (a lone surrogate or an undecodable byte)" if isinstance(e, UnicodeError) else str(e)
  except RecursionError:
    return "nested too deeply"
  return None


def _why(e: BaseException) -> str:
  if isinstance(e, RecursionError):
    return "nested too deeply"
  return getattr(e, "msg", None) or " ".join(str(e).split())[:120]


def image_refs(conversations) -> list[str]:
  """Image references in order of appearance across the turns."""
  return [m.group(1) for turn in conversations for m in IMG_REF.finditer(str(turn.get("value", "")))]


def _check_record(obj, where: str, image_root: str, confine_to: str | None = None) -> dict:
  """A usable record -> the source's record dict, else DataError; confine_to: the real path images must lie in."""
  if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
    raise DataError(f"{where}: expected an object with a 'conversations' list")
  try:
    normalize_roles(obj["conversations"], where)
  except FormatError as e:
    raise DataError(str(e)) from None
  for turn in obj["conversations"]:
    for m in BOX_RE.finditer(turn["value"]):
      if any(len(v.lstrip("0")) > 3 for v in m.groups()):  # >= 1000 (int() refuses over 4300 digits)
        box = m.group(0) if len(m.group(0)) <= 60 else m.group(0)[:57] + "..."
        raise DataError(f"{where}: box {box} outside the normalised [0, 1000) range")
  images = {}
  for ref in image_refs(obj["conversations"]):
    if re.match(r"^[a-z]+://", ref):
      raise DataError(f"{where}: image {ref!r} is a URL; download it and reference the local file")
    path = ref if os.path.isabs(ref) else os.path.join(image_root, ref)
    if confine_to is not None and os.path.commonpath([os.path.realpath(path), confine_to]) != confine_to:
      raise DataError(f"{where}: image {ref[:200]!r} lies outside image_root {confine_to} (confine_images)")
    if not os.path.exists(path):
      raise DataError(f"{where}: image file {path} not found")
    if not os.path.isfile(path):
      raise DataError(f"{where}: image {path} is not a regular file")
    images[ref] = path
  return {"id": str(obj.get("id", where)), "task": str(obj.get("task", "chat")), "images": images,
          "conversations": obj["conversations"], "source": where}


class JsonlSource:
  """Random-access source of records in the project's common format (see `qwenvl_jax.data.shapes`).

  image_root: the folder image paths are relative to (default: the data file's). confine_images: skip records whose
  images resolve outside image_root (`../`, absolute paths, symbolic links leading out); off by default, as the
  official code reads any path. strict: raise on the first bad record instead of skipping it."""

  def __init__(self, path: str, image_root: str | None = None, strict: bool = False, confine_images: bool = False):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data file {path} does not exist")
    self.path = path
    self.image_root = image_root or os.path.dirname(os.path.abspath(path))
    confine_to = os.path.realpath(self.image_root) if confine_images else None
    self.records: list[dict] = []
    self.errors = 0
    for where, obj in self._parse():
      try:
        if isinstance(obj, DataError):
          raise obj
        why = _unusable(obj)
        if why is not None:
          raise DataError(f"{where}: {why}")
        self.records.append(_check_record(obj, where, self.image_root, confine_to))
      except DataError as e:
        if strict:
          raise
        self.errors += 1
        if self.errors <= _MAX_WARNINGS:
          log.warning("skipping record: %s", e)
    if self.errors:
      more = f" (the first {_MAX_WARNINGS} warned about)" if self.errors > _MAX_WARNINGS else ""
      log.warning("%s: %d of %d records skipped%s", path, self.errors, self.errors + len(self.records), more)
    if not self.records:
      raise DataError(f"{path}: no usable record ({self.errors} skipped, see the warnings above)")

  def _parse(self):
    """-> (where, object or the DataError of that line). In JSON Lines a bad line is skipped alone."""
    with open(self.path, "rb") as f:
      data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (editors on Windows write one)
      data = data[3:]
    if data.lstrip().startswith(b"["):  # one JSON list (the official finetune files)
      yield from self._parse_list(data.decode("utf-8", "surrogateescape"))
      return
    for lineno, raw in enumerate(data.split(b"\n"), 1):
      if not raw.strip():
        continue
      where = f"{self.path}:{lineno}"
      try:
        yield where, _DECODER.decode(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield where, DataError(f"{where}: not UTF-8 (byte {e.start} of the line)")
      except (ValueError, RecursionError) as e:
        yield where, DataError(f"{where}: malformed JSON ({_why(e)})")

  def _parse_list(self, text: str):
    """The records of one JSON list, item by item, each named by the line it starts on and its index. A byte that
    is not UTF-8 (decoded as a lone surrogate) or a huge integer spoils only its record; JSON that does not parse
    is one error naming its line, since nothing after it can be found."""
    def line_at(i):
      return text.count("\n", 0, i) + 1

    ws = re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted, k = 1, 0, 0
    while not text.startswith("]", pos):
      try:
        obj, end = _DECODER.raw_decode(text, pos)
      except json.JSONDecodeError as e:
        raise DataError(f"{self.path}:{e.lineno}: invalid JSON ({e.msg})") from None
      except RecursionError:
        raise DataError(f"{self.path}:{line_at(pos)}: invalid JSON (nested too deeply)") from None
      line, counted = line + text.count("\n", counted, pos), pos
      yield f"{self.path}:{line} (record {k})", obj
      pos = ws.match(text, end).end()
      if text.startswith(",", pos):
        pos = ws.match(text, pos + 1).end()
      elif not text.startswith("]", pos):
        raise DataError(f"{self.path}:{line_at(pos)}: invalid JSON (expected ',' or ']' after record {k})")
      k += 1
    if text[pos + 1:].strip(" \t\n\r"):
      raise DataError(f"{self.path}:{line_at(pos + 1)}: invalid JSON (text after the list)")

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return self.records[i]

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {len(self)} records)"

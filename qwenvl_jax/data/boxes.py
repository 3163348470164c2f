"""Grounding boxes as text: `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` with integers in [0, 1000) (Qwen-VL), or
`<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` (Qwen2-VL); both parse.

Pixel boxes (x1, y1, x2, y2) on a W x H image are normalised with floor(x / W * 1000) clamped to [0, 999];
the inverse maps a normalised n back to n / 1000 * W pixels (the official Qwen-VL convention). Parsing never raises
on model output: boxes come back as written (`valid_box` says whether one is in range with ordered corners;
`clamp_box` makes one so).
"""

from __future__ import annotations

import re

_BOX = r"(?:<box>|<\|box_start\|>)\((\d+),(\d+)\),\((\d+),(\d+)\)(?:</box>|<\|box_end\|>)"
BOX_RE = re.compile(_BOX)
REF_BOX_RE = re.compile(r"(?:<ref>|<\|object_ref_start\|>)(.*?)(?:</ref>|<\|object_ref_end\|>)\s*" + _BOX)


TOO_LONG = 10 ** 6  # a coordinate of more than six digits (int() refuses over 4300) reads as this: out of range


def _coord(digits: str) -> int:
  digits = digits.lstrip("0") or "0"
  return int(digits) if len(digits) <= 6 else TOO_LONG


def read_box(groups) -> tuple[int, int, int, int]:
  """The four coordinate digit strings of a BOX_RE match -> integers as written (never raises)."""
  return tuple(_coord(v) for v in groups)


def valid_box(box) -> bool:
  """A normalised box in [0, 1000) with x1 <= x2 and y1 <= y2 (what a model should write)."""
  x1, y1, x2, y2 = box
  return all(0 <= v < 1000 for v in box) and x1 <= x2 and y1 <= y2


def clamp_box(box) -> tuple[int, int, int, int]:
  """A normalised box as a model meant it: corners ordered, coordinates clamped to [0, 999]."""
  x1, y1, x2, y2 = (min(max(int(v), 0), 999) for v in box)
  return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


class BoxError(ValueError):
  """A box that does not fit its image."""


def normalize_box(box, width: int, height: int, clip: bool = False) -> tuple[int, int, int, int]:
  """Pixel (x1, y1, x2, y2) -> integers in [0, 1000). Raises BoxError for a box outside the image
  (unless clip=True) or with x2 < x1 / y2 < y1."""
  x1, y1, x2, y2 = (float(v) for v in box)
  if x2 < x1 or y2 < y1:
    raise BoxError(f"box {tuple(box)} has x2 < x1 or y2 < y1")
  if not clip and (x1 < 0 or y1 < 0 or x2 > width or y2 > height):
    raise BoxError(f"box {tuple(box)} lies outside the {width}x{height} image")

  def norm(v, size):
    return min(max(int(v / size * 1000), 0), 999)
  return norm(x1, width), norm(y1, height), norm(x2, width), norm(y2, height)


def denormalize_box(box, width: int, height: int) -> tuple[float, float, float, float]:
  """Normalised (x1, y1, x2, y2) in [0, 1000) -> pixels."""
  x1, y1, x2, y2 = box
  return x1 / 1000 * width, y1 / 1000 * height, x2 / 1000 * width, y2 / 1000 * height


def box_text(norm_box) -> str:
  x1, y1, x2, y2 = norm_box
  return f"<box>({x1},{y1}),({x2},{y2})</box>"


def ref_box_text(phrase: str, box, width: int, height: int) -> str:
  """`<ref>phrase</ref><box>...</box>` for a pixel box."""
  return f"<ref>{phrase}</ref>" + box_text(normalize_box(box, width, height))


def parse_ref_boxes(text: str) -> list[tuple[str, tuple[int, int, int, int]]]:
  """All `<ref>phrase</ref><box>(..),(..)</box>` pairs of a text, boxes still normalised, as written."""
  return [(m.group(1), read_box(m.groups()[1:])) for m in REF_BOX_RE.finditer(text)]


_QWEN2_TAGS = {"<|object_ref_start|>": "<ref>", "<|object_ref_end|>": "</ref>", "<|box_start|>": "<box>",
               "<|box_end|>": "</box>"}
_QWEN2_TAG = re.compile("|".join(map(re.escape, _QWEN2_TAGS)))


def qwen_vl_tags(text: str) -> str:
  """Qwen2-VL's grounding tokens written as Qwen-VL's tags (the form of the data), other text unchanged."""
  return _QWEN2_TAG.sub(lambda m: _QWEN2_TAGS[m.group()], text)


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
  """All `<box>(..),(..)</box>` of a text, normalised, as written (see `valid_box`)."""
  return [read_box(m.groups()) for m in BOX_RE.finditer(text)]

"""Grounding in model outputs -> pixel boxes, drawn on the image. Both families' forms parse, coordinates in
[0, 1000): Qwen-VL `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`, Qwen2-VL
`<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` (`data/boxes.py`)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from qwenvl_jax.data.boxes import BOX_RE, REF_BOX_RE, clamp_box, denormalize_box, read_box
from qwenvl_jax.data.images import load_image

COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def parse_grounding(text: str, width: int, height: int) -> list[tuple[str, tuple[float, float, float, float]]]:
  """All boxes of a response as (phrase, pixel box on a width x height image); boxes without a phrase get ''. Never
  raises on model output: a box with inverted corners is drawn with its corners ordered and coordinates of 1000 or
  more are clamped to 999 (`clamp_box`: the box the model meant; the evaluator counts such a box as wrong)."""
  found = []  # (position in the text, phrase, normalised box)
  spans = []
  for m in REF_BOX_RE.finditer(text):
    found.append((m.start(), m.group(1), read_box(m.groups()[1:])))
    spans.append(m.span())
  for m in BOX_RE.finditer(text):
    if not any(a <= m.start() < b for a, b in spans):
      found.append((m.start(), "", read_box(m.groups())))
  found.sort(key=lambda f: f[0])
  return [(phrase, denormalize_box(clamp_box(box), width, height)) for _, phrase, box in found]


def draw_grounding(image, text: str, out_path: str | None = None) -> Image.Image:
  """Draw the response's boxes (with their phrases) on the original image; save as PNG if out_path is given."""
  img = load_image(image).copy()
  draw = ImageDraw.Draw(img)
  for k, (phrase, (x1, y1, x2, y2)) in enumerate(parse_grounding(text, img.width, img.height)):
    color = COLORS[k % len(COLORS)]
    draw.rectangle([x1, y1, x2, y2], outline=color, width=max(1, min(img.size) // 100))
    if phrase:
      draw.text((x1 + 2, max(0, y1 - 12)), phrase, fill=color)
  if out_path:
    img.save(out_path, format="PNG")
  return img

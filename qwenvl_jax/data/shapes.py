"""The embedded synthetic dataset "shapes": drawn coloured shapes and rendered words, with Qwen-VL style tasks.

Every record is a pure function of (seed, split, index): the RNG is `np.random.default_rng([seed, split_id, index])`,
so the three splits are independent streams and any record can be made on demand (random access for Grain).
The task mix mirrors the Qwen-VL stage-2 multi-task data (captioning, VQA, grounding, grounded captions, OCR,
multi-image and pure text), scaled down to a world a tiny model can learn: 3 shapes, 6 colours, 1-3 objects. One
video task ("video_motion": a short clip of a shape moving left, right, up or down) is for the families that take
videos (Qwen2-VL); it has weight 0 in DEFAULT_MIX, so it is only drawn when a mix names it.

Scene rules that keep every question answerable: the colours inside one image are distinct (so "the red object"
and "the red circle" always name one object), objects never overlap horizontally (so "left of" and the
left-to-right order of captions are unambiguous), and tasks that need a unique shape or two objects make them so.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from qwenvl_jax.data.boxes import box_text, normalize_box, ref_box_text

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Far apart in hue and all dark or saturated enough to stand out on the light backgrounds below.
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (220, 30, 30),
  "green": (30, 160, 50),
  "blue": (35, 75, 220),
  "yellow": (230, 195, 0),
  "purple": (135, 50, 180),
  "orange": (245, 125, 15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
  (255, 255, 255), (246, 246, 240), (238, 242, 248), (248, 241, 232), (240, 248, 240))
# OCR backgrounds: light ones take black text, dark ones white text (high contrast either way).
OCR_LIGHT_BACKGROUNDS: tuple[tuple[int, int, int], ...] = BACKGROUNDS + (
  (255, 232, 232), (228, 240, 255), (255, 248, 210), (232, 250, 232))
OCR_DARK_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((25, 40, 110), (60, 20, 80), (20, 80, 45), (45, 45, 45))
# Common 3-5 letter words; colour words are left out so OCR answers never look like VQA colour answers.
WORDS: tuple[str, ...] = (
  "cat", "dog", "sun", "jam", "box", "cup", "hat", "pen", "map", "key",
  "bird", "fish", "tree", "book", "milk", "rain", "star", "moon", "ship", "door",
  "cake", "lamp", "frog", "bell", "kite", "rose", "wind", "fire", "snow", "leaf",
  "apple", "house", "water", "light", "grass", "bread", "chair", "table", "horse", "plant",
  "train", "cloud", "river", "smile", "music", "happy", "dream", "earth", "ocean", "stone",
)
OPPOSITES: tuple[tuple[str, str], ...] = (
  ("left", "right"), ("up", "down"), ("big", "small"), ("hot", "cold"), ("yes", "no"), ("day", "night"),
  ("open", "closed"), ("black", "white"), ("in", "out"), ("top", "bottom"), ("fast", "slow"), ("old", "new"))

TASKS: tuple[str, ...] = (
  "caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "grounding", "grounded_caption", "ocr",
  "multi_image", "text", "video_motion")
# video_motion last and at weight 0: the default mix draws exactly the records it drew before videos existed
DEFAULT_MIX: dict[str, float] = {
  "caption": 0.14, "vqa_color": 0.10, "vqa_shape": 0.10, "vqa_count": 0.10, "vqa_position": 0.10,
  "grounding": 0.14, "grounded_caption": 0.10, "ocr": 0.10, "multi_image": 0.07, "text": 0.05, "video_motion": 0.0,
}
VIDEO_TASKS: tuple[str, ...] = ("video_motion",)
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_IDS: dict[str, int] = {name: i for i, name in enumerate(SPLITS)}
TRAIN_SIZE = 20000
VALIDATION_SIZE = 500
TEST_SIZE = 500
SPLIT_SIZES: dict[str, int] = {"train": TRAIN_SIZE, "validation": VALIDATION_SIZE, "test": TEST_SIZE}
DEFAULT_IMAGE_SIZE = 112
MIN_IMAGE_SIZE = 32
# Share of single-image VQA records that get a second (user, assistant) exchange about the same image.
MULTI_TURN_PROB = 0.15

CAPTION_PROMPT = "Describe the image."
GROUNDED_CAPTION_PROMPT = "Describe the image with boxes."
OCR_PROMPT = "What does the text say?"

Objects = list[dict[str, Any]]


def picture_prefix(num_images: int) -> str:
  """The official Qwen-VL chat prefix naming each image: `Picture k: <img>img{k-1}</img>\\n`."""
  return "".join(f"Picture {k + 1}: <img>img{k}</img>\n" for k in range(num_images))


def video_prefix(num_videos: int) -> str:
  """The Qwen2-VL chat prefix naming each video: `Video k: <video>vid{k-1}</video>\\n`."""
  return "".join(f"Video {k + 1}: <video>vid{k}</video>\n" for k in range(num_videos))


def resolve_mix(mix: Mapping[str, float] | Sequence[str] | None) -> tuple[tuple[str, ...], np.ndarray]:
  """Task names and their cumulative probabilities; a sequence of names means equal weights."""
  if mix is None:
    mix = DEFAULT_MIX
  if isinstance(mix, str):
    mix = (mix,)
  weights = dict(mix) if isinstance(mix, Mapping) else {name: 1.0 for name in mix}
  unknown = sorted(set(weights) - set(TASKS))
  if unknown:
    raise ValueError(f"unknown shapes tasks {unknown}; known: {TASKS}")
  names = tuple(name for name in TASKS if weights.get(name, 0.0) > 0)
  if not names or any(w < 0 for w in weights.values()):
    raise ValueError(f"task mix needs non-negative weights and at least one positive: {mix!r}")
  probs = np.array([weights[name] for name in names], dtype=np.float64)
  return names, np.cumsum(probs / probs.sum())


@functools.lru_cache(maxsize=128)
def _font(size: int) -> ImageFont.FreeTypeFont:
  # Pillow >= 10.1 ships a scalable default font when built with FreeType, so no font file is needed; without
  # FreeType load_default ignores the size and returns a tiny bitmap font, unreadable at these sizes.
  if not features.check("freetype2"):
    raise RuntimeError("shapes OCR needs Pillow built with FreeType (ImageFont.load_default(size=...))")
  return ImageFont.load_default(size=size)


def _join(parts: Sequence[str]) -> str:
  """'a', 'a and b', 'a, b and c'."""
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _margin(size: int) -> int:
  return max(1, size // 28)


def _layout(rng: np.random.Generator, size: int, n: int) -> list[tuple[int, int, int]]:
  """(x, y, side) of n squares, left to right with disjoint x-ranges, inside the image."""
  margin, gap = _margin(size), max(2, size // 28)
  lo, hi = int(0.16 * size), int(min(0.42, 0.84 / n) * size)
  sides = rng.integers(lo, hi + 1, n)
  free = size - 2 * margin - int(sides.sum()) - (n - 1) * gap
  # Spread the spare width randomly over the n + 1 gaps around the objects.
  cuts = np.sort(rng.integers(0, free + 1, n))
  spare = np.diff(np.concatenate([[0], cuts, [free]]))
  ys = rng.integers(margin, size - margin - sides + 1)
  out, x = [], margin + int(spare[0])
  for i in range(n):
    side = int(sides[i])
    out.append((x, int(ys[i]), side))
    x += side + gap + int(spare[i + 1])
  return out


def _sample_objects(rng: np.random.Generator, size: int, n: int,
                    include: tuple[str, str] | None = None) -> Objects:
  """n objects with distinct colours and random shapes; `include` = (colour, shape) forces one of them."""
  colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:n]]
  shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), n)]
  if include is not None:
    color, shape = include
    if color in colors:
      colors.remove(color)
    else:
      colors.pop()
    slot = int(rng.integers(n))
    colors.insert(slot, color)
    shapes[slot] = shape
  return [{"shape": s, "color": c, "box": [float(x), float(y), float(x + side), float(y + side)]}
          for s, c, (x, y, side) in zip(shapes, colors, _layout(rng, size, n))]


def _other_shape(rng: np.random.Generator, shape: str) -> str:
  return SHAPES[(SHAPES.index(shape) + int(rng.integers(1, len(SHAPES)))) % len(SHAPES)]


def _draw_objects(draw: ImageDraw.ImageDraw, objects: Objects) -> None:
  for obj in objects:
    # Pixel columns x1 .. x2 - 1 are painted, so the continuous box [x1, x2) is the exact pixel extent.
    x1, y1, x2, y2 = (int(v) for v in obj["box"])
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
      draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif obj["shape"] == "square":
      draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
      draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)


def _scene_image(rng: np.random.Generator, size: int, objects: Objects) -> Image.Image:
  image = Image.new("RGB", (size, size), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
  _draw_objects(ImageDraw.Draw(image), objects)
  return image


def _phrase(obj: Mapping[str, Any], article: str = "a") -> str:
  """'a red circle', 'an orange square', or with article='the'."""
  if article == "a" and obj["color"][0] in "aeiou":
    article = "an"
  return f"{article} {obj['color']} {obj['shape']}"


# Questions about a fixed scene: each returns (question, one-word answer), or None when the scene cannot answer it.

def _q_color(rng: np.random.Generator, objects: Objects) -> tuple[str, str] | None:
  unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
  if not unique:
    return None
  obj = unique[int(rng.integers(len(unique)))]
  return f"What color is the {obj['shape']}?", obj["color"]


def _q_shape(rng: np.random.Generator, objects: Objects) -> tuple[str, str] | None:
  obj = objects[int(rng.integers(len(objects)))]
  return f"What shape is the {obj['color']} object?", obj["shape"]


def _q_count(rng: np.random.Generator, objects: Objects) -> tuple[str, str] | None:
  if rng.random() < 0.5:
    return "How many shapes are there?", str(len(objects))
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  return f"How many {shape}s are there?", str(sum(o["shape"] == shape for o in objects))


def _q_position(rng: np.random.Generator, objects: Objects) -> tuple[str, str] | None:
  if len(objects) < 2:
    return None
  i, j = (int(v) for v in rng.choice(len(objects), 2, replace=False))
  a, b = objects[i], objects[j]
  # Objects are listed left to right with disjoint x-ranges, so the list order is the spatial order.
  return f"Is the {a['color']} {a['shape']} left or right of the {b['color']} {b['shape']}?", (
    "left" if i < j else "right")


_QUESTIONS = {"vqa_color": _q_color, "vqa_shape": _q_shape, "vqa_count": _q_count, "vqa_position": _q_position}


def _single_image_task(task: str, rng: np.random.Generator, size: int) -> tuple[list, list, list]:
  """(images, [(user, assistant), ...], objects per image) of one single-image shape-scene task."""
  n = int(rng.integers(2 if task == "vqa_position" else 1, 4))
  objects = _sample_objects(rng, size, n)
  if task == "vqa_color":
    # Make one object's shape unique so "the <shape>" names it.
    keep = objects[int(rng.integers(n))]
    for obj in objects:
      if obj is not keep and obj["shape"] == keep["shape"]:
        obj["shape"] = _other_shape(rng, keep["shape"])
  image = _scene_image(rng, size, objects)
  if task == "caption":
    turns = [(CAPTION_PROMPT, _join([_phrase(o) for o in objects]) + ".")]
  elif task == "grounded_caption":
    turns = [(GROUNDED_CAPTION_PROMPT, _join([ref_box_text(_phrase(o), o["box"], size, size) for o in objects]))]
  elif task == "grounding":
    obj = objects[int(rng.integers(n))]
    turns = [(f"<ref>{_phrase(obj, 'the')}</ref>", box_text(normalize_box(obj["box"], size, size)))]
  else:
    turns = [_QUESTIONS[task](rng, objects)]
    if rng.random() < MULTI_TURN_PROB:
      # A follow-up about the same image, of another question type that this scene can answer.
      for other in rng.permutation([name for name in _QUESTIONS if name != task]):
        follow = _QUESTIONS[str(other)](rng, objects)
        if follow is not None:
          turns.append(follow)
          break
  return [image], turns, [objects]


def _ocr(rng: np.random.Generator, size: int) -> tuple[list, list, list]:
  word = WORDS[int(rng.integers(len(WORDS)))]
  dark = rng.random() < 0.25
  palette = OCR_DARK_BACKGROUNDS if dark else OCR_LIGHT_BACKGROUNDS
  image = Image.new("RGB", (size, size), palette[int(rng.integers(len(palette)))])
  draw = ImageDraw.Draw(image)
  margin = _margin(size)
  font_size = int(rng.integers(int(0.26 * size), int(0.38 * size) + 1))
  left, top, right, bottom = _font(font_size).getbbox(word)
  max_width = min(0.9 * size, size - 2 * margin - 1)
  while right - left > max_width and font_size > 4:  # glyph widths do not scale exactly: shrink until it fits
    font_size = max(4, min(font_size - 1, int(font_size * max_width / (right - left))))
    left, top, right, bottom = _font(font_size).getbbox(word)
  width, height = right - left, bottom - top
  x = int(rng.integers(margin, size - margin - width + 1))
  objects: Objects = []
  if rng.random() < 0.5:
    # A small shape in one half of the image, the word in the other, so they never overlap.
    half = size // 2
    side = int(rng.integers(int(0.14 * size), int(0.22 * size) + 1))
    text_on_top = rng.random() < 0.5
    y_lo, y_hi = (margin, half - 1 - height) if text_on_top else (half + 1, size - margin - height)
    y = int(rng.integers(y_lo, max(y_lo, y_hi) + 1))
    sy_lo, sy_hi = (half + 1, size - margin - side) if text_on_top else (margin, half - 1 - side)
    sx, sy = int(rng.integers(margin, size - margin - side + 1)), int(rng.integers(sy_lo, max(sy_lo, sy_hi) + 1))
    color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    objects.append({"shape": shape, "color": color, "box": [float(sx), float(sy), float(sx + side), float(sy + side)]})
    _draw_objects(draw, objects)
  else:
    y = int(rng.integers(margin, size - margin - height + 1))
  draw.text((x - left, y - top), word, fill=(255, 255, 255) if dark else (0, 0, 0), font=_font(font_size))
  objects.append({"shape": "text", "color": "white" if dark else "black", "text": word,
                  "box": [float(x), float(y), float(x + width), float(y + height)]})
  return [image], [(OCR_PROMPT, word)], [objects]


def _multi_image(rng: np.random.Generator, size: int) -> tuple[list, list, list]:
  answer = int(rng.integers(2))  # index of the picture that answers
  if rng.random() < 0.5:
    counts = rng.choice(3, 2, replace=False) + 1
    if (counts[0] > counts[1]) != (answer == 0):
      counts = counts[::-1]
    scenes = [_sample_objects(rng, size, int(c)) for c in counts]
    question = "Which picture has more shapes?"
  else:
    target = (COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))], SHAPES[int(rng.integers(len(SHAPES)))])
    scenes = [_sample_objects(rng, size, int(rng.integers(1, 4)), include=target if k == answer else None)
              for k in range(2)]
    for obj in scenes[1 - answer]:
      # The other picture may share the colour or the shape, never both: near misses make the question real.
      if (obj["color"], obj["shape"]) == target:
        obj["shape"] = _other_shape(rng, target[1])
    question = f"Which picture has a {target[0]} {target[1]}?"
  images = [_scene_image(rng, size, objects) for objects in scenes]
  return images, [(question, f"Picture {answer + 1}")], scenes


def _video_motion(rng: np.random.Generator, size: int) -> tuple[list, list, list]:
  """(frames, [(question, direction)], [[object]]): one shape crossing the frame in a straight line, 4, 6 or 8
  frames (even: whole temporal patches of 2). The object's "boxes" hold its box in every frame."""
  n = 2 * int(rng.integers(2, 5))
  direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
  color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  side = int(rng.integers(int(0.2 * size), int(0.3 * size) + 1))
  margin = _margin(size)
  far = size - margin - side  # the last top-left coordinate that keeps the shape inside
  across = int(rng.integers(margin, far + 1))
  # from near one edge to near the other: the motion spans at least half the frame, so any frame pair shows it
  path = np.round(np.linspace(margin, far, n)).astype(int)
  if direction in ("left", "up"):
    path = path[::-1]
  background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
  frames, boxes = [], []
  for p in path:
    x, y = (int(p), across) if direction in ("left", "right") else (across, int(p))
    box = [float(x), float(y), float(x + side), float(y + side)]
    image = Image.new("RGB", (size, size), background)
    _draw_objects(ImageDraw.Draw(image), [{"shape": shape, "color": color, "box": box}])
    frames.append(image)
    boxes.append(box)
  obj = {"shape": shape, "color": color, "direction": direction, "box": boxes[0], "boxes": boxes}
  return frames, [(f"Which way does the {color} {shape} move?", direction)], [obj]


def _text(rng: np.random.Generator) -> tuple[list, list, list]:
  kind = int(rng.integers(6))
  if kind == 0:
    a, b = (int(v) for v in rng.integers(0, 10, 2))
    qa = f"What is {a} plus {b}?", str(a + b)
  elif kind == 1:
    a, b = sorted(int(v) for v in rng.integers(0, 10, 2))[::-1]
    qa = f"What is {a} minus {b}?", str(a - b)
  elif kind == 2:
    pair = OPPOSITES[int(rng.integers(len(OPPOSITES)))]
    first = int(rng.integers(2))
    qa = f"What is the opposite of {pair[first]}?", pair[1 - first]
  elif kind == 3:
    k = int(rng.integers(0, 20))
    qa = f"What number comes after {k}?", str(k + 1)
  elif kind == 4:
    word = WORDS[int(rng.integers(len(WORDS)))]
    qa = f"How many letters are in the word {word}?", str(len(word))
  else:
    shape = ("triangle", "square")[int(rng.integers(2))]
    qa = f"How many sides does a {shape} have?", "3" if shape == "triangle" else "4"
  return [], [qa], []


def _make(split: str, index: int, seed: int, image_size: int | tuple[int, int], names: tuple[str, ...], cum: np.ndarray,
          task: str | None) -> dict[str, Any]:
  if split not in SPLIT_IDS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  if isinstance(image_size, tuple):  # a side drawn per record, from its own stream (the scenes stay the same)
    lo, hi = image_size
    if not MIN_IMAGE_SIZE <= lo <= hi:
      raise ValueError(f"image_size range must satisfy {MIN_IMAGE_SIZE} <= low <= high, got {image_size}")
    image_size = int(np.random.default_rng([seed, SPLIT_IDS[split], index, 1]).integers(lo, hi + 1))
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  # Always draw the task so a forced task sees the same scene stream as any other record.
  draw = rng.random()
  if task is None:
    task = names[min(int(np.searchsorted(cum, draw, side="right")), len(names) - 1)]
  elif task not in TASKS:
    raise ValueError(f"unknown shapes task {task!r}; known: {TASKS}")
  videos: list = []
  if task == "ocr":
    images, turns, objects = _ocr(rng, image_size)
  elif task == "multi_image":
    images, turns, objects = _multi_image(rng, image_size)
  elif task == "text":
    images, turns, objects = _text(rng)
  elif task == "video_motion":
    frames, turns, moving = _video_motion(rng, image_size)
    images, videos, objects = [], [frames], [moving]
  else:
    images, turns, objects = _single_image_task(task, rng, image_size)
  conversations = []
  for k, (question, answer) in enumerate(turns):
    # Images (videos) are introduced once, in the first user turn; follow-ups refer back to them.
    prefix = picture_prefix(len(images)) + video_prefix(len(videos)) if k == 0 else ""
    conversations.append({"from": "user", "value": prefix + question})
    conversations.append({"from": "assistant", "value": answer})
  record = {
    "id": f"shapes-{split}-{index:07d}",
    "task": task,
    "images": {f"img{k}": image for k, image in enumerate(images)},
    "conversations": conversations,
    "objects": objects,
  }
  if videos:  # only video records carry the key: every other record stays as it was
    record["videos"] = {f"vid{k}": frames for k, frames in enumerate(videos)}
  return record


def generate(split: str, index: int, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
             mix: Mapping[str, float] | Sequence[str] | None = None, task: str | None = None) -> dict[str, Any]:
  """Record `index` of `split`: {"id", "task", "images": {name: PIL RGB}, "conversations", "objects"}, and for the
  video task "videos": {name: [PIL RGB frames]}.

  `mix` weights the tasks (a dict, or a list of names for equal weights; default DEFAULT_MIX); `task` forces one.
  `objects` holds one list per image, then one per video, of {"shape", "color", "box": [x1, y1, x2, y2] pixels}
  (OCR words appear as shape "text" with an extra "text" key; a video's object has its "direction" and "boxes", one
  per frame, "box" being the first).
  """
  names, cum = resolve_mix(mix)
  return _make(split, int(index), int(seed), int(image_size), names, cum, task)


class ShapesSource:
  """Random-access data source (Grain `RandomAccessDataSource` protocol) over `generate`."""

  def __init__(self, split: str = "train", num_records: int | None = None, seed: int = 0,
               image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
               mix: Mapping[str, float] | Sequence[str] | None = None):
    if split not in SPLIT_IDS:
      raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    self.split = split
    self.num_records = SPLIT_SIZES[split] if num_records is None else int(num_records)
    self.seed = int(seed)
    # one side for every image, or a (low, high) range: each record draws its side (any-resolution families)
    self.image_size = tuple(int(x) for x in image_size) if isinstance(image_size, (tuple, list)) else int(image_size)
    self.mix = dict(mix) if isinstance(mix, Mapping) else (tuple(mix) if mix is not None else None)
    self._names, self._cum = resolve_mix(self.mix)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += self.num_records
    if not 0 <= index < self.num_records:
      raise IndexError(f"index {index} out of range for {self!r}")
    return _make(self.split, index, self.seed, self.image_size, self._names, self._cum, None)

  def __repr__(self) -> str:
    return (f"ShapesSource(split={self.split!r}, num_records={self.num_records}, seed={self.seed}, "
            f"image_size={self.image_size}, mix={self.mix!r})")


def text_corpus(num_records: int = 4000, seed: int = 0, mix=None, drop=r"<img>.*?</img>") -> Iterator[str]:
  """Every text of the first `num_records` training records (of the task `mix`; matches of `drop` removed) plus
  the ChatML scaffolding, to train the demo's tokenizers. Images are drawn too (cheap at this size)."""
  from qwenvl_jax.data.conversation import DEFAULT_SYSTEM

  yield from ("system", "user", "assistant", DEFAULT_SYSTEM, "Picture 1: ", "Picture 2: ", "Video 1: ")
  for i in range(num_records):
    for turn in generate("train", i, seed=seed, image_size=MIN_IMAGE_SIZE, mix=mix)["conversations"]:
      yield re.sub(drop, "", turn["value"])


def train_tokenizer(model_prefix: str, vocab_size: int = 1024, image_span: int = 16, num_records: int = 4000,
                    seed: int = 0):
  """The embedded default tokenizer: SentencePiece trained on the shapes texts, saved as `{model_prefix}.model`."""
  from qwenvl_jax.data.tokenizer import train_sentencepiece

  return train_sentencepiece(text_corpus(num_records, seed), model_prefix, vocab_size=vocab_size,
                             image_span=image_span)


def train_tokenizer_json(path: str, vocab_size: int = 1024, num_records: int = 4000, seed: int = 0):
  """The embedded default tokenizer of the placeholder families (Qwen2-VL): a Qwen2-style tokenizer.json
  (`hf_tokenizer.train_tokenizer_json`) trained on the shapes texts of every task, videos included, without the
  media references and grounding tags (those become special tokens)."""
  from qwenvl_jax.data.hf_tokenizer import HFTokenizer
  from qwenvl_jax.data.hf_tokenizer import train_tokenizer_json as train

  texts = text_corpus(num_records, seed, mix=TASKS, drop=r"<img>.*?</img>|<video>.*?</video>|</?ref>|</?box>")
  return HFTokenizer(train(texts, path, vocab_size))

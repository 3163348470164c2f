"""The synthetic shapes dataset (qwenvl_jax.data.shapes); its TFDS builder and the adapters: test_tfds_sources.py."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from shapes_records import image_array, same_record

from qwenvl_jax.data import shapes
from qwenvl_jax.data.boxes import box_text, normalize_box, parse_boxes, parse_ref_boxes

IMG_TAG_RE = re.compile(r"<img>(.*?)</img>")


def _turns(record: dict) -> list[tuple[str, str]]:
  conv = record["conversations"]
  assert len(conv) % 2 == 0 and len(conv) >= 2
  assert [t["from"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
  return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]


def _question(text: str, num_images: int, num_videos: int = 0) -> str:
  prefix = shapes.picture_prefix(num_images) + shapes.video_prefix(num_videos)
  assert text.startswith(prefix)
  return text[len(prefix):]


def _find(objects: list[dict], color: str, shape: str | None = None) -> dict:
  found = [o for o in objects if o["color"] == color and (shape is None or o["shape"] == shape)]
  assert len(found) == 1, (color, shape, objects)
  return found[0]


def _check_vqa(question: str, answer: str, objects: list[dict]) -> None:
  """Assert that a VQA answer is what the objects say."""
  if m := re.fullmatch(r"What color is the (\w+)\?", question):
    (obj,) = [o for o in objects if o["shape"] == m.group(1)]
    assert answer == obj["color"]
  elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
    assert answer == _find(objects, m.group(1))["shape"]
  elif question == "How many shapes are there?":
    assert answer == str(len(objects))
  elif m := re.fullmatch(r"How many (\w+)s are there\?", question):
    assert m.group(1) in shapes.SHAPES
    assert answer == str(sum(o["shape"] == m.group(1) for o in objects))
  elif m := re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", question):
    a, b = _find(objects, m.group(1), m.group(2)), _find(objects, m.group(3), m.group(4))
    # Objects never share x-range, so comparing box edges is unambiguous.
    assert answer == ("left" if a["box"][2] <= b["box"][0] else "right")
    assert a["box"][2] <= b["box"][0] or b["box"][2] <= a["box"][0]
  else:
    raise AssertionError(f"unexpected VQA question {question!r}")


def _check_text(question: str, answer: str) -> None:
  if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", question):
    assert answer == str(int(m.group(1)) + int(m.group(2)))
  elif m := re.fullmatch(r"What is (\d+) minus (\d+)\?", question):
    assert answer == str(int(m.group(1)) - int(m.group(2))) and int(answer) >= 0
  elif m := re.fullmatch(r"What is the opposite of (\w+)\?", question):
    assert (m.group(1), answer) in shapes.OPPOSITES or (answer, m.group(1)) in shapes.OPPOSITES
  elif m := re.fullmatch(r"What number comes after (\d+)\?", question):
    assert answer == str(int(m.group(1)) + 1)
  elif m := re.fullmatch(r"How many letters are in the word (\w+)\?", question):
    assert answer == str(len(m.group(1)))
  elif m := re.fullmatch(r"How many sides does a (\w+) have\?", question):
    assert answer == {"triangle": "3", "square": "4"}[m.group(1)]
  else:
    raise AssertionError(f"unexpected text question {question!r}")


def _check_record(record: dict, image_size: int = shapes.DEFAULT_IMAGE_SIZE) -> None:
  """Format and answer consistency of one record, whatever its task."""
  task, images, objects = record["task"], record["images"], record["objects"]
  videos = record.get("videos", {})
  assert task in shapes.TASKS and ("videos" in record) == (task in shapes.VIDEO_TASKS)
  assert re.fullmatch(r"shapes-(train|validation|test)-\d{7}", record["id"])
  turns = _turns(record)
  # The <img> references of the first user turn are exactly the image keys, in order; later turns name none.
  assert IMG_TAG_RE.findall(turns[0][0]) == list(images)
  assert all(not IMG_TAG_RE.findall(q) for q, _ in turns[1:])
  assert len(objects) == len(images) + len(videos)  # one list per image, then per video
  for image, objs in zip(images.values(), objects):
    assert image.mode == "RGB" and image.size == (image_size, image_size)
    for obj in objs:
      x1, y1, x2, y2 = obj["box"]
      assert all(isinstance(v, float) for v in obj["box"])
      assert 0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size
  for question, answer in turns:
    assert answer and "\n" not in answer
  question, answer = _question(turns[0][0], len(images), len(videos)), turns[0][1]
  if task == "video_motion":
    assert images == {} and list(videos) == ["vid0"] and len(turns) == 1
    frames, (obj,) = videos["vid0"], objects[0]
    assert len(frames) in (4, 6, 8) and len(obj["boxes"]) == len(frames)
    assert all(f.mode == "RGB" and f.size == (image_size, image_size) for f in frames)
    assert question == f"Which way does the {obj['color']} {obj['shape']} move?" and answer == obj["direction"]
    # the painted pixels move the way the answer says, in a straight line
    centres = []
    for frame in frames:
      ys, xs = np.nonzero(np.all(image_array(frame) == shapes.COLORS[obj["color"]], axis=-1))
      centres.append((xs.mean(), ys.mean()))
    dx, dy = np.diff(np.asarray(centres), axis=0).T
    moved = {"left": (dx < 0) & (abs(dy) < 1e-6), "right": (dx > 0) & (abs(dy) < 1e-6),
             "up": (dy < 0) & (abs(dx) < 1e-6), "down": (dy > 0) & (abs(dx) < 1e-6)}[answer]
    assert moved.all(), (answer, centres)
  elif task.startswith("vqa_"):
    assert len(images) == 1 and " " not in answer
    for k, (q, a) in enumerate(turns):
      _check_vqa(q if k else question, a, objects[0])
  elif task == "caption":
    assert question == "Describe the image."
    # Left to right, with the fixed "a/an <color> <shape>" template.
    xs = [o["box"][0] for o in objects[0]]
    assert xs == sorted(xs)
    phrases = [f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['shape']}" for o in objects[0]]
    expected = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    assert answer == expected + "."
  elif task == "grounding":
    m = re.fullmatch(r"<ref>the (\w+) (\w+)</ref>", question)
    assert m, question
    obj = _find(objects[0], m.group(1), m.group(2))
    assert answer == box_text(normalize_box(obj["box"], image_size, image_size))
    assert parse_boxes(answer) == [normalize_box(obj["box"], image_size, image_size)]
  elif task == "grounded_caption":
    assert question == "Describe the image with boxes."
    pairs = parse_ref_boxes(answer)
    assert len(pairs) == len(objects[0])
    for (phrase, box), obj in zip(pairs, objects[0]):
      assert phrase.endswith(f" {obj['color']} {obj['shape']}")
      assert box == normalize_box(obj["box"], image_size, image_size)
  elif task == "ocr":
    assert question == "What does the text say?"
    (text_obj,) = [o for o in objects[0] if o["shape"] == "text"]
    assert answer == text_obj["text"] and answer in shapes.WORDS
  elif task == "multi_image":
    assert len(images) == 2 and list(images) == ["img0", "img1"]
    assert answer in ("Picture 1", "Picture 2")
    k = int(answer[-1]) - 1
    if question == "Which picture has more shapes?":
      assert len(objects[k]) > len(objects[1 - k])
    else:
      m = re.fullmatch(r"Which picture has an? (\w+) (\w+)\?", question)
      assert m, question
      has = [any((o["color"], o["shape"]) == m.groups() for o in objs) for objs in objects]
      assert has[k] and not has[1 - k]
  else:
    assert task == "text"
    assert images == {} and objects == [] and "<img>" not in turns[0][0]
    _check_text(question, answer)


@pytest.fixture(scope="module")
def default_records() -> list[dict]:
  return [shapes.generate("train", i) for i in range(300)]


def test_mix_constants():
  assert set(shapes.DEFAULT_MIX) == set(shapes.TASKS)
  # the video task is opt-in: the default mix (and every record it draws) is what it was without it
  assert all(shapes.DEFAULT_MIX[t] == 0 for t in shapes.VIDEO_TASKS) and shapes.TASKS[-1] == "video_motion"
  assert abs(sum(shapes.DEFAULT_MIX.values()) - 1.0) < 1e-9
  assert shapes.SPLIT_SIZES == {"train": 20000, "validation": 500, "test": 500}
  assert len(shapes.WORDS) == len(set(shapes.WORDS)) >= 50
  assert all(3 <= len(w) <= 5 and w.islower() for w in shapes.WORDS)


def test_deterministic():
  for task in shapes.TASKS:
    a = shapes.generate("train", 7, seed=3, task=task)
    b = shapes.generate("train", 7, seed=3, task=task)
    assert same_record(a, b)
  for i in range(20):
    assert same_record(shapes.generate("validation", i), shapes.generate("validation", i))


def test_splits_and_seeds_differ():
  def fingerprint(record):
    pixels = tuple(image_array(im).tobytes() for im in record["images"].values())
    return record["task"], str(record["conversations"]), pixels

  base = [fingerprint(shapes.generate("train", i)) for i in range(30)]
  for other in ([fingerprint(shapes.generate("validation", i)) for i in range(30)],
                [fingerprint(shapes.generate("test", i)) for i in range(30)],
                [fingerprint(shapes.generate("train", i, seed=1)) for i in range(30)]):
    # Text-only records can coincide by chance ("What is 2 plus 2?"), whole streams must not.
    assert sum(a == b for a, b in zip(base, other)) <= 2
  assert shapes.generate("test", 3)["id"] == "shapes-test-0000003"


def test_default_mix_covers_every_task_and_records_are_consistent(default_records):
  counts = {task: 0 for task in shapes.TASKS if shapes.DEFAULT_MIX[task] > 0}
  multi_turn = 0
  for record in default_records:
    _check_record(record)
    counts[record["task"]] += 1
    multi_turn += len(record["conversations"]) > 2
  assert all(n > 0 for n in counts.values()), counts
  assert multi_turn > 0


@pytest.mark.parametrize("task", shapes.TASKS)
def test_forced_task_answers(task):
  for i in range(40):
    record = shapes.generate("train", i, task=task)
    assert record["task"] == task
    _check_record(record)


def test_pixels_match_boxes():
  """Every shape's painted pixels fill its box (to a pixel for the triangle apex) and stay inside it."""
  checked = 0
  for i in range(60):
    record = shapes.generate("validation", i)
    for image, objs in zip(record["images"].values(), record["objects"]):
      arr = image_array(image)
      for obj in objs:
        if obj["shape"] == "text":
          continue
        mask = np.all(arr == np.array(shapes.COLORS[obj["color"]], np.uint8), axis=-1)
        ys, xs = np.nonzero(mask)
        x1, y1, x2, y2 = (int(v) for v in obj["box"])
        assert xs.min() >= x1 and xs.max() <= x2 - 1 and ys.min() >= y1 and ys.max() <= y2 - 1
        assert xs.min() <= x1 + 1 and xs.max() >= x2 - 2 and ys.min() <= y1 + 1 and ys.max() >= y2 - 2
        checked += 1
  assert checked > 60


def test_ocr_images_show_the_text():
  for i in range(30):
    record = shapes.generate("train", i, task="ocr")
    arr = image_array(record["images"]["img0"]).astype(np.int32)
    (text_obj,) = [o for o in record["objects"][0] if o["shape"] == "text"]
    fill = 255 if text_obj["color"] == "white" else 0
    ink = np.all(arr == fill, axis=-1)
    x1, y1, x2, y2 = (int(v) for v in text_obj["box"])
    inside = ink[y1:y2, x1:x2].sum()
    # Solid glyph pixels cover a good part of the word's box, and appear nowhere else.
    assert inside >= 0.08 * (x2 - x1) * (y2 - y1), (i, inside)
    assert ink.sum() == inside
    # Large and high contrast: the word is at least a fifth of the image wide and ink differs from the background.
    assert x2 - x1 >= 0.2 * shapes.DEFAULT_IMAGE_SIZE
    background = arr[0, 0] if not (x1 == 0 and y1 == 0) else arr[-1, -1]
    assert np.abs(background - fill).max() >= 150


def test_text_and_multi_image_records():
  answers = set()
  for i in range(30):
    text = shapes.generate("train", i, task="text")
    assert text["images"] == {} and text["objects"] == []
    record = shapes.generate("train", i, task="multi_image")
    assert list(record["images"]) == ["img0", "img1"] == IMG_TAG_RE.findall(record["conversations"][0]["value"])
    assert record["conversations"][0]["value"].startswith("Picture 1: <img>img0</img>\nPicture 2: <img>img1</img>\n")
    answers.add(record["conversations"][1]["value"])
  assert answers == {"Picture 1", "Picture 2"}


def test_image_size_parameter():
  for i in range(20):
    _check_record(shapes.generate("train", i, image_size=448), image_size=448)
    _check_record(shapes.generate("train", i, image_size=48), image_size=48)
  with pytest.raises(ValueError):
    shapes.generate("train", 0, image_size=16)
  with pytest.raises(ValueError):
    shapes.generate("dev", 0)
  with pytest.raises(ValueError):
    shapes.generate("train", 0, mix={"nope": 1.0})


def test_shapes_source():
  source = shapes.ShapesSource("validation")
  assert len(source) == shapes.VALIDATION_SIZE
  assert len(shapes.ShapesSource("train")) == shapes.TRAIN_SIZE
  assert same_record(source[5], shapes.generate("validation", 5))
  assert source[-1]["id"] == "shapes-validation-0000499"
  assert source[np.int64(2)]["id"] == "shapes-validation-0000002"
  with pytest.raises(IndexError):
    source[500]
  assert "ShapesSource(split='validation'" in repr(source)
  small = shapes.ShapesSource("test", 10, seed=4, image_size=64, mix=["ocr", "grounding"])
  assert len(small) == 10
  assert {small[i]["task"] for i in range(10)} <= {"ocr", "grounding"}
  assert same_record(small[3], shapes.generate("test", 3, seed=4, image_size=64, mix=["grounding", "ocr"]))
  only = shapes.ShapesSource("train", 5, mix={"caption": 2.0, "text": 0.0})
  assert {only[i]["task"] for i in range(5)} == {"caption"}


def test_shapes_source_in_grain():
  import grain
  dataset = grain.MapDataset.source(shapes.ShapesSource("test", 8)).shuffle(seed=0)
  ids = sorted(dataset[i]["id"] for i in range(len(dataset)))
  assert ids == [f"shapes-test-{i:07d}" for i in range(8)]


def test_generation_speed():
  shapes.generate("train", 0)  # warm the font cache
  start = time.perf_counter()
  for i in range(200):
    shapes.generate("train", i)
  ms = (time.perf_counter() - start) / 200 * 1000
  print(f"shapes.generate: {ms:.3f} ms/record at 112 px")
  # The budget is 5 ms; the bound is loose for loaded CI machines.
  assert ms < 20

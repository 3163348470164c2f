"""The Qwen-VL paper's benchmarks in the data formats of the official evaluation (QwenLM/Qwen-VL `eval_mm`).

Each benchmark reads its official file into `Example`s, gives the prompt of the base model (the eval_mm scripts'
own) and of the chat model, the generation length, and scores predictions with the official metric
(qwenvl_jax/evals/metrics.py):

  benchmark                      file (eval_mm's converted files)                       metric
  flickr30k, nocaps              COCO caption JSON {images: [{id, image}], annotations}  CIDEr
  vqav2, okvqa, textvqa, vizwiz  JSONL {question_id, image, question} + the 10 answers   VQA accuracy
                                 (--annotations: the official *_annotations.json, or an
                                 `answers` / list `answer` in each record)
  docvqa, infovqa                JSONL, `answer` a list (or --annotations val_v1.0.json)  ANLS
  chartqa                        JSONL {question_id, image, question, answer}             relaxed accuracy
  gqa, ocrvqa, ai2d              JSONL {question_id, image, question, answer}             exact match
  refcoco, refcoco+, refcocog    JSONL {image, sent, bbox (x1,y1,x2,y2 px), width, height} accuracy at IoU 0.5
  scienceqa_img                  JSONL {image, hint, question, choices, answer (index)}   accuracy (ranked choices)

Base prompts (eval_mm): captions '<img>{}</img>Describe the image in English:', VQA '<img>{}</img>{} Answer:',
RefCOCO '<img>{}</img><ref>{}</ref><box>', ScienceQA '<img>{}</img>Context: {}\\nQuestion: {}\\nOptions: {}\\nAnswer:'
with the choices ranked by the mean loss of ' A', ' B', ... after it. The Qwen-VL repository publishes no evaluation
script for the chat model; the chat prompts here are this project's: the ChatML chat prompt (default system prompt,
`Picture 1: <img>..</img>\\n` before the text) with the instructions in `CHAT_*` below, ScienceQA's letters ranked as
the start of the answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from qwenvl_jax.evals import metrics as M

log = logging.getLogger("qwenvl_jax.evals")

CHOICE_LETTERS = "ABCDE"  # eval_mm's multiple_choices
BASE_CAPTION = "<img>{}</img>Describe the image in English:"
BASE_VQA = "<img>{}</img>{} Answer:"
BASE_REF = "<img>{}</img><ref>{}</ref><box>"
BASE_MC = "<img>{}</img>Context: {}\nQuestion: {}\nOptions: {}\nAnswer:"
CHAT_CAPTION = "Describe the image in English in one sentence."
CHAT_VQA = "{}\nAnswer the question using a single word or phrase."
CHAT_REF = "Give the bounding box of <ref>{}</ref>."
CHAT_MC = "Context: {}\nQuestion: {}\nOptions: {}\nAnswer with the option's letter from the given choices directly."
WARN_CAP = 20  # warnings per file; the rest are counted


class BenchmarkFileError(ValueError):
  """A benchmark file that is not in its benchmark's format at all (or a bad record under --strict)."""


@dataclasses.dataclass
class Example:
  """One question of a benchmark: `image` as the file writes it; `base` the base model's whole prompt text, `chat`
  the chat model's question (the image line goes before it); `ref` what the metric needs; `choices` the ranked
  continuations of a multiple-choice question (else None: generated)."""
  id: str
  image: str
  base: str
  chat: str
  ref: Any
  choices: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  fmt: str              # 'caption', 'vqa', 'refcoco', 'mc'
  metric: str           # 'cider', 'vqa_accuracy', 'anls', 'relaxed_accuracy', 'accuracy', 'acc@0.5'
  max_new_tokens: int   # eval_mm's
  needs_annotators: bool = False  # VQA accuracy: the human answers of each question
  postprocess: Callable[[str], str] | None = None  # applied to a prediction before scoring (GQA)


BENCHMARKS = {b.name: b for b in [
  Benchmark("flickr30k", "caption", "cider", 30),
  Benchmark("nocaps", "caption", "cider", 30),
  Benchmark("vqav2", "vqa", "vqa_accuracy", 10, needs_annotators=True),
  Benchmark("okvqa", "vqa", "vqa_accuracy", 10, needs_annotators=True),
  Benchmark("textvqa", "vqa", "vqa_accuracy", 10, needs_annotators=True),
  Benchmark("vizwiz", "vqa", "vqa_accuracy", 10, needs_annotators=True),
  Benchmark("docvqa", "vqa", "anls", 100),
  Benchmark("infovqa", "vqa", "anls", 100),
  Benchmark("chartqa", "vqa", "relaxed_accuracy", 100),
  Benchmark("gqa", "vqa", "accuracy", 10, postprocess=M.gqa_answer),
  Benchmark("ocrvqa", "vqa", "accuracy", 100),
  Benchmark("ai2d", "vqa", "accuracy", 10),
  Benchmark("refcoco", "refcoco", "acc@0.5", 28),
  Benchmark("refcoco+", "refcoco", "acc@0.5", 28),
  Benchmark("refcocog", "refcoco", "acc@0.5", 28),
  Benchmark("scienceqa_img", "mc", "accuracy", 1),
]}


def get(name: str) -> Benchmark:
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}")
  return BENCHMARKS[name]


# --- reading the official files ------------------------------------------------------------------------------------

class _Problems:
  """Bad records: skipped with a warning naming each (the first WARN_CAP per file), counted; --strict: an error."""

  def __init__(self, path: str, strict: bool):
    self.path, self.strict, self.count = path, strict, 0

  def __call__(self, where: str, why: str):
    msg = f"{self.path}:{where}: {why}"
    if self.strict:
      raise BenchmarkFileError(f"{msg} (--strict)")
    self.count += 1
    if self.count <= WARN_CAP:
      log.warning("benchmark: skipping %s", msg)
    elif self.count == WARN_CAP + 1:
      log.warning("benchmark: more bad records in %s; counting them without warnings", self.path)


def _jsonl(path: str, problems: _Problems):
  """(line number, record dict) of a JSONL file; a line that is not a JSON object is a problem."""
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except (ValueError, RecursionError) as e:
        problems(f"{n}", f"not JSON ({str(e)[:80]})")
        continue
      if not isinstance(rec, dict):
        problems(f"{n}", f"a JSON {type(rec).__name__}, not an object")
        continue
      yield n, rec


def _text(rec: dict, key: str) -> str:
  v = rec.get(key)
  if not isinstance(v, str) or not v.strip():
    raise ValueError(f"no '{key}' text")
  return v


def _answers(value, key: str = "answer") -> list:
  """An answer field: a string or a non-empty list of strings (or VQA answer entries) -> list."""
  if isinstance(value, str):
    return [value]
  if isinstance(value, list) and value and all(isinstance(a, str) or (isinstance(a, dict) and isinstance(
      a.get("answer"), str)) for a in value):
    return value
  raise ValueError(f"no reference '{key}' (a string or a list of strings)")


def _load_annotations(path: str) -> dict:
  """question id -> answers from the official annotation files: VQA's {annotations: [{question_id, answers}]} or
  DocVQA/InfographicVQA's {data: [{questionId, answers}]}."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise BenchmarkFileError(f"--annotations {path}: cannot read it as JSON ({str(e)[:120]})") from None
  out = {}
  if isinstance(data, dict) and isinstance(data.get("annotations"), list):
    for a in data["annotations"]:
      if isinstance(a, dict) and "question_id" in a and isinstance(a.get("answers"), list):
        out[str(a["question_id"])] = a["answers"]
  elif isinstance(data, dict) and isinstance(data.get("data"), list):
    for a in data["data"]:
      if isinstance(a, dict) and "questionId" in a and isinstance(a.get("answers"), list):
        out[str(a["questionId"])] = a["answers"]
  if not out:
    raise BenchmarkFileError(f"--annotations {path}: no answers in it (expected VQA's {{'annotations': [{{"
                             f"'question_id', 'answers'}}]}} or DocVQA's {{'data': [{{'questionId', 'answers'}}]}})")
  return out


def _unique(rec: dict, key: str, line: int, seen: set) -> str:
  rid = str(rec[key]) if key in rec and isinstance(rec[key], (str, int)) else f"line{line}"
  if rid in seen:
    rid = f"{rid}@line{line}"
  seen.add(rid)
  return rid


def _read_vqa(bench: Benchmark, path: str, problems: _Problems, annotations: dict | None):
  seen: set = set()
  for n, rec in _jsonl(path, problems):
    try:
      image, question = _text(rec, "image"), _text(rec, "question")
      rid = _unique(rec, "question_id", n, seen)
      qid = str(rec.get("question_id"))
      if annotations is not None and qid in annotations:
        ref = _answers(annotations[qid], "answers")
      elif bench.needs_annotators:
        ref = _answers(rec.get("answers", rec.get("answer")), "answers")
        if len(ref) < 2:
          raise ValueError("one answer only: VQA accuracy needs the human answers (pass --annotations, the "
                           "official *_annotations.json)")
      else:
        ref = _answers(rec.get("answer"))
    except ValueError as e:
      problems(f"{n}", str(e))
      continue
    yield Example(rid, image, BASE_VQA.format(image, question), CHAT_VQA.format(question), ref)


def _read_refcoco(bench: Benchmark, path: str, problems: _Problems, annotations=None):
  for n, rec in _jsonl(path, problems):
    try:
      image, sent = _text(rec, "image"), _text(rec, "sent")
      box, w, h = rec.get("bbox"), rec.get("width"), rec.get("height")
      if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        raise ValueError("no reference 'bbox' [x1, y1, x2, y2]")
      if not (_number(w) and _number(h) and w > 0 and h > 0):
        raise ValueError("no image 'width' / 'height'")
    except ValueError as e:
      problems(f"{n}", str(e))
      continue
    ref = {"bbox": box, "width": w, "height": h}
    yield Example(f"line{n}", image, BASE_REF.format(image, sent), CHAT_REF.format(sent), ref)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e9


def _read_mc(bench: Benchmark, path: str, problems: _Problems, annotations=None):
  seen: set = set()
  for n, rec in _jsonl(path, problems):
    try:
      image, question = _text(rec, "image"), _text(rec, "question")
      choices, answer = rec.get("choices"), rec.get("answer")
      if not (isinstance(choices, list) and 2 <= len(choices) <= len(CHOICE_LETTERS)
              and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"no 'choices' (2 to {len(CHOICE_LETTERS)} strings)")
      if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
        raise ValueError("no reference 'answer' (the index of the right choice)")
    except ValueError as e:
      problems(f"{n}", str(e))
      continue
    hint = rec.get("hint") if isinstance(rec.get("hint"), str) and rec.get("hint") else "N/A"
    options = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    letters = list(CHOICE_LETTERS[:len(choices)])
    yield Example(_unique(rec, "question_id", n, seen), image, BASE_MC.format(image, hint, question, options),
                  CHAT_MC.format(hint, question, options), answer, choices=letters)


def _read_caption(bench: Benchmark, path: str, problems: _Problems, annotations=None):
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (ValueError, RecursionError) as e:
    raise BenchmarkFileError(f"{path}: not a COCO caption JSON file ({str(e)[:100]})") from None
  if not (isinstance(data, dict) and isinstance(data.get("images"), list)
          and isinstance(data.get("annotations"), list)):
    raise BenchmarkFileError(f"{path}: not a COCO caption file (expected {{'images': [{{'id', 'image'}}], "
                             f"'annotations': [{{'image_id', 'caption'}}]}})")
  captions: dict = {}
  for a in data["annotations"]:
    if isinstance(a, dict) and isinstance(a.get("caption"), str) and isinstance(a.get("image_id"), (int, str)):
      captions.setdefault(str(a["image_id"]), []).append(a["caption"])
  seen: set = set()
  for k, img in enumerate(data["images"]):
    where = f"images[{k}]"
    if not (isinstance(img, dict) and isinstance(img.get("id"), (int, str)) and isinstance(img.get("image"), str)):
      problems(where, "not an {'id', 'image'} entry")
      continue
    rid = str(img["id"])
    if rid in seen:
      problems(where, f"image id {rid} repeated")
      continue
    seen.add(rid)
    if not captions.get(rid):
      problems(where, f"no reference captions for image id {rid}")
      continue
    yield Example(rid, img["image"], BASE_CAPTION.format(img["image"]), CHAT_CAPTION, captions[rid])


_READERS = {"vqa": _read_vqa, "refcoco": _read_refcoco, "mc": _read_mc, "caption": _read_caption}
_EXPECTED = {
  "vqa": "JSONL lines {question_id, image, question, answer}",
  "refcoco": "JSONL lines {image, sent, bbox, width, height}",
  "mc": "JSONL lines {image, hint, question, choices, answer}",
  "caption": "a COCO caption JSON {images, annotations}",
}


def resolve_image(image: str, images_dir: str | None) -> str | None:
  """The file of a record's image: as written (absolute, or relative to `images_dir`, the folder the official files'
  paths start from), else its file name directly in `images_dir`; None when neither exists."""
  candidates = [image] if os.path.isabs(image) or not images_dir else [os.path.join(images_dir, image)]
  if images_dir:
    candidates.append(os.path.join(images_dir, os.path.basename(image)))
  return next((c for c in candidates if os.path.isfile(c)), None)


def read(bench: Benchmark, path: str, images_dir: str | None = None, annotations: str | None = None,
         strict: bool = False) -> tuple[list[Example], dict, int]:
  """The benchmark file -> (examples, {example id: image file}, records skipped). A record in the wrong format,
  without references, or whose image is missing is skipped with a warning naming it (file:line) and counted, or
  with `strict` ends the run with a BenchmarkFileError; a file with no usable record is a BenchmarkFileError."""
  if not os.path.isfile(path):
    raise BenchmarkFileError(f"--data {path}: no such file")
  ann = _load_annotations(annotations) if annotations else None
  if bench.needs_annotators and ann is None:
    log.info("benchmark %s: no --annotations; the answers come from the records", bench.name)
  problems = _Problems(path, strict)
  examples, files = [], {}
  try:
    for ex in _READERS[bench.fmt](bench, path, problems, ann):
      image = resolve_image(ex.image, images_dir)
      if image is None:
        problems(f"id {ex.id}", f"image {ex.image} not found" + (f" under {images_dir}" if images_dir else ""))
        continue
      examples.append(ex)
      files[ex.id] = image
  except UnicodeDecodeError as e:
    raise BenchmarkFileError(f"{path}: not UTF-8 text ({e.reason})") from None
  if not examples:
    raise BenchmarkFileError(f"{path}: no usable {bench.name} record in it ({problems.count} skipped, see the "
                             f"warnings; the format is {_EXPECTED[bench.fmt]})")
  return examples, files, problems.count


# --- scoring -------------------------------------------------------------------------------------------------------

def score(bench: Benchmark, predictions: list[dict]) -> dict:
  """predictions [{'id', 'prediction', 'ref'}] -> {metric: value on its official scale, 'score': the paper's scale
  (x 100), 'n'}."""
  post = bench.postprocess or (lambda s: s)
  preds = [(post(p["prediction"]) if isinstance(p["prediction"], str) else p["prediction"], p["ref"])
           for p in predictions]
  if bench.metric == "cider":
    value = M.coco_cider({i: p for i, (p, _) in enumerate(preds)}, {i: r for i, (_, r) in enumerate(preds)})
  elif bench.metric == "vqa_accuracy":
    value = M.mean(M.vqa_accuracy(p, r) for p, r in preds)
  elif bench.metric == "anls":
    value = M.mean(M.anls(p, [a if isinstance(a, str) else a["answer"] for a in r]) for p, r in preds)
  elif bench.metric == "relaxed_accuracy":
    value = M.mean(M.chartqa_accuracy(p, r) for p, r in preds)
  elif bench.metric == "acc@0.5":
    value = M.mean(M.refcoco_hit(p, r["bbox"], r["width"], r["height"]) for p, r in preds)
  elif bench.fmt == "mc":
    value = M.mean(float(p == r) for p, r in preds)
  else:
    value = M.mean(M.exact_match(p, [a if isinstance(a, str) else a["answer"] for a in r]) for p, r in preds)
  return {bench.metric: value, "score": 100 * value, "n": len(preds)}

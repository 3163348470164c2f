"""Metrics as the official evaluation scripts compute them.

  * VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz): the official VQA evaluator (`vqaEval.py`, as Qwen-VL's
    eval_mm/vqa_eval.py carries it): the prediction goes through the punctuation and digit/article/contraction
    processing, the 10 human answers through the punctuation processing when they are not all the same, and the
    accuracy is the average over the annotators of min(1, matches among the other nine / 3).
  * ANLS (DocVQA, InfographicVQA): the official `infographicsvqa_eval.py`, threshold 0.5.
  * ChartQA relaxed accuracy: pix2struct's `relaxed_correctness` (5% numeric tolerance), called as eval_mm does.
  * Exact match (GQA, OCR-VQA, AI2D): case-insensitive equality after strip; GQA answers are first cut down as
    evaluate_vqa.py does (`gqa_answer`).
  * RefCOCO/+/g accuracy at IoU >= 0.5 with the official box parsing and scaling (`refcoco_box`, `refcoco_hit`).
  * Captioning CIDEr (-D): pycocoevalcap, with its PTB tokenizer (Java) when `java` runs, else `_caption_tokens`.
  * Grounding and single-reference answers of this project's own data (shapes, the finetune JSONL): `grounding_hit`
    and `answer_match`.
"""

from __future__ import annotations

import logging
import math
import re
import shutil

import numpy as np

from qwenvl_jax.data.boxes import valid_box

log = logging.getLogger("qwenvl_jax.evals")

# --- VQA: the official answer processing ---------------------------------------------------------------------------

# The official contraction map, entry for entry: keys with capitals ("Im", "Ive", "Id've") never match (words are
# lower-cased first), "somebody'd" maps to "somebodyd"; kept as they are because they decide what matches.
_CONTRACTIONS = {
  "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
  "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
  "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
  "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
  "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
  "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
  "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
  "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
  "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
  "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
  "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
  "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
  "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
  "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
  "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
  "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
  "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
  "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
  "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
  "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
  "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
  "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
  "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
  "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
  "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern, its slip included: "(?!<=\d)" is a look-ahead for the text "<=digit", not a look-behind, so a
# period is dropped unless a digit (or "<=digit") follows it ("3.5" keeps its period, "5." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is periodStrip.sub('', text, re.UNICODE): re.UNICODE lands in `count`, so at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)


def vqa_punctuation(text: str) -> str:
  """The official processPunctuation: each mark is deleted when the text has it next to a space, or when it has a
  digit-comma-digit anywhere (then every mark is deleted); otherwise it becomes a space. Then the periods go."""
  out = text
  digit_comma = _COMMA_STRIP.search(text) is not None
  for p in _PUNCT:  # the conditions look at the original text, the replacements at the running one
    if (p + " " in text or " " + p in text) or digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, _PERIOD_COUNT)


def vqa_digit_article(text: str) -> str:
  """The official processDigitArticle: lower case, number words 'none'..'ten' -> digits, articles dropped, then the
  contraction map."""
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
  """A prediction as the official VQA evaluator compares it: newlines and tabs to spaces, strip, punctuation, then
  digits/articles/contractions (lower-cased)."""
  s = answer.replace("\n", " ").replace("\t", " ").strip()
  return vqa_digit_article(vqa_punctuation(s))


def vqa_accuracy(prediction: str, answers: list) -> float:
  """The official VQA accuracy of one prediction against the human answers of its question (10 in VQAv2).

  answers: strings, or the annotation file's answer entries ({'answer', 'answer_id', ...}). Each annotator in turn
  is left out and the prediction scores min(1, matches among the others / 3); the score is the average. As the
  official evaluator, the answers are only punctuation-processed (and only when they are not all the same), and an
  annotator is left out by comparing whole entries, so entries that are identical dicts leave together. With one
  answer the score is 0 (no other annotator): single-reference data is scored with `answer_match`.
  """
  pred = normalize_vqa_answer(prediction)
  entries = [a if isinstance(a, dict) else {"answer": a, "_annotator": i} for i, a in enumerate(answers)]
  if not entries:
    return 0.0
  texts = [e["answer"] for e in entries]
  if len(set(texts)) > 1:
    entries = [{**e, "answer": vqa_punctuation(e["answer"])} for e in entries]
  accs = []
  for left_out in entries:
    matches = sum(1 for e in entries if e != left_out and e["answer"] == pred)
    accs.append(min(1.0, matches / 3))
  return sum(accs) / len(accs)


def answer_match(prediction: str, reference: str) -> float:
  """1 if the prediction and one reference answer agree after the VQA answer processing (both sides), else 0: the
  accuracy of this project's single-reference data (shapes, the finetune JSONL), where there are no annotators to
  average over."""
  return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(reference))


# --- documents, charts, exact match --------------------------------------------------------------------------------

def _levenshtein(a: str, b: str) -> int:
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: list[str], tau: float = 0.5) -> float:
  """ANLS of one prediction as the official DocVQA/InfographicVQA script scores a question: the edit distance of the
  lower-cased, whitespace-collapsed strings over the longer of the two raw strings (as written, upper-cased), the
  best reference taken, 1 - that; a result below `tau` counts 0 (so a normalised distance of exactly 0.5 keeps 0.5).
  No references: 0."""
  if not answers:
    return 0.0
  det = " ".join(prediction.strip().lower().split())
  values = []
  for a in answers:
    gt = " ".join(a.strip().lower().split())
    length = max(len(a.upper()), len(prediction.upper()))
    values.append(0.0 if length == 0 else _levenshtein(gt, det) / length)
  result = 1 - min(values)
  return 0.0 if result < tau else result


def exact_match(prediction: str, answers: list[str]) -> float:
  """1 if the prediction equals one of the answers after strip and lower case (evaluate_vqa.py's accuracy)."""
  p = prediction.strip().lower()
  return float(any(p == a.strip().lower() for a in answers))


def _chart_float(text: str) -> float | None:
  try:
    return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
  """pix2struct's relaxed correctness: numbers (a trailing % divides by 100) within `max_relative_change` of a
  non-zero target, anything else equal ignoring case."""
  p, t = _chart_float(prediction), _chart_float(target)
  if p is not None and t:
    return abs(p - t) / abs(t) <= max_relative_change
  return prediction.lower() == target.lower()


def chartqa_accuracy(prediction: str, annotations) -> float:
  """ChartQA relaxed accuracy of one answer, as evaluate_vqa.py calls it: relaxed_correctness(stripped prediction,
  annotation) -- the prediction in the target's place, so the 5% is relative to the prediction -- best over the
  annotations (a string is one annotation)."""
  annotations = [annotations] if isinstance(annotations, str) else list(annotations)
  return float(max(relaxed_correctness(prediction.strip(), a) for a in annotations)) if annotations else 0.0


def gqa_answer(response: str) -> str:
  """A GQA response cut down as evaluate_vqa.py does before exact match: the first sentence/clause, lower case,
  then the text after 'is ', 'are ', 'a ', 'an ', 'the ' and before ' of' (each where present, in that order)."""
  r = response.strip().split(".")[0].split(",")[0].split("!")[0].lower()
  for word in ("is ", "are ", "a ", "an ", "the "):
    if word in r:
      r = r.split(word)[1]
  if " of" in r:
    r = r.split(" of")[0]
  return r.strip()


# --- referring expressions -----------------------------------------------------------------------------------------

_REFCOCO_BOX = re.compile(r"\((.*?)\),\((.*?)\)")


def refcoco_box(answer: str) -> tuple[float, float, float, float]:
  """The first '(x1,y1),(x2,y2)' of a generated answer as evaluate_grounding.py reads it (floats, as written in
  [0, 999]); no such pair, or a corner that is not two numbers, is the box (0, 0, 0, 0), a miss."""
  found = _REFCOCO_BOX.findall(answer)
  try:
    if "," not in found[0][0] or "," not in found[0][1]:
      return (0.0, 0.0, 0.0, 0.0)
    x1, y1 = (float(v) for v in found[0][0].split(","))
    x2, y2 = (float(v) for v in found[0][1].split(","))
    return (x1, y1, x2, y2)
  except (IndexError, ValueError):
    return (0.0, 0.0, 0.0, 0.0)


def refcoco_iou(box, gt_bbox, width, height) -> float:
  """IoU of a predicted box (in [0, 999]) scaled to pixels as evaluate_grounding.py does (/ 999, x * width,
  y * height) against the pixel box gt_bbox (x1, y1, x2, y2), in float32 as its torch code (torchvision's box_area,
  no clamping of inverted corners); an empty union gives nan."""
  p = np.asarray(box, np.float32).reshape(4) / 999
  p[0::2] *= np.float32(width)
  p[1::2] *= np.float32(height)
  g = np.asarray(gt_bbox, np.float32).reshape(4)
  with np.errstate(divide="ignore", invalid="ignore"):
    area_p = (p[2] - p[0]) * (p[3] - p[1])
    area_g = (g[2] - g[0]) * (g[3] - g[1])
    wh = np.maximum(np.minimum(p[2:], g[2:]) - np.maximum(p[:2], g[:2]), np.float32(0))
    inter = wh[0] * wh[1]
    return float(inter / (area_p + area_g - inter))


def refcoco_hit(answer: str, gt_bbox, width, height, threshold: float = 0.5) -> float:
  """1 if the answer's box overlaps the reference pixel box with IoU >= 0.5 (evaluate_grounding.py's Precision@1)."""
  return float(refcoco_iou(refcoco_box(answer), gt_bbox, width, height) >= threshold)


def iou(a, b) -> float:
  ax1, ay1, ax2, ay2 = a
  bx1, by1, bx2, by2 = b
  iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
  ih = max(0.0, min(ay2, by2) - max(ay1, by1))
  inter = iw * ih
  union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
  return inter / union if union > 0 else 0.0


def grounding_hit(predicted_box, reference_box, threshold: float = 0.5) -> float:
  """1 if the predicted box (None = no box produced) overlaps the reference with IoU >= threshold. A predicted box
  outside [0, 1000) or with inverted corners is a miss (`boxes.valid_box`), never reordered into a hit."""
  return float(predicted_box is not None and valid_box(predicted_box) and
               iou(predicted_box, reference_box) >= threshold)


# --- captioning ----------------------------------------------------------------------------------------------------

def _caption_tokens(text: str) -> str:
  text = re.sub(r"<ref>|</ref>|<box>.*?</box>", " ", text.lower())
  return " ".join(re.findall(r"[a-z0-9']+", text))


def cider(predictions: dict, references: dict) -> float:
  """Corpus CIDEr-D (pycocoevalcap) of {id: caption} against {id: [reference captions]}, on lower-cased words with
  grounding tags and boxes dropped: the metric of this project's own captions (shapes)."""
  from pycocoevalcap.cider.cider import Cider

  if not predictions:
    return 0.0
  res = {k: [_caption_tokens(v)] for k, v in predictions.items()}
  gts = {k: [_caption_tokens(r) for r in references[k]] for k in predictions}
  score, _ = Cider().compute_score(gts, res)
  return float(score)


# The PTB tokenizer's punctuation tokens that COCO caption evaluation removes; its bracket tokens (-lrb- ...) stay,
# as they do there (they are listed upper-case and the tokenizer lower-cases).
_PTB_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_PTB_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|``|''|[a-z0-9]+(?:[.,:/-][a-z0-9]+)*(?=n't\b)|"
                        r"[a-z0-9]+(?:[.,:/-][a-z0-9]+)*|\S", re.IGNORECASE)
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def ptb_tokens_python(text: str) -> str:
  """A Python stand-in for the Stanford PTB tokenizer of COCO caption evaluation (used only when Java is missing):
  lower case, clitics ('s, n't ...) and punctuation split off, brackets as -lrb- etc., the punctuation tokens
  removed. It agrees with the Java tokenizer on ordinary captions; rare forms (abbreviations, URLs) may differ."""
  text = text.replace("\n", " ").lower().replace('"', " '' ")
  toks = [_PTB_BRACKETS.get(t, t) for t in _PTB_TOKEN.findall(text)]
  return " ".join(t for t in toks if t not in _PTB_PUNCT)


def _ptb_tokenize(captions: dict) -> dict:
  """{id: [caption]} -> {id: [tokenized caption]}: pycocoevalcap's PTBTokenizer (Java) when it runs, else
  `ptb_tokens_python` with a warning."""
  if shutil.which("java"):
    try:
      import contextlib
      import io

      from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
      with contextlib.redirect_stdout(io.StringIO()):
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
      if all(len(out.get(k, [])) == len(v) for k, v in captions.items()):
        return out
    except Exception as e:  # noqa: BLE001 - a broken Java or an unwritable package folder: fall back, say so
      log.warning("PTB tokenizer (Java) failed (%s); using the Python tokenization", " ".join(str(e).split())[:200])
  else:
    log.warning("no java on PATH: captions are tokenized in Python (ptb_tokens_python), not by the PTB tokenizer")
  return {k: [ptb_tokens_python(c) for c in v] for k, v in captions.items()}


def coco_cider(predictions: dict, references: dict) -> float:
  """CIDEr (-D) as COCOEvalCap computes it for the images that have a prediction: predictions {image_id: caption},
  references {image_id: [captions]}, both PTB-tokenized (Java; `ptb_tokens_python` without it), then
  pycocoevalcap's Cider. The value is on COCO's scale (papers report it x 100)."""
  from pycocoevalcap.cider.cider import Cider

  if not predictions:
    return 0.0
  ids = list(predictions)
  gts = _ptb_tokenize({k: list(references[k]) for k in ids})
  res = _ptb_tokenize({k: [predictions[k]] for k in ids})
  score, _ = Cider().compute_score(gts, res)
  return float(score)


def mean(values) -> float:
  values = list(values)
  return float(sum(values) / len(values)) if values else math.nan

"""Metrics: captioning CIDEr (pycocoevalcap), VQA accuracy with the VQAv2 answer normalisation, grounding accuracy at
IoU >= 0.5, OCR exact match and ANLS."""

from __future__ import annotations

import re

from qwenvl_jax.data.boxes import valid_box

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
                 "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
                 "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
                 "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
                 "youre": "you're", "im": "i'm", "ive": "i've", "lets": "let's", "its": "it's"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
  """VQAv2 evaluation normalisation: lower case, punctuation, number words -> digits, articles, contractions."""
  s = answer.replace("\n", " ").replace("\t", " ").strip().lower()
  for p in _PUNCT:  # punctuation next to a space or a digit comma is dropped, elsewhere it separates words
    if (p + " " in s or " " + p in s) or _COMMA_BETWEEN_DIGITS.search(s):
      s = s.replace(p, "")
    else:
      s = s.replace(p, " ")
  s = _PERIOD.sub("", s)
  words = []
  for w in s.split():
    w = _NUMBERS.get(w, w)
    if w not in _ARTICLES:
      words.append(_CONTRACTIONS.get(w, w))
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """1/0 exact match after normalisation with one reference; min(#matching references / 3, 1) with several."""
  pred = normalize_vqa_answer(prediction)
  matches = sum(pred == normalize_vqa_answer(a) for a in answers)
  if len(answers) == 1:
    return float(matches)
  return min(matches / 3.0, 1.0)


def _caption_tokens(text: str) -> str:
  text = re.sub(r"<ref>|</ref>|<box>.*?</box>", " ", text.lower())
  return " ".join(re.findall(r"[a-z0-9']+", text))


def cider(predictions: dict, references: dict) -> float:
  """Corpus CIDEr-D (pycocoevalcap) of {id: caption} against {id: [reference captions]}."""
  from pycocoevalcap.cider.cider import Cider

  if not predictions:
    return 0.0
  res = {k: [_caption_tokens(v)] for k, v in predictions.items()}
  gts = {k: [_caption_tokens(r) for r in references[k]] for k in predictions}
  score, _ = Cider().compute_score(gts, res)
  return float(score)


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


def _levenshtein(a: str, b: str) -> int:
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: list[str], tau: float = 0.5) -> float:
  """Average Normalised Levenshtein Similarity of one prediction: best over references of 1 - NL (0 if NL >= tau)."""
  p = " ".join(prediction.strip().lower().split())
  best = 0.0
  for a in answers:
    a = " ".join(a.strip().lower().split())
    nl = _levenshtein(p, a) / max(len(p), len(a), 1)
    best = max(best, 1.0 - nl if nl < tau else 0.0)
  return best


def exact_match(prediction: str, answers: list[str]) -> float:
  p = prediction.strip().lower()
  return float(any(p == a.strip().lower() for a in answers))

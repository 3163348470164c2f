"""Run a model over an evaluation source and score each task with its metric.

Each record's last user turn is the question (earlier turns are the chat history, as in `chat`), its last assistant
turn the reference. Task -> metric: caption, grounded_caption -> CIDEr; vqa_*, multi_image, text, chat -> accuracy
against the one reference after the VQA answer processing (`metrics.answer_match`; video_* pooled as
video_accuracy); grounding -> accuracy at IoU >= 0.5 of the first predicted box; ocr -> exact match and ANLS.
Predictions are written with the data's grounding tags (`<ref>`, `<box>`) for every family.
"""

from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np

from qwenvl_jax.data.boxes import parse_boxes, qwen_vl_tags
from qwenvl_jax.data.conversation import DEFAULT_SYSTEM, normalize_roles
from qwenvl_jax.evals import metrics as M
from qwenvl_jax.infer.chat import generate_answers, prompt_inputs

log = logging.getLogger("qwenvl_jax.evals")

CAPTION_TASKS = ("caption", "grounded_caption")


def metric_kind(task: str) -> str:
  if task in CAPTION_TASKS:
    return "caption"
  if task == "grounding":
    return "grounding"
  if task == "ocr":
    return "ocr"
  return "vqa"


def turns_of(record: dict) -> tuple[list[tuple[str, str]], str, str]:
  """-> (earlier (question, answer) turns, the question asked, the reference answer)."""
  turns = normalize_roles(record["conversations"], record.get("source", record.get("id", "record")))
  if turns[-1][0] != "assistant":
    raise ValueError(f"{record.get('id')}: the last turn must be the assistant's reference answer")
  pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 2, 2)]
  return pairs, turns[-2][1], turns[-1][1]


def prompt_of(model, tokenizer, record: dict):
  """The record's prompt for `model` (its history and question, images and videos decoded) -> prompt_inputs."""
  pairs, query, _ = turns_of(record)
  media = {**(record.get("images") or {}), **(record.get("videos") or {})}
  return prompt_inputs(model, tokenizer, query, pairs, DEFAULT_SYSTEM, media, trusted=True)


def score(predictions: list[dict]) -> dict:
  """predictions: [{'id', 'task', 'prediction', 'reference'}] -> summary and per-task metrics."""
  by_task = collections.defaultdict(list)
  for p in predictions:
    by_task[p["task"]].append(p)
  per_task, pooled = {}, collections.defaultdict(list)
  for task, items in sorted(by_task.items()):
    kind = metric_kind(task)
    if kind == "caption":
      value = M.cider({i: p["prediction"] for i, p in enumerate(items)}, {i: [p["reference"]] for i, p in enumerate(items)})
      per_task[task] = {"cider": value, "n": len(items)}
      if task == "caption":
        pooled["caption_cider"].append((value, len(items)))
    elif kind == "grounding":
      hits = []
      for p in items:
        ref, pred = parse_boxes(p["reference"]), parse_boxes(p["prediction"])
        hits.append(M.grounding_hit(pred[0] if pred else None, ref[0]) if ref else 0.0)
      per_task[task] = {"acc@0.5": float(np.mean(hits)), "n": len(items)}
      pooled["grounding_acc@0.5"].append((per_task[task]["acc@0.5"], len(items)))
    elif kind == "ocr":
      em = float(np.mean([M.exact_match(p["prediction"], [p["reference"]]) for p in items]))
      an = float(np.mean([M.anls(p["prediction"], [p["reference"]]) for p in items]))
      per_task[task] = {"exact_match": em, "anls": an, "n": len(items)}
      pooled["ocr_exact_match"].append((em, len(items)))
      pooled["ocr_anls"].append((an, len(items)))
    else:
      acc = float(np.mean([M.answer_match(p["prediction"], p["reference"]) for p in items]))
      per_task[task] = {"vqa_accuracy": acc, "n": len(items)}
      if task.startswith("video"):
        pooled["video_accuracy"].append((acc, len(items)))
      elif task.startswith("vqa") or task not in ("text", "multi_image"):
        pooled["vqa_accuracy"].append((acc, len(items)))
  summary = {k: sum(v * n for v, n in vals) / sum(n for _, n in vals) for k, vals in pooled.items()}
  return {"summary": summary, "per_task": per_task, "n": len(predictions)}


def evaluate(model, tokenizer, source, max_examples: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 48, progress: bool = True) -> tuple[dict, list[dict]]:
  """Generate for the first `max_examples` records of `source` and score them -> (metrics, predictions). A record
  that cannot be read or prompted (a corrupt image, a malformed turn, a prompt too long for the context) is skipped
  with a warning naming it and counted in metrics["skipped"]; none left to score is an error."""
  n = len(source) if max_examples is None else min(max_examples, len(source))
  if n <= 0:
    raise ValueError(f"nothing to evaluate: {len(source)} records, max_examples {max_examples}")
  context = model.config.max_position_embeddings
  skipped = []

  def usable(what, make):
    try:
      return make()
    except (ValueError, KeyError, TypeError, OSError) as e:  # ImageError, FormatError, TokenizerError: ValueErrors
      skipped.append(what)
      log.warning("eval: skipping %s: %s", what, " ".join(str(e).split())[:300])
      return None

  def prompt(record):
    ids, vision = prompt_of(model, tokenizer, record)
    if len(ids) + max_new_tokens > context:  # it would fail its whole batch in generate
      raise ValueError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of {context}")
    return ids, vision

  records = [r for i in range(n) if (r := usable(f"record {i}", lambda i=i: source[i])) is not None]
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(records), desc="eval", unit="example")
  predictions = []
  # batches of one task: similar prompt lengths, so left padding wastes little
  order = sorted(records, key=lambda r: r.get("task", ""))
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    prompts = [usable(r.get("id", "record"), lambda r=r: prompt(r)) for r in chunk]
    kept = [(r, p) for r, p in zip(chunk, prompts) if p is not None]
    answers = generate_answers(model, tokenizer, [p for _, p in kept], max_new_tokens) if kept else []
    for (r, _), answer in zip(kept, answers):  # in the data's grounding tags, for every family
      predictions.append({"id": r.get("id"), "task": r.get("task", "chat"), "prediction": qwen_vl_tags(answer).strip(),
                          "reference": turns_of(r)[2]})
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  if not predictions:
    raise ValueError(f"no record could be evaluated: all {n} skipped (see the warnings)")
  return {**score(predictions), "skipped": len(skipped)}, predictions


def write_results(out_dir: str, metrics: dict, predictions: list[dict]) -> None:
  """out_dir/predictions.jsonl (one prediction per line) and out_dir/metrics.json."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in predictions)
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)

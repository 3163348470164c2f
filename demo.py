"""The end-to-end demo on the embedded synthetic "shapes" dataset (no downloads):

    python demo.py [--workdir=/tmp/qwenvl_demo] [--max_examples=500] [--fresh]

1. trains the demo SentencePiece tokenizer and evaluates the untrained (randomly initialised) model on the test split;
2. runs the three stages of configs/demo.py (pre-training form on captions, multi-task ChatML, chat SFT with the ViT
   frozen; see that file for where and why it departs from the paper), each from the previous stage's last checkpoint;
3. evaluates the trained model on the same examples, prints a before/after table against the demo targets, and saves
   a few test images with the model's answers and boxes drawn on them (WORKDIR/examples/*.png).

Re-running with the same workdir resumes the training where it stopped; --fresh starts over.
"""

import json
import os
import shutil
import sys
import textwrap
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/qwenvl_demo", "where checkpoints, evaluations and examples go")
_CONFIG = flags.DEFINE_string("config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py"),
                              "the chained demo config")
_MAX = flags.DEFINE_integer("max_examples", 500, "test examples evaluated (the split has 500)")
_FRESH = flags.DEFINE_bool("fresh", False, "delete the workdir first")

# (summary key, label, target, how the target reads); the captioning target also asks for 2x the untrained score;
# "multi_image" is the two-image questions' accuracy (a per-task figure, not pooled into VQA).
TARGETS = (
  ("vqa_accuracy", "VQA accuracy", 0.90, ">= 0.90"),
  ("caption_cider", "captioning CIDEr", 1.0, ">= 1.0, >= 2x"),
  ("grounding_acc@0.5", "grounding acc@0.5", 0.60, ">= 0.60"),
  ("ocr_exact_match", "OCR exact match", 0.60, ">= 0.60"),
  ("multi_image", "two-image accuracy", 0.80, ">= 0.80"),
  ("ocr_anls", "OCR ANLS", None, ""),
)
EXAMPLE_TASKS = ("grounding", "grounded_caption", "ocr", "vqa_color", "vqa_count", "caption")


def load_config(path: str):
  import importlib.util
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def evaluate_into(model, tok, source, n: int, out_dir: str, desc: str) -> dict:
  """Greedy answers for the first n test examples -> metrics (also written with the predictions to out_dir)."""
  from qwenvl_jax.evals.evaluate import evaluate, write_results
  t0 = time.time()
  metrics, predictions = evaluate(model, tok, source, max_examples=n, batch_size=16, max_new_tokens=64)
  write_results(out_dir, metrics, predictions)
  print(f"{desc}: {n} examples in {time.time() - t0:.0f}s", flush=True)
  return metrics


def _figure(metrics: dict, key: str) -> float:
  """A summary figure, or a task's own figure (its first metric) when `key` names a task."""
  if key in metrics["per_task"]:
    return next(v for k, v in metrics["per_task"][key].items() if k not in ("n", "anls"))
  return metrics["summary"].get(key, 0.0)


def table(before: dict, after: dict) -> str:
  rows = [("metric", "untrained", "trained", "target", "met")]
  for key, label, target, reads in TARGETS:
    b, a = _figure(before, key), _figure(after, key)
    met = ""
    if target is not None:
      ok = a >= target and (key != "caption_cider" or a >= 2 * b)
      met = "yes" if ok else "no"
    rows.append((label, f"{b:.3f}", f"{a:.3f}", reads, met))
  for task, m in sorted(after["per_task"].items()):
    (name, a), = [(k, v) for k, v in m.items() if k not in ("n", "anls")][:1]
    b = before["per_task"].get(task, {}).get(name, 0.0)
    rows.append((f"  {task} ({name}, n={m['n']})", f"{b:.3f}", f"{a:.3f}", "", ""))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def save_examples(source, predictions_path: str, out_dir: str, scale: int = 4) -> list[str]:
  """One test image per task in EXAMPLE_TASKS with the trained model's answer and boxes (reference boxes in grey),
  enlarged `scale` times -> PNG paths."""
  from PIL import Image, ImageDraw

  from qwenvl_jax.infer.grounding import draw_grounding, parse_grounding
  with open(predictions_path) as f:
    predictions = {p["id"]: p for p in map(json.loads, f)}
  os.makedirs(out_dir, exist_ok=True)
  paths, done = [], set()
  for i in range(len(source)):
    record = source[i]
    p = predictions.get(record["id"])
    if (p is None or record["task"] not in EXAMPLE_TASKS or record["task"] in done or len(record["images"]) != 1
        or len(record["conversations"]) != 2):  # one image, one question (no follow-up turn)
      continue
    done.add(record["task"])
    image = next(iter(record["images"].values()))
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    # reference boxes in grey underneath, the model's boxes (with their phrases) in colour on top
    for _, box in parse_grounding(p["reference"], big.width, big.height):
      ImageDraw.Draw(big).rectangle(box, outline=(150, 150, 150), width=1)
    drawn = draw_grounding(big, p["prediction"])
    question = record["conversations"][-2]["value"].split("</img>\n")[-1]
    lines = textwrap.wrap(f"Q: {question}", 70) + textwrap.wrap(f"A: {p['prediction']}", 70)
    canvas = Image.new("RGB", (drawn.width, drawn.height + 14 * len(lines) + 6), "white")
    canvas.paste(drawn, (0, 0))
    ImageDraw.Draw(canvas).text((4, drawn.height + 3), "\n".join(lines), fill="black")
    path = os.path.join(out_dir, f"{record['task']}_{record['id']}.png")
    canvas.save(path)
    paths.append(path)
    print(f"  {record['task']:>16}: Q: {question}  A: {p['prediction']}  (reference: {p['reference']})")
  return paths


MARKER = ".qwenvl_demo"  # written into every workdir demo.py makes: --fresh deletes only such folders


def prepare_workdir(workdir: str, fresh: bool) -> None:
  """Create the workdir (with its marker). --fresh first deletes it, but only if it is empty or demo.py made it:
  a mistyped --workdir must never cost the user a folder."""
  if fresh and os.path.isdir(workdir) and os.listdir(workdir):
    if not os.path.isfile(os.path.join(workdir, MARKER)):
      raise ValueError(f"--fresh: refusing to delete {workdir}: it is not empty and demo.py did not make it (no "
                       f"{MARKER} in it); pass another --workdir or delete it yourself")
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, MARKER), "a"):
    pass


def main(argv):
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  import qwenvl_jax as qv
  from qwenvl_jax.data.shapes import ShapesSource
  from qwenvl_jax.train.loop import model_config, run, tokenizer_for

  t_start = time.time()
  workdir = _WORKDIR.value
  try:
    if _MAX.value <= 0:
      raise ValueError(f"--max_examples must be positive, got {_MAX.value}")
    c = load_config(_CONFIG.value)
    if not c.stages:
      raise ValueError(f"{_CONFIG.value} chains no stages (config.stages is empty)")
    prepare_workdir(workdir, fresh=_FRESH.value)
    cfg = model_config(c)
    tok = tokenizer_for(c, cfg, workdir)
    source = ShapesSource("test", seed=c.seed, image_size=c.data.image_size)
    n = min(_MAX.value, len(source))
    print(f"devices: {jax.devices()}; model {c.model.name}: {qv.count_params(cfg):,} parameters", flush=True)
    untrained = qv.QwenVLModel.random(cfg, seed=c.seed)
    before = evaluate_into(untrained, tok, source, n, os.path.join(workdir, "eval_untrained"), "untrained model")
    t0 = time.time()
    run(c, workdir)
    print(f"training: {time.time() - t0:.0f}s", flush=True)
    trained = qv.load(os.path.join(workdir, c.stages[-1]), scan_layers=False)
    after_dir = os.path.join(workdir, "eval_trained")
    after = evaluate_into(trained, tok, source, n, after_dir, "trained model")
  except (ValueError, OSError, RuntimeError) as e:  # bad config, unwritable workdir, non-finite loss ...
    print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
    return 2
  print(f"\nshapes test split, first {n} examples (greedy):\n" + table(before, after))
  print("\nexamples (trained model):")
  paths = save_examples(source, os.path.join(after_dir, "predictions.jsonl"), os.path.join(workdir, "examples"))
  with open(os.path.join(workdir, "demo_results.json"), "w") as f:
    json.dump({"untrained": before["summary"], "trained": after["summary"], "examples": paths,
               "per_task": {"untrained": before["per_task"], "trained": after["per_task"]}}, f, indent=2)
  print(f"\nimages with the answers drawn: {os.path.join(workdir, 'examples')}; total {time.time() - t_start:.0f}s")
  return 0


if __name__ == "__main__":
  app.run(main)

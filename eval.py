"""Evaluate a checkpoint: python eval.py --config=configs/<name>.py --checkpoint=DIR [--split=test] [--max_examples=N]

A benchmark of the Qwen-VL paper in the official evaluation's file format (qwenvl_jax/evals/benchmarks.py):

    python eval.py --benchmark textvqa --data textvqa_val.jsonl --annotations textvqa_val_annotations.json \
        --images DIR --checkpoint CKPT [--prompt base|chat] [--max_examples N] [--batch_size B] [--strict]

writes OUT/predictions.*.jsonl as it goes (a rerun with the same --out continues where it stopped) and
OUT/metrics.json (default OUT: CHECKPOINT/bench_<benchmark>_<data file name>_<prompt>). Several processes
(--distributed on a TPU pod slice, or --coordinator_address/--num_processes/--process_id) each evaluate their block
of the examples on their own devices (one, or --mesh over them); the primary gathers and scores them all.

A contrastive stage (`mode=contrastive`, e.g. configs/contrastive_demo.py) is scored zero-shot instead: image <->
text retrieval recall@1/5 and classification over the shapes classes (qwenvl_jax/evals/contrastive.py).

Otherwise it generates greedy answers over an evaluation split of the config's data source (the synthetic shapes splits, the
shapes TFDS build, or a JSONL file in the official finetune format) and reports captioning CIDEr, VQA accuracy,
grounding accuracy at IoU >= 0.5, OCR exact match and ANLS. Writes predictions.jsonl and metrics.json to --out
(default: DIR/eval_<split>).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "the training config (data source, image size, tokenizer)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF folder, qwenvl_jax checkpoint or train.py workdir")
_SPLIT = flags.DEFINE_string("split", "test", "evaluation split (shapes / TFDS)")
_MAX = flags.DEFINE_integer("max_examples", None, "evaluate only the first N examples")
_BATCH = flags.DEFINE_integer("batch_size", 8, "prompts generated together")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "answer length limit")
_OUT = flags.DEFINE_string("out", None, "output folder (default: CHECKPOINT/eval_<split>)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "default: the tokenizer stored with the checkpoint")
_MESH = flags.DEFINE_string("mesh", None, "DATA,FSDP,TENSOR device mesh (e.g. 1,1,8); default: one device")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"], "weight-only int8 linear layers")
_BENCHMARK = flags.DEFINE_string("benchmark", None, "a paper benchmark (evals/benchmarks.py), e.g. textvqa")
_DATA = flags.DEFINE_string("data", None, "--benchmark: the benchmark file in the official eval_mm format")
_IMAGES = flags.DEFINE_string("images", None, "--benchmark: the folder the file's image paths start from")
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "--benchmark: the official answers file (VQA accuracy: "
                                   "*_annotations.json; DocVQA: val_v1.0.json)")
_PROMPT = flags.DEFINE_enum("prompt", "base", ["base", "chat"], "--benchmark: the base or the chat model's prompt")
_STRICT = flags.DEFINE_bool("strict", False, "--benchmark: a bad record is an error instead of skipped and counted")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "--benchmark: jax.distributed.initialize() (a TPU pod slice "
                                 "tells every process the rest)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "--benchmark: host:port of process 0, with "
                                   "--num_processes and --process_id (several processes on other machines)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--benchmark: with --coordinator_address")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--benchmark: with --coordinator_address")


def run(c, checkpoint: str, split: str, out: str) -> dict:
  import qwenvl_jax as qv
  from qwenvl_jax.api import find_tokenizer
  from qwenvl_jax.evals.evaluate import evaluate, write_results

  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
  mesh = None
  if _MESH.value:
    from qwenvl_jax.sharding import parse_mesh
    mesh = parse_mesh(_MESH.value)
  model = qv.load(checkpoint, scan_layers=False, mesh=mesh, quantize=_QUANTIZE.value)  # unrolled: faster decoding
  tok_path = _TOKENIZER.value or find_tokenizer(checkpoint) or (c.data.tokenizer if c.data.tokenizer != "shapes" else None)
  if tok_path is None:
    raise FileNotFoundError(f"no tokenizer found with {checkpoint}; pass --tokenizer")
  proc = model.processor()
  tok = qv.load_tokenizer(tok_path, image_span=proc.fixed_image_tokens or 0)
  source = _source(c, split, getattr(proc, "image_size", None))
  metrics, predictions = evaluate(model, tok, source, max_examples=_MAX.value, batch_size=_BATCH.value,
                                  max_new_tokens=_MAX_NEW.value)
  write_results(out, metrics, predictions)
  return metrics


def run_contrastive(c, checkpoint: str, split: str, out: str) -> dict:
  """A contrastive stage's workdir (`mode=contrastive`): zero-shot retrieval and classification (evals/contrastive.py)
  on the split's image-caption pairs, at the config's image size."""
  import functools
  import json

  import jax

  from qwenvl_jax.api import find_tokenizer
  from qwenvl_jax.convert.checkpoint import load_training_params
  from qwenvl_jax.data.tokenizer import load_tokenizer
  from qwenvl_jax.evals.contrastive import evaluate_contrastive
  from qwenvl_jax.models import registry
  from qwenvl_jax.train.loop import contrastive_head, model_config, processor_for
  from qwenvl_jax.train.state import abstract_params

  cfg = model_config(c)
  fam, head = registry.family_of(cfg), contrastive_head(c)
  abstract = abstract_params(cfg, head)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, step = load_training_params(checkpoint, abstract, jax.tree.map(lambda _: device, abstract))
  processor = processor_for(c, cfg)
  tok_path = _TOKENIZER.value or find_tokenizer(checkpoint)
  if tok_path is None:
    raise FileNotFoundError(f"no tokenizer found with {checkpoint}; pass --tokenizer")
  tok = load_tokenizer(tok_path, image_span=processor.fixed_image_tokens or 0)
  image_fn = functools.partial(fam.inputs.contrastive_image, cfg, processor, size=c.data.image_size)
  metrics = evaluate_contrastive(fam.module(cfg), head, params, tok, image_fn,
                                 _source(c, split, c.data.image_size), text_len=c.contrastive.text_len,
                                 max_examples=_MAX.value)
  metrics["step"] = step
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def run_benchmark(checkpoint: str) -> dict | None:
  """--benchmark: read the file first (a bad file fails before the model loads), then predict, resume and score."""
  from qwenvl_jax.evals import benchmarks as B

  bench = B.get(_BENCHMARK.value)
  if not _DATA.value:
    raise ValueError("--benchmark needs --data (the benchmark file)")
  examples, files, skipped = B.read(bench, _DATA.value, _IMAGES.value, _ANNOTATIONS.value, strict=_STRICT.value)
  if _MAX.value is not None:
    examples = examples[:_MAX.value]
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")

  import jax

  import qwenvl_jax as qv
  from qwenvl_jax.api import find_tokenizer
  from qwenvl_jax.evals.bench_run import check_run, evaluate_benchmark

  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  stem = os.path.splitext(os.path.basename(_DATA.value))[0]
  out = _OUT.value or os.path.join(checkpoint, f"bench_{bench.name}_{stem}_{_PROMPT.value}")
  max_new = _MAX_NEW.value if flags.FLAGS["max_new_tokens"].present else None  # default: the benchmark's own
  check_run(out, {"benchmark": bench.name, "data": os.path.abspath(_DATA.value), "prompt": _PROMPT.value,
                  "max_new_tokens": max_new or bench.max_new_tokens})  # before the model loads
  from qwenvl_jax.sharding import parse_mesh
  mesh = None
  if jax.process_count() > 1:  # each process evaluates its own examples: a mesh of its own devices (default: one)
    mesh = parse_mesh(_MESH.value or "1,1,1", devices=jax.local_devices()[:None if _MESH.value else 1])
  elif _MESH.value:
    mesh = parse_mesh(_MESH.value)
  model = qv.load(checkpoint, scan_layers=False, mesh=mesh, quantize=_QUANTIZE.value)
  tok_path = _TOKENIZER.value or find_tokenizer(checkpoint)
  if tok_path is None:
    raise FileNotFoundError(f"no tokenizer found with {checkpoint}; pass --tokenizer")
  tok = qv.load_tokenizer(tok_path, image_span=model.processor().fixed_image_tokens or 0)
  return evaluate_benchmark(model, tok, bench, examples, files, out, prompt=_PROMPT.value, batch_size=_BATCH.value,
                            max_new_tokens=max_new, read_skipped=skipped, data=_DATA.value)


def _source(c, split, image_size):
  """The split of the config's data; shapes at the model's image size (fixed-span families) or the config's range of
  sides (any-resolution ones), with the config's task mix."""
  d = c.data
  if d.source == "shapes":
    from qwenvl_jax.data.shapes import ShapesSource
    from qwenvl_jax.train.config import parse_mix
    if image_size is None:
      image_size = tuple(int(x) for x in d.image_sides.split(",")) if d.image_sides else d.image_size
    return ShapesSource(split, seed=c.seed, image_size=image_size, mix=parse_mix(d.mix))
  if d.source == "jsonl":
    from qwenvl_jax.data.jsonl import JsonlSource
    return JsonlSource(d.path, image_root=d.image_root or None, confine_images=d.confine_images)
  from qwenvl_jax.data.tfds_sources import ShapesTfdsSource
  return ShapesTfdsSource(d.path, split)


def main(argv) -> int:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    flags.FLAGS(argv)
    if _BENCHMARK.value:
      if not _CHECKPOINT.value:
        raise ValueError("--checkpoint is required")
      for flag in (_MAX, _BATCH, _MAX_NEW):
        if flag.value is not None and flag.value < 1:
          raise ValueError(f"--{flag.name}={flag.value}: must be at least 1")
      metrics = run_benchmark(_CHECKPOINT.value)
      if metrics is not None:  # the primary process
        name = next(k for k in metrics if k not in ("benchmark", "prompt"))
        print(f"{metrics['benchmark']} ({metrics['prompt']} prompt): {name} {metrics[name]:.4f} "
              f"(paper scale {metrics['score']:.2f}); {metrics['n']} examples scored, {metrics['skipped']} skipped")
      return 0
    if _CONFIG.value is None or not _CHECKPOINT.value:
      raise ValueError("--config and --checkpoint are required")
    for flag in (_MAX, _BATCH, _MAX_NEW):  # before the model is loaded: 0 or -1 examples is no evaluation
      if flag.value is not None and flag.value < 1:
        raise ValueError(f"--{flag.name}={flag.value}: must be at least 1")
    out = _OUT.value or os.path.join(_CHECKPOINT.value, f"eval_{_SPLIT.value}")
    if _CONFIG.value.get("mode") == "contrastive":
      if not os.path.exists(_CHECKPOINT.value):
        raise FileNotFoundError(f"checkpoint {_CHECKPOINT.value} does not exist")
      metrics = run_contrastive(_CONFIG.value, _CHECKPOINT.value, _SPLIT.value, out)
      for k, v in metrics.items():
        print(f"{k:>20s}  {v:.4f}" if isinstance(v, float) else f"{k:>20s}  {v}")
      print(f"wrote {out}/metrics.json")
      return 0
    metrics = run(_CONFIG.value, _CHECKPOINT.value, _SPLIT.value, out)
  except Exception as e:  # noqa: BLE001 - flags, config, checkpoint and data errors all end here as one line
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)
    return 2
  for k, v in metrics["summary"].items():
    print(f"{k:>20s}  {v:.4f}")
  for task, m in metrics["per_task"].items():
    print(f"{task:>20s}  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
  print(f"{metrics['n']} examples scored, {metrics['skipped']} skipped (unreadable; see the warnings)")
  print(f"wrote {out}/metrics.json and predictions.jsonl")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))

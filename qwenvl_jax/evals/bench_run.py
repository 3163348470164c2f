"""Run a model over a benchmark (evals/benchmarks.py) at scale: sharded over processes, batched, resumable.

  * Sharding: process i of n takes the i-th contiguous block of the examples (as eval_mm's InferenceSampler) and
    generates with its own devices; at the end the predictions are gathered on the primary process, which scores
    them and writes metrics.json.
  * Resume: each process appends its predictions to out/predictions.<i>-of-<n>.jsonl and flushes them to disk
    batch by batch; a restarted run reads every predictions*.jsonl in `out` (a line cut short by a kill is
    ignored) and generates only the examples not in them. out/run.json names the benchmark, data file, prompt and
    answer length the predictions belong to; another run's folder is refused.
  * Bad input: a record whose image cannot be read or whose prompt does not fit the context is skipped with a
    warning and counted (benchmarks.read already skipped and counted the records it could not use).
"""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np

from qwenvl_jax.data.conversation import DEFAULT_SYSTEM, image_prompt
from qwenvl_jax.evals import benchmarks as B

log = logging.getLogger("qwenvl_jax.evals")

PAD_TO = 64  # prompt rows are padded to multiples of this: fewer distinct shapes, fewer compilations


def shard(n: int, index: int, count: int) -> range:
  """The contiguous block of n examples that process `index` of `count` evaluates (sizes differ by at most one)."""
  size, left = divmod(n, count)
  start = index * size + min(index, left)
  return range(start, start + size + (index < left))


def predictions_path(out: str, index: int, count: int) -> str:
  return os.path.join(out, f"predictions.{index:05d}-of-{count:05d}.jsonl")


def read_predictions(out: str) -> dict:
  """{id: prediction record} from every predictions*.jsonl in `out` (any process count); a line that does not
  parse (the last one of a killed run) is ignored."""
  done = {}
  for path in sorted(glob.glob(os.path.join(out, "predictions*.jsonl"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        try:
          p = json.loads(line)
        except ValueError:
          continue
        if isinstance(p, dict) and "id" in p and "prediction" in p and "ref" in p:
          done[str(p["id"])] = p
  return done


class BenchmarkRunner:
  """Prompts, generation / ranking and resumable output of one benchmark for one model and tokenizer."""

  def __init__(self, model, tokenizer, bench: B.Benchmark, prompt: str = "base", max_new_tokens: int | None = None):
    if prompt not in ("base", "chat"):
      raise ValueError(f"--prompt {prompt}: base or chat")
    if prompt == "base" and model.family.name != "qwen_vl":
      raise ValueError(f"--prompt base is the Qwen-VL base model's prompt; a {model.family.name} model takes "
                       f"--prompt chat")
    self.model, self.tok, self.bench, self.prompt = model, tokenizer, bench, prompt
    self.max_new_tokens = max_new_tokens or bench.max_new_tokens
    # the base model ends its text with <|endoftext|> (eval_mm's eos_token_id); the chat model its turn
    self.stops = [tokenizer.eod_id] if prompt == "base" else [tokenizer.im_end_id, tokenizer.eod_id]
    self._proc = model.processor()

  # --- prompts ---------------------------------------------------------------------------------------------------
  def prompt_of(self, ex: B.Example, image_file: str) -> tuple[list[int], dict]:
    """(ids, vision inputs) of the example's prompt: the base text with its image, or the chat prompt."""
    if self.prompt == "base":
      ids = self.tok.encode(ex.base)
      vision = {"pixel_values": np.stack([self._proc.preprocess(image_file, name=ex.image)])}
    else:
      from qwenvl_jax.infer.chat import prompt_inputs
      ids, vision = prompt_inputs(self.model, self.tok, image_prompt([ex.image]) + ex.chat, (), DEFAULT_SYSTEM,
                                  {ex.image: image_file}, trusted=True)
    extra = self.max_new_tokens if ex.choices is None else max(len(self._choice_ids(c)) for c in ex.choices)
    context = self.model.config.max_position_embeddings
    if len(ids) + extra > context:
      raise ValueError(f"prompt of {len(ids)} tokens + {extra} more exceeds the context of {context}")
    return ids, vision

  def _choice_ids(self, letter: str) -> list[int]:
    # eval_mm tokenizes ' A' after the base prompt; a chat answer starts with the letter itself
    return self.tok.encode((" " if self.prompt == "base" else "") + letter)

  # --- generation and ranking ------------------------------------------------------------------------------------
  def generate(self, prompts) -> list[str]:
    """Greedy answers to several prompts in one batched call, decoded as eval_mm decodes them (special tokens
    dropped; stripped except for boxes)."""
    vision = _stack_vision([v for _, v in prompts])
    ids, mask = _left_pad([p for p, _ in prompts], self.tok.eod_id)
    out = self.model.generate(ids, attention_mask=mask, max_new_tokens=self.max_new_tokens, stop_ids=self.stops,
                              vocab_limit=self.tok.vocab_size, **vision)
    answers = []
    for row in out[:, ids.shape[1]:]:
      row = [int(t) for t in row]
      cut = next((k for k, t in enumerate(row) if t in self.stops), len(row))
      text = self.tok.decode(row[:cut], skip_special_tokens=True)
      answers.append(text if self.bench.fmt == "refcoco" else text.strip())
    return answers

  def rank(self, prompt, choices: list[str]) -> int:
    """The choice whose tokens after the prompt have the lowest mean loss (eval_mm's multiple choice)."""
    import jax
    import jax.numpy as jnp

    ids, vision = prompt
    targets = [self._choice_ids(c) for c in choices]
    # rounded up only within seq_length (beyond it Qwen-VL's dynamic-NTK alpha follows the padded length) and the
    # context
    cfg = self.model.config
    limit = min(getattr(cfg, "seq_length", cfg.max_position_embeddings), cfg.max_position_embeddings)
    rows, mask = _left_pad([ids + t for t in targets], self.tok.eod_id, limit)
    vision = {k: np.concatenate([v] * len(choices)) for k, v in vision.items() if v is not None}
    logits = self.model.logits(rows, mask, **vision)
    t = max(len(x) for x in targets)
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, -t - 1:-1], jnp.float32), axis=-1)  # only the scored positions
    nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(rows[:, -t:])[..., None], axis=-1)[..., 0])
    losses = [nll[k, t - len(x):].mean() for k, x in enumerate(targets)]
    return int(np.argmin(losses))

  # --- the run ---------------------------------------------------------------------------------------------------
  def run(self, examples: list[B.Example], files: dict, out: str, batch_size: int = 8,
          progress: bool = True) -> tuple[list[dict], int]:
    """Predict this process's shard of `examples` not yet in `out` -> (this shard's predictions, old and new;
    examples skipped here). Predictions are appended to this process's file and flushed batch by batch."""
    import jax

    index, count = jax.process_index(), jax.process_count()
    mine = [examples[i] for i in shard(len(examples), index, count)]
    done = read_predictions(out)
    have = [done[ex.id] for ex in mine if ex.id in done]
    todo = [ex for ex in mine if ex.id not in done]
    if have:
      log.warning("benchmark %s: resuming, %d of %d examples of this shard already predicted in %s",
                  self.bench.name, len(have), len(mine), out)
    bar = _bar(len(mine), len(have), f"{self.bench.name} ({self.prompt})", progress)
    skipped = 0
    os.makedirs(out, exist_ok=True)
    path = predictions_path(out, index, count)
    with open(path, "a", encoding="utf-8") as f:
      if f.tell() and not _ends_with_newline(path):  # a line cut short by a kill stays its own (ignored) line
        f.write("\n")
      step = 1 if self.bench.fmt == "mc" else batch_size  # a multiple-choice question is its own batch of choices
      for start in range(0, len(todo), step):
        chunk, prompts = [], []
        for ex in todo[start:start + step]:
          try:
            prompts.append(self.prompt_of(ex, files[ex.id]))
            chunk.append(ex)
          except (ValueError, KeyError, TypeError, OSError) as e:  # image errors, tokenizer errors: ValueErrors
            skipped += 1
            log.warning("benchmark %s: skipping id %s: %s", self.bench.name, ex.id, " ".join(str(e).split())[:300])
        if chunk:
          if self.bench.fmt == "mc":
            answers = [self.rank(p, ex.choices) for ex, p in zip(chunk, prompts)]
          else:
            answers = self.generate(prompts)
          new = [{"id": ex.id, "prediction": a, "ref": ex.ref} for ex, a in zip(chunk, answers)]
          f.writelines(json.dumps(p) + "\n" for p in new)
          f.flush()
          os.fsync(f.fileno())  # a kill loses at most the batch being generated
          have += new
        if bar is not None:
          bar.update(len(todo[start:start + step]))
    if bar is not None:
      bar.close()
    return have, skipped


def gather(payload) -> list:
  """Every process's JSON-able `payload`, in process order, on every process (one process: [payload])."""
  import jax
  if jax.process_count() == 1:
    return [payload]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(payload).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(rows[i, :sizes[i]]).decode("utf-8")) for i in range(len(sizes))]


def check_run(out: str, identity: dict) -> None:
  """`out` holds predictions of this run or none: out/run.json records what they are (benchmark, data file,
  prompt); a different run's folder is refused rather than its predictions taken for this one's (ids such as
  RefCOCO's line numbers repeat across files)."""
  import jax
  path = os.path.join(out, "run.json")
  if os.path.isfile(path):
    with open(path) as f:
      try:
        was = json.load(f)
      except ValueError:
        was = None
    if was != identity:
      raise ValueError(f"--out {out} holds predictions of another run ({was}); pass another --out")
  elif jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(identity, f)
    os.replace(path + ".tmp", path)  # whole: another process may be reading it


def evaluate_benchmark(model, tokenizer, bench: B.Benchmark, examples, files, out: str, prompt: str = "base",
                       batch_size: int = 8, max_new_tokens: int | None = None, read_skipped: int = 0,
                       progress: bool = True, data: str = "") -> dict | None:
  """Predict (resuming from `out`, when it holds this benchmark's `data` with this prompt), gather on the primary
  process, score; the primary writes out/metrics.json and returns the metrics (other processes return None)."""
  import jax
  runner = BenchmarkRunner(model, tokenizer, bench, prompt, max_new_tokens)
  check_run(out, {"benchmark": bench.name, "data": os.path.abspath(data) if data else "", "prompt": prompt,
                  "max_new_tokens": runner.max_new_tokens})
  preds, skipped = runner.run(examples, files, out, batch_size=batch_size, progress=progress)
  parts = gather({"predictions": preds, "skipped": skipped})
  if jax.process_index() != 0:
    return None
  by_id = {p["id"]: p for part in parts for p in part["predictions"]}
  skipped = read_skipped + sum(part["skipped"] for part in parts)
  if not by_id:
    raise ValueError(f"no {bench.name} example could be evaluated: all {len(examples) + read_skipped} skipped "
                     f"(see the warnings)")
  metrics = {"benchmark": bench.name, "prompt": prompt, **B.score(bench, list(by_id.values())), "skipped": skipped}
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def _left_pad(rows, pad_id: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token rows -> (ids [B, L], mask [B, L]) right-aligned, L the longest row rounded up to PAD_TO (not rounded
  when that would pass `limit`)."""
  longest = max(len(r) for r in rows)
  width = -(-longest // PAD_TO) * PAD_TO
  if limit is not None and width > limit:
    width = longest
  ids = np.full((len(rows), width), pad_id, np.int64)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def _stack_vision(visions) -> dict:
  out: dict = {}
  for v in visions:
    for k, a in v.items():
      if a is not None:
        out.setdefault(k, []).append(a)
  return {k: np.concatenate(a) for k, a in out.items()}


def _bar(total: int, initial: int, desc: str, progress: bool):
  if not progress:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit="example")

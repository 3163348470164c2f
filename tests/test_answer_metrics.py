"""The per-task answer-token metrics: which tokens count (`answer_mask`), and that they read at chance for a model
that learned nothing from the image, while the structure tokens around the answers read near 1 for the same model
(accuracy over all targets would hide that nothing was learned from the image)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_train_step import CFG, FAST_COMPILE, IMG, IMG_END, IMG_PAD  # the train-step tests' tiny model

from qwenvl_jax.data.conversation import answer_mask, format_chat
from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder
from qwenvl_jax.data.shapes import TASKS, generate
from qwenvl_jax.models.qwen_vl import FAMILY
from qwenvl_jax.models.qwen_vl.model import QwenVL
from qwenvl_jax.train.step import StepOptions, TrainState, train_step

ANSWERS = (10, 11, 12, 13)  # one of 4 equally likely answer tokens, shown only by the image: chance is 1/4
PROMPT, CLOSE = [1, 5, 6, 7], [8, 9]  # fixed structure before the image and between it and the answer
END = 2                                # structure after the answer (as <|im_end|>)
STRUCTURE, ANSWER = 2, 1               # task ids: the answer token is task 1; structure targets task 2 (to compare)


def test_answer_mask_keeps_answer_words_not_structure(tmp_path):
  """In a grounding answer only the digits count (not <box>, '(' or ','); in a VQA answer the word (not
  <|im_end|> or the newline after it); the prompt never."""
  from qwenvl_jax.data.shapes import train_tokenizer
  tok = train_tokenizer(str(tmp_path / "tok"), vocab_size=600, image_span=4, num_records=300)
  for task in ("grounding", "vqa_color"):
    record = generate("train", 3, task=task, image_size=56)
    t = format_chat(tok, record["conversations"])
    marked = [i for i, m in zip(t.ids, answer_mask(tok, t.ids, t.loss_mask)) if m]
    answer = record["conversations"][-1]["value"]
    if task == "grounding":
      assert tok.decode(marked) == "".join(ch for ch in answer if ch.isdigit()), (answer, tok.decode(marked))
    else:
      assert tok.decode(marked) == answer
  # the encoder puts the task id on exactly those tokens
  enc = SampleEncoder(tok, DataConfig(seq_len=128, max_images=1, image_size=56, task_names=TASKS))
  sample = enc(generate("train", 3, task="vqa_color", image_size=56))
  assert set(sample["task"][sample["task"] > 0]) == {TASKS.index("vqa_color") + 1}
  assert tok.decode(sample["ids"][sample["task"] > 0]) == generate("train", 3, task="vqa_color")["conversations"][-1][
      "value"]


def batch(rs, rows: int) -> dict:
  """One sample per row: PROMPT <img> pads </img> CLOSE answer END, the answer drawn uniformly from ANSWERS and the
  image all zeros: nothing the model sees tells the answer."""
  ids = PROMPT + [IMG] + [IMG_PAD] * CFG.visual.n_queries + [IMG_END] + CLOSE + [0, END]
  n = len(ids)
  out = {"input_ids": np.tile(np.asarray(ids, np.int32), (rows, 1)), "segment_ids": np.ones((rows, n), np.int32),
         "positions": np.tile(np.arange(n, dtype=np.int32), (rows, 1)), "image_mask": np.ones((rows, 1), bool),
         "pixel_values": np.zeros((rows, 1, 3, 28, 28), np.float32)}
  out["input_ids"][:, -2] = np.asarray(ANSWERS)[rs.randint(0, len(ANSWERS), rows)]
  out["loss_mask"] = np.zeros((rows, n), np.int32)
  out["loss_mask"][:, 1:len(PROMPT)] = out["loss_mask"][:, -len(CLOSE) - 2:] = 1
  out["task_ids"] = np.where(out["loss_mask"] > 0, STRUCTURE, 0).astype(np.int32)
  out["task_ids"][:, -2] = ANSWER
  return out


def test_blind_model_reads_chance_on_answers():
  """A model trained where the image tells nothing (60 Adam steps) learns the structure (accuracy ~1 there) but can
  only guess the answer: 1/4 over 512 held-out rows (measured by the train step at learning rate 0)."""
  steps, eval_batches = 60, 16
  tx = optax.adam(lambda count: jnp.where(count < steps, 3e-3, 0.0))
  step = jax.jit(functools.partial(train_step, model=QwenVL(CFG), tx=tx, schedule=lambda s: 0.0,
                                   opts=StepOptions(loss_chunk=64, num_tasks=2)), compiler_options=FAST_COMPILE)
  params = jax.jit(FAMILY.init_params, static_argnums=0)(CFG, jax.random.key(0))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key(0))
  rs = np.random.RandomState(1)
  hits = tokens = 0
  for k in range(steps + eval_batches):
    state, m = step(state, batch(rs, 32))
    if k >= steps:
      hits, tokens = hits + np.asarray(m["task_hits"]), tokens + np.asarray(m["task_tokens"])
  answer, structure = hits[ANSWER - 1] / tokens[ANSWER - 1], hits[STRUCTURE - 1] / tokens[STRUCTURE - 1]
  assert tokens[ANSWER - 1] == 512 and structure > 0.95, (answer, structure)
  assert 0.17 < answer < 0.33, (answer, structure)  # chance 0.25; 512 draws: std 0.019


def test_fresh_resampler_keeps_where_things_are():
  """Four images that differ only in which quadrant is bright: a freshly initialised ViT + resampler gives them
  clearly different features (the q/k kernels start as the identity, so each query starts on its part of the
  image). With random q/k kernels every query averaged all patches and the four differed by ~2%: a model trained
  from scratch then never learned where things are (positions, boxes, words)."""
  pixels = -np.ones((4, 3, 28, 28), np.float32)
  for a in range(4):
    pixels[a, :, 14 * (a // 2):14 * (a // 2) + 14, 14 * (a % 2):14 * (a % 2) + 14] = 1
  params = jax.jit(FAMILY.init_params, static_argnums=0)(CFG, jax.random.key(0))
  feats = np.asarray(QwenVL(CFG).apply({"params": params}, jnp.asarray(pixels), method="encode_images"))
  spread = np.abs(feats - feats.mean(0)).mean() / np.abs(feats).mean()
  assert spread > 0.15, spread

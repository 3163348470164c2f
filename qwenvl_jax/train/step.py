"""Train state, the jitted train step (gradient accumulation, NaN/Inf guard) and the FLOPs count behind MFU."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenvl_jax.data.packing import segment_lengths
from qwenvl_jax.data.patch_packing import VISION_KEYS
from qwenvl_jax.models import registry
from qwenvl_jax.models.lora import with_adapters
from qwenvl_jax.train.loss import chunked_token_losses, next_token_targets


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepOptions:
  grad_accum: int = 1          # micro-batches per step (the batch's leading axis is split into them)
  loss_chunk: int = 512        # sequence chunk of the chunked cross-entropy
  z_loss: float = 0.0          # weight of lse**2 (keeps the softmax normaliser near 0)
  skip_nonfinite: bool = False  # True: a step with NaN/Inf loss or gradients leaves the state unchanged
  num_tasks: int = 0           # per-task answer-token loss and hit sums for task ids 1..num_tasks


def _loss_sums(model, params, batch: dict, opts: StepOptions, rng=None):
  """-> (objective sum, (ce sum, weight sum, per-task ce sums, per-task weights, per-task hits)); the per-task sums
  count the target tokens whose task id is k (the data marks only answer tokens with one)."""
  seg = batch["segment_ids"]
  positions = batch["positions"]
  if positions.ndim == 3:  # M-RoPE ids travel batch-major [B, 3, L]; the model takes [3, B, L]
    positions = positions.transpose(1, 0, 2)
  vision = {k: batch[k] for k in VISION_KEYS if k in batch}  # any-resolution: each row's packed patches
  hidden = model.apply({"params": params}, batch["input_ids"], attention_mask=seg > 0, positions=positions,
                       segment_ids=seg, pixel_values=batch.get("pixel_values"), inference=False, return_hidden=True,
                       rngs=None if rng is None else {"dropout": rng}, **vision)
  targets, w = next_token_targets(batch["input_ids"], batch["loss_mask"], seg)
  ce, lse, hit = chunked_token_losses(hidden, output_kernel(params), targets, opts.loss_chunk, with_hits=True)
  ce_sum = jnp.sum(ce * w)
  objective = ce_sum + opts.z_loss * jnp.sum(jnp.square(lse) * w)
  if opts.num_tasks:
    # position t predicts token t + 1: its task is token t + 1's (0 off the answers -> a row of zeros)
    task = jnp.concatenate([batch["task_ids"][:, 1:], jnp.zeros_like(batch["task_ids"][:, :1])], axis=1)
    onehot = jax.nn.one_hot(task - 1, opts.num_tasks) * w[..., None]
    hit = jax.lax.stop_gradient(hit)
    task_ce, task_w, task_hit = (jnp.einsum("bs,bsk->k", ce, onehot), jnp.sum(onehot, axis=(0, 1)),
                                 jnp.einsum("bs,bsk->k", hit, onehot))
  else:
    task_ce = task_w = task_hit = jnp.zeros((0,), jnp.float32)
  return objective, (ce_sum, jnp.sum(w), task_ce, task_w, task_hit)


def output_kernel(params) -> jax.Array:
  """[D, vocab] LM head kernel: `lm_head` or, with tied embeddings, the transposed token embedding."""
  if "lm_head" in params:
    return params["lm_head"]["kernel"]
  return params["wte"]["embedding"].T


def train_step(state: TrainState, batch: dict, frozen=None, *, model, tx: optax.GradientTransformation,
               schedule, opts: StepOptions) -> tuple[TrainState, dict]:
  """One optimizer step over `batch` (leading axis = global batch, split into `opts.grad_accum` micro-batches).

  The loss is the mean over all supervised tokens of the step (sums are accumulated, then divided once), so
  gradient accumulation gives the same update as one big batch. `frozen`: parameters the model takes besides the
  state's, never updated (a LoRA run's base, `train/lora.py`). Each micro-batch gets its own 'dropout' rng.
  """
  def objective(p, mb, micro):
    full = with_adapters(frozen, p) if frozen else p
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), micro)
    return _loss_sums(model, full, mb, opts, rng)
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  k = opts.grad_accum
  if k == 1:
    (_, aux), grads = grad_fn(state.params, batch, 0)
  else:
    micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero_aux = (jnp.zeros(()), jnp.zeros(())) + (jnp.zeros((opts.num_tasks,)),) * 3

    def body(carry, xs):
      g_acc, a_acc = carry
      mb, micro_index = xs
      (_, aux), g = grad_fn(state.params, mb, micro_index)
      return (jax.tree.map(lambda x, y: x + y.astype(jnp.float32), g_acc, g),
              jax.tree.map(jnp.add, a_acc, aux)), None

    (grads, aux), _ = jax.lax.scan(body, (zero_grads, zero_aux), (micro, jnp.arange(k)))
  ce_sum, n_tokens, task_ce, task_w, task_hit = aux
  denom = jnp.maximum(n_tokens, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
  new, metrics = apply_gradients(state, grads, ce_sum / denom, tx=tx, schedule=schedule, opts=opts)
  metrics.update(supervised_tokens=n_tokens, tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
                 task_loss_sum=task_ce, task_tokens=task_w, task_hits=task_hit)
  return new, metrics


def apply_gradients(state: TrainState, grads, loss: jax.Array, *, tx: optax.GradientTransformation, schedule,
                    opts: StepOptions) -> tuple[TrainState, dict]:
  """The optimizer update of every objective, with the NaN/Inf guard -> (new state, {loss, grad_norm, lr, finite})."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  # an update can overflow even when loss and gradients are finite (e.g. an absurd learning rate)
  # (checked element-wise: the norm of a huge but finite update overflows)
  updates_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & updates_finite
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  if opts.skip_nonfinite:
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
  return new, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite}


def contrastive_step(state: TrainState, batch: dict, frozen=None, *, model, head,
                     tx: optax.GradientTransformation, schedule, opts: StepOptions) -> tuple[TrainState, dict]:
  """One optimizer step of the contrastive stage (`train/contrastive.py`) over the global batch of image-text pairs
  (every other pair of the batch is a negative). `frozen` is unused (LoRA trains the generative objective)."""
  from qwenvl_jax.train.contrastive import contrastive_loss
  rng = jax.random.fold_in(state.rng, state.step)  # this step's stochastic depth (InternViT's drop path)
  loss, grads = jax.value_and_grad(lambda p: contrastive_loss(model, head, p, batch, rng))(state.params)
  new, metrics = apply_gradients(state, grads, loss, tx=tx, schedule=schedule, opts=opts)
  scale, _ = head.apply({"params": new.params["contrastive"]}, method="scale_bias")
  n = jnp.float32(batch["text_ids"].shape[0])
  metrics.update(supervised_tokens=n, tokens=jnp.sum(batch["text_mask"]).astype(jnp.float32),
                 task_loss_sum=jnp.zeros((0,)), task_tokens=jnp.zeros((0,)), task_hits=jnp.zeros((0,)),
                 logit_scale=scale)
  return new, metrics


def contrastive_flops(cfg, batch: int, text_len: int, processor) -> float:
  """Training FLOPs (3 x forward) of a contrastive step: the vision tower on `batch` images at the processor's size
  (the family's `image_flops`, its adapter included: an upper bound) and the decoder on `batch` captions of
  text_len tokens, without the LM head (the projections are negligible)."""
  fam = registry.family_of(cfg)
  return 3.0 * (batch * fam.image_flops(cfg, processor)
                + _decoder_flops(cfg, batch * text_len, batch * text_len * text_len, lm_head=False))


def _passes(frozen_base: bool) -> tuple[float, float]:
  """(decoder, vision) multiples of the forward FLOPs a step computes: 3 and 3 (forward, then gradients of the
  activations and of the weights); with a frozen base (LoRA) 2 and 1: no weight gradients besides the adapters'
  (negligible), and no backward at all through the vision path when nothing before the LLM trains."""
  return (2.0, 1.0) if frozen_base else (3.0, 3.0)


def flops_per_step(cfg, batch: int, seq_len: int, images: int, processor=None, frozen_base: bool = False) -> float:
  """Training FLOPs of one step = 3 x forward matmul FLOPs (backward = 2 x forward; frozen_base: see `_passes`).

  Decoder, per token: q/k/v/o 2*D*(2*H + 2*K)*Dh (K key/value heads), MLP 6*D*F, lm_head 2*D*V, causal attention
  2*S*H*Dh (scores + values over S/2 keys on average). Vision, per image: the family's `image_flops` at the
  processor's resolution (`processor`: what the data pipeline feeds; default the model's own). Padding images count
  (they are computed); embedding lookups and norms do not.
  """
  fam = registry.family_of(cfg)
  processor = fam.processor(cfg) if processor is None else processor
  dec, vis = _passes(frozen_base)
  return (dec * _decoder_flops(cfg, batch * seq_len, batch * seq_len * seq_len)
          + vis * images * fam.image_flops(cfg, processor))


def fed_flops(cfg, batch: dict, frozen_base: bool = False) -> float:
  """Training FLOPs (3 x forward, or `_passes`) of what a packed any-resolution batch feeds: the decoder over its
  real tokens with causal attention within each sample, the vision path over its real patches with attention within
  each image (the family's `batch_vision_flops`). Padding is computed but not counted: MFU counts useful work."""
  lengths = segment_lengths(batch["segment_ids"])
  dec, vis = _passes(frozen_base)
  return (dec * _decoder_flops(cfg, int(lengths.sum()), int(np.square(lengths).sum()))
          + vis * registry.family_of(cfg).batch_vision_flops(cfg, batch))


def _decoder_flops(cfg, tokens: int, attention_pairs: int, lm_head: bool = True) -> float:
  """Forward decoder FLOPs over `tokens` tokens whose causal attention spans `attention_pairs` / 2 (query, key)
  pairs (the sum of squared sample lengths; a full row of S: S^2)."""
  spec = cfg.decoder
  d, dh, qh, kh = spec.hidden, spec.head_dim, spec.heads, spec.kv_heads
  per_token = spec.num_layers * (2 * d * (2 * qh + 2 * kh) * dh + 6 * d * spec.mlp_dim) + 2 * d * cfg.vocab_size * lm_head
  return float(tokens * per_token + spec.num_layers * 2 * attention_pairs * qh * dh)

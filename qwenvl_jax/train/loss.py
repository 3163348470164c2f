"""Next-token cross-entropy over supervised tokens, computed in sequence chunks.

Logits are formed chunk by chunk in float32 ([B, chunk, vocab] at a time) under `jax.checkpoint`, so neither the
forward nor the backward pass holds [B, S, vocab] float32 logits (151,936 columns for the real vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(input_ids, loss_mask, segment_ids):
  """-> (targets [B, S], weights [B, S] float32): position t predicts token t+1 of the same sample."""
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  nxt_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
  nxt_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  weights = (nxt_mask > 0) & (nxt_seg == segment_ids) & (segment_ids > 0)
  return targets, weights.astype(jnp.float32)


def chunked_token_losses(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int = 512,
                         with_hits: bool = False):
  """hidden [B, S, D] (final, after ln_f), kernel [D, V] (lm_head), targets [B, S] ->
  (cross-entropy [B, S], log-partition lse [B, S]), both float32; with_hits adds hits [B, S] float32: 1 where the
  target is the arg-max (greedy decoding would write it; a tie counts as a hit)."""
  b, s, d = hidden.shape
  chunk = min(chunk, s)
  pad = (-s) % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = hidden.shape[1] // chunk
  hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)   # [n, B, c, D]
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)      # [n, B, c]

  @jax.checkpoint
  def one(h, t):
    logits = jnp.einsum("bcd,dv->bcv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    hit = (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return lse - picked, lse, hit

  out = jax.lax.map(lambda x: one(*x), (hs, ts))
  ce, lse, hit = (x.swapaxes(0, 1).reshape(b, -1)[:, :s] for x in out)
  return (ce, lse, hit) if with_hits else (ce, lse)

"""Generation with the KV cache for every family: one jitted prefill, then a jitted `lax.while_loop` of single-token
steps.

Prompts are left-padded to a bucketed length (multiples of `BUCKET`), so a chat does not recompile per prompt or per
token; positions count real tokens, so padding does not shift a row. The family's inputs module turns the padded
prompts and vision inputs into the prefill's arguments (`prepare`) and gives the arguments every forward of the
generation shares (`decode_kwargs`: Qwen-VL fixes the dynamic-NTK alpha at the prefill, from the longest prompt, as
the official code does). The cache carries each row's next position (M-RoPE rows continue after their largest
position id).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.nn.attention import KVCache

BUCKET = 64


def _bucket(n: int, b: int = BUCKET) -> int:
  return max(b, -(-n // b) * b)


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, length: int, pad_id: int):
  """Rows moved to the right end of `length` columns -> (ids [B, length], mask [B, length])."""
  b = input_ids.shape[0]
  ids = np.full((b, length), pad_id, np.int32)
  mask = np.zeros((b, length), np.int32)
  for r in range(b):
    real = input_ids[r][attention_mask[r].astype(bool)]
    ids[r, length - len(real):] = real
    mask[r, length - len(real):] = 1
  return ids, mask


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """logits [B, V] -> token ids [B]; temperature > 0; top_k = 0 and top_p = 1 disable those filters."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p (the top token always)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= top_p
  drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
  logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def cache_sharding(model, batch: int):
  """Sharding of the KV cache buffers [(L,) B, K, T, Dh] on the model's mesh: rows as the prompts (`batch_sharding`),
  key/value heads over `tensor` when it divides them (else replicated: grouped-query models with fewer key/value
  heads than the axis)."""
  if model.mesh is None:
    return None
  from jax.sharding import NamedSharding, PartitionSpec
  rows = tuple(model.batch_sharding(batch).spec)
  heads = "tensor" if model.config.decoder.kv_heads % model.mesh.shape["tensor"] == 0 else None
  spec = (rows[0] if rows else None, heads, None, None)
  return NamedSharding(model.mesh, PartitionSpec(*((None,) + spec if model.config.decoder.scan else spec)))


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "do_sample", "top_k", "kv_sharding"))
def _generate(params, ids, mask, prefill_kw, step_kw, rng, stop_ids, temperature, top_p, vocab_limit, *, module,
              max_new_tokens, do_sample, top_k, kv_sharding=None):
  spec = module.cfg.decoder
  b, p = ids.shape
  cache = KVCache.empty(spec.num_layers, b, p + max_new_tokens, spec.kv_heads, spec.head_dim, jnp.dtype(spec.dtype),
                        per_layer=not spec.scan)
  if kv_sharding is not None:
    cache = cache.replace(k=jax.lax.with_sharding_constraint(cache.k, kv_sharding),
                          v=jax.lax.with_sharding_constraint(cache.v, kv_sharding))
  logits, cache = module.apply({"params": params}, ids, attention_mask=mask, cache=cache, **prefill_kw, **step_kw)

  def pick(lg, key):
    # ids at or beyond vocab_limit (a traced scalar: no recompilation) are rows of the embedding without a token
    lg = jnp.where(jnp.arange(lg.shape[-1]) < vocab_limit, lg, -jnp.inf)
    if do_sample:
      return sample_logits(lg, key, temperature, top_k, top_p).astype(jnp.int32)
    return jnp.argmax(lg, axis=-1).astype(jnp.int32)

  rng, key = jax.random.split(rng)
  first = pick(logits[:, -1], key)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_ids)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, out, done, rng = carry
    last = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    lg, cache = module.apply({"params": params}, last, attention_mask=jnp.ones_like(last), cache=cache, **step_kw)
    rng, key = jax.random.split(rng)
    tok = pick(lg[:, -1], key)
    tok = jnp.where(done, stop_ids[0], tok)  # finished rows repeat the first stop id
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    return i + 1, cache, out, done | jnp.isin(tok, stop_ids), rng

  n, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done, rng))
  return out, n


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids=None, seed: int = 0,
             vocab_limit: int | None = None, **vision) -> np.ndarray:
  """Greedy or sampled continuation of a batch of prompts -> [B, S + n] ids (prompt as given, then n new tokens;
  rows that stopped early are filled with their first stop id). `vocab_limit`: only ids below it are generated (the
  tokenizer's vocabulary size when the embedding has more rows than it has ids). See `VLModel.generate`."""
  c = model.config
  ids = np.asarray(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if do_sample and not temperature > 0:
    raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
  if not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"top_p must be in (0, 1] and top_k >= 0; got top_p={top_p}, top_k={top_k}")
  if vocab_limit is not None and not 0 < vocab_limit:
    raise ValueError(f"vocab_limit must be positive, got {vocab_limit}")
  lengths = mask.sum(axis=1)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  longest = int(lengths.max())
  if longest + max_new_tokens > c.max_position_embeddings:
    raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context of "
                     f"{c.max_position_embeddings} (max_position_embeddings)")
  model.check_inputs(ids, mask, **vision)
  stop = np.asarray(sorted(set(int(s) for s in (stop_ids if stop_ids is not None else ()))) or [-1], np.int32)
  pad_id = int(stop[0]) if stop[0] >= 0 else 0
  padded, padded_mask = left_pad(ids, mask, _bucket(longest), pad_id)
  prefill_kw = model.check_inputs(padded, padded_mask, **vision)
  step_kw = model.family.inputs.decode_kwargs(c, longest)
  padded, padded_mask = jnp.asarray(padded), jnp.asarray(padded_mask)
  if model.mesh is not None:
    padded, padded_mask = jax.device_put((padded, padded_mask), model.batch_sharding(padded.shape[0]))
  with model.on_mesh():
    new, n = _generate(model.params, padded, padded_mask, prefill_kw, step_kw, jax.random.PRNGKey(seed),
                       jnp.asarray(stop), jnp.float32(temperature), jnp.float32(top_p),
                       jnp.int32(min(vocab_limit or c.vocab_size, c.vocab_size)), module=model.module,
                       max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=int(top_k),
                       kv_sharding=cache_sharding(model, padded.shape[0]))
  new = np.asarray(new)[:, :int(n)]
  return np.concatenate([ids.astype(np.int64), new.astype(np.int64)], axis=1)

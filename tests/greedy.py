"""Greedy decoding with the KV cache, as the official generate loop does it (test helper)."""

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.nn.attention import KVCache
from qwenvl_jax.nn.rotary import ntk_alpha


def greedy_decode(model, input_ids, pixel_values, n_new):
  """Prefill with a cache, then one token per step reusing the prefill's NTK alpha.

  Returns (new tokens [n_new], logits that chose each token [n_new, vocab], prompt logits [1, S, vocab]).
  """
  cfg, module, params = model.config, model.module, model.params
  ids = jnp.asarray(input_ids, jnp.int32)
  b, s = ids.shape
  cache = KVCache.empty(cfg.num_hidden_layers, b, s + n_new, cfg.num_attention_heads, cfg.head_dim,
                        jnp.float32)
  alpha = ntk_alpha(s, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
  prompt_logits, cache = module.apply({"params": params}, ids, pixel_values=pixel_values, cache=cache)
  step = jax.jit(lambda p, t, c: module.apply({"params": p}, t, cache=c, ntk_alpha_value=alpha))
  logits = [prompt_logits[:, -1]]
  tokens = [int(jnp.argmax(logits[-1][0]))]
  for _ in range(n_new - 1):
    out, cache = step(params, jnp.asarray([[tokens[-1]]], jnp.int32), cache)
    logits.append(out[:, -1])
    tokens.append(int(jnp.argmax(out[0, -1])))
  return np.array(tokens), np.asarray(jnp.concatenate(logits)), np.asarray(prompt_logits)

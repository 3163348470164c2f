"""Batch-1 decoding speed against transformers' Qwen2ForCausalLM of the same decoder dimensions, side by side.

    python bench/decode.py [--prompt 64 --new 128 --layers 4 --hidden 256 --heads 4 --mlp 512 --vocab 1024]

Both models are random, float32, on this machine's CPU (torch with as many threads as cores). Ours: `generate`
(jitted prefill + while_loop over the KV cache), greedy, text only, with unrolled layers (`qv.load(...,
scan_layers=False)`, what the inference CLI and eval.py use; the scanned training layout is timed too);
transformers: `generate` greedy with its KV cache and the same number of new tokens. Reported: time to first token
(the prefill + one token), decode tokens/s after the first token, and the ratio.
Compilation is excluded (one warm-up call each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def time_ours(cfg, prompt, n_new, repeats):
  import qwenvl_jax as qv
  model = qv.QwenVLModel.random(cfg, seed=0)
  ids = np.asarray(prompt)[None]
  model.generate(ids, max_new_tokens=1)
  model.generate(ids, max_new_tokens=n_new)  # compile both shapes
  ttft, total = [], []
  for _ in range(repeats):
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1)
    ttft.append(time.perf_counter() - t)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n_new)
    total.append(time.perf_counter() - t)
  assert out.shape[1] == len(prompt) + n_new
  return min(ttft), min(total)


def time_transformers(cfg, prompt, n_new, repeats):
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM

  torch.set_num_threads(os.cpu_count())
  hf_cfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=1e-6,
                       max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)
  model = Qwen2ForCausalLM(hf_cfg).eval()
  ids = torch.tensor([prompt])
  kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
  with torch.no_grad():
    model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
    ttft, total = [], []
    for _ in range(repeats):
      t = time.perf_counter()
      model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
      ttft.append(time.perf_counter() - t)
      t = time.perf_counter()
      out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
      total.append(time.perf_counter() - t)
  assert out.shape[1] == len(prompt) + n_new
  return min(ttft), min(total)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--mlp", type=int, default=512)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  from qwenvl_jax.models.qwen_vl.config import QWEN_VL_DEMO
  cfg = QWEN_VL_DEMO.replace(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             kv_channels=args.hidden // args.heads, intermediate_size=2 * args.mlp,
                             vocab_size=args.vocab, visual=dict(output_dim=args.hidden))
  prompt = list(np.random.default_rng(0).integers(300, args.vocab, size=args.prompt))
  rows = {"qwenvl_jax": time_ours(cfg.replace(scan_layers=False), prompt, args.new, args.repeats),
          "qwenvl_jax (scanned layers)": time_ours(cfg, prompt, args.new, args.repeats),
          "transformers Qwen2ForCausalLM": time_transformers(cfg, prompt, args.new, args.repeats)}
  print(f"decoder: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLP {args.mlp}, vocab {args.vocab}; "
        f"prompt {args.prompt} tokens, {args.new} new tokens, batch 1, float32, CPU")
  rates = {}
  for name, (ttft, total) in rows.items():
    rates[name] = (args.new - 1) / max(total - ttft, 1e-9)
    print(f"{name:>32s}: time to first token {ttft * 1e3:7.1f} ms   decode {rates[name]:8.1f} tokens/s")
  ours, ref = rates["qwenvl_jax"], rates["transformers Qwen2ForCausalLM"]
  print(f"decode speed ratio (ours / transformers): {ours / ref:.1f}x;  time-to-first-token ratio (transformers / "
        f"ours): {rows['transformers Qwen2ForCausalLM'][0] / rows['qwenvl_jax'][0]:.1f}x")


if __name__ == "__main__":
  main()

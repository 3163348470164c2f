"""Weight-only int8 (`qv.load(..., quantize="int8")` / `model.quantize("int8")`) against bfloat16, side by side in one
run, for each family on a small random model whose linear layers hold most of the bytes.

    python bench/quantize.py [--family all|qwen_vl|qwen2_vl] [--hidden 512 --layers 4 --heads 8 --mlp 1536
                             --vocab 4096 --prompts 16 --prompt 32 --new 32 --repeats 7]

Reported per family:
  * parameter bytes: bfloat16 model, its int8 model (int8 kernels + bfloat16 scales; embeddings, norms, biases
    bfloat16) and the ratio;
  * quality over --prompts random prompts: max |logit difference| over all prompt positions (and the logits' std for
    scale), greedy agreement (prompts whose --new greedy tokens are identical, and the mean number of leading tokens
    that agree);
  * CPU decode speed at batch 1: tokens/s after the first token ((new - 1) / (full call - first-token call)),
    medians of --repeats alternating calls, compilation excluded.

Random weights give flat next-token distributions, where a near-tie flips under any rounding; the mean top-1 -
top-2 logit margin is printed so the agreement can be read against it. Weights are drawn with a larger output
scale (--logit-scale, on the LM head) so that the model's distributions are about as peaked as a trained model's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(family: str, args):
  import jax

  import qwenvl_jax as qv
  from qwenvl_jax.models import registry
  if family == "qwen_vl":
    cfg = registry.get_config("qwen_vl_demo", num_hidden_layers=args.layers, hidden_size=args.hidden,
                              num_attention_heads=args.heads, kv_channels=args.hidden // args.heads,
                              intermediate_size=2 * args.mlp, vocab_size=args.vocab,
                              visual={"output_dim": args.hidden, "image_start_id": args.vocab - 10})
  else:
    cfg = registry.get_config("qwen2_vl_tiny", num_hidden_layers=args.layers, hidden_size=args.hidden,
                              num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                              intermediate_size=args.mlp, vocab_size=args.vocab, tie_word_embeddings=False,
                              vision_start_token_id=args.vocab - 10, vision_end_token_id=args.vocab - 9,
                              image_token_id=args.vocab - 8, video_token_id=args.vocab - 7,
                              bos_token_id=args.vocab - 6, eos_token_id=args.vocab - 5, pad_token_id=args.vocab - 4,
                              mrope_section=_mrope(args.hidden // args.heads), vision={"hidden_size": args.hidden})
  cfg = cfg.replace(scan_layers=False, param_dtype="bfloat16", dtype="bfloat16")
  model = qv.VLModel.random(cfg, seed=0)
  head = model.params["lm_head"]["kernel"]
  model.params["lm_head"]["kernel"] = (head.astype("float32") * args.logit_scale).astype(head.dtype)
  jax.block_until_ready(model.params)
  return model


def _mrope(head_dim: int):
  half = head_dim // 2
  hw = 3 * half // 8
  return (half - 2 * hw, hw, hw)


def quality(ref, other, prompts, n_new: int) -> dict:
  """`other` against `ref` over the prompts: logits and greedy continuations."""
  dev, std, same, lead, margin = 0.0, [], 0, [], []
  for p in prompts:
    a = np.asarray(ref.logits(p), np.float32)
    b = np.asarray(other.logits(p), np.float32)
    dev = max(dev, float(np.abs(a - b).max()))
    std.append(float(a.std()))
    top2 = np.sort(a[0], axis=-1)[:, -2:]
    margin.append(float((top2[:, 1] - top2[:, 0]).mean()))
    x = ref.generate(p, max_new_tokens=n_new)[0, p.shape[1]:]
    y = other.generate(p, max_new_tokens=n_new)[0, p.shape[1]:]
    differ = np.flatnonzero(x != y)
    same += int(differ.size == 0)
    lead.append(int(differ[0]) if differ.size else n_new)
  return {"max_logit_dev": dev, "logit_std": statistics.mean(std), "greedy_identical": same,
          "mean_leading_agree": statistics.mean(lead), "top2_margin": statistics.mean(margin)}


def float32_copy(model):
  """The same weights in float32 (compute too): the reference both rounded models are measured against."""
  import jax
  import jax.numpy as jnp

  import qwenvl_jax as qv
  cfg = model.config.replace(param_dtype="float32", dtype="float32")
  return qv.VLModel(cfg, jax.tree.map(lambda x: x.astype(jnp.float32), model.params))


def speed(models: dict, prompt, n_new: int, repeats: int) -> dict:
  """name -> decode tokens/s after the first token, timed in alternation (reversed every other repeat)."""
  calls = {name: (lambda m=m: m.generate(prompt, max_new_tokens=1),
                  lambda m=m: m.generate(prompt, max_new_tokens=n_new)) for name, m in models.items()}
  for first, full in calls.values():
    first()
    full()
  times = {name: ([], []) for name in calls}
  names = list(calls)
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      for call, got in zip(calls[name], times[name]):
        t = time.perf_counter()
        call()
        got.append(time.perf_counter() - t)
  return {name: (n_new - 1) / (statistics.median(b) - statistics.median(a)) for name, (a, b) in times.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--family", default="all", choices=["all", "qwen_vl", "qwen2_vl"])
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--mlp", type=int, default=1536)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--new", type=int, default=32)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--logit-scale", type=float, default=8.0)
  args = p.parse_args()
  families = ["qwen_vl", "qwen2_vl"] if args.family == "all" else [args.family]
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, args.vocab - 16, size=(1, args.prompt)) for _ in range(args.prompts)]
  for family in families:
    bf16 = build(family, args)
    int8 = bf16.quantize("int8")
    b16, b8 = bf16.param_bytes(), int8.param_bytes()
    f32 = float32_copy(bf16)
    print(f"{family}: hidden {args.hidden}, {args.layers} layers, mlp {args.mlp}, vocab {args.vocab}")
    print(f"  parameter bytes   bfloat16 {b16 / 1e6:8.2f} MB   int8 {b8 / 1e6:8.2f} MB   ratio {b8 / b16:.3f}")
    for name, ref, other in (("int8 vs bfloat16", bf16, int8), ("int8 vs float32", f32, int8),
                             ("bfloat16 vs float32", f32, bf16)):
      q = quality(ref, other, prompts, args.new)
      print(f"  {name:20s} max |logit diff| {q['max_logit_dev']:.4f} (logit std {q['logit_std']:.3f}, top-1 - "
            f"top-2 margin {q['top2_margin']:.3f}); greedy {q['greedy_identical']}/{len(prompts)} prompts identical "
            f"over {args.new} tokens, {q['mean_leading_agree']:.1f} leading tokens agree on average")
    s = speed({"bfloat16": bf16, "int8": int8}, prompts[0], args.new, args.repeats)
    print(f"  decode tokens/s   bfloat16 {s['bfloat16']:8.1f}   int8 {s['int8']:8.1f}   int8 / bfloat16 "
          f"{s['int8'] / s['bfloat16']:.2f}x", flush=True)


if __name__ == "__main__":
  main()

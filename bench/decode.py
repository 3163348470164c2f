"""Batch-1 decoding speed against transformers, side by side in one run: Qwen-VL's decoder against
`Qwen2ForCausalLM` of the same dimensions, Qwen2-VL (an image in the prompt) against
`Qwen2VLForConditionalGeneration` and InternVL (an image tile in the prompt) against
`InternVLForConditionalGeneration`, each with the same weights.

    python bench/decode.py [--rows all|qwen_vl|qwen2_vl|internvl] [--prompt 64 --new 128 --layers 4 --hidden 256 --heads 4
                            --kv-heads 2 --mlp 512 --vocab 1024 --image 112 --repeats 9 --threads N]

Everything is random, float32, on this machine's CPU; torch (and OpenMP) use --threads threads (default: all cores),
XLA its own pool over all cores. Both sides decode greedily with their KV cache, exactly --new tokens (no stop id).

Qwen-VL rows: ours `generate` (jitted prefill + while_loop over the KV cache), text only, with unrolled layers
(`scan_layers=False`, what the inference CLI and eval.py use) and with the scanned training layout; transformers'
`Qwen2ForCausalLM.generate` of the same decoder dimensions (its own random weights: speed only).

Qwen2-VL rows: a random transformers `Qwen2VLForConditionalGeneration` saved as safetensors and loaded by ours with
`qv.load(..., scan_layers=False)`, so both hold the same weights. The prompt is --prompt tokens: random text ids,
`<|vision_start|>`, the image's `<|image_pad|>` tokens, `<|vision_end|>`, more text; one random --image x --image
image, so the vision tower and M-RoPE positions are part of the prefill. transformers gets the same pixels, grid and
`mm_token_type_ids` (its M-RoPE needs them). Whether the greedy tokens agree is printed (random weights give flat
logits, so near-ties can split the two late; the agreement length is printed then).

InternVL rows: likewise a random transformers `InternVLForConditionalGeneration` (Qwen2 decoder of the dimensions
given, a 2-block InternViT of width 64 on one --image x --image tile) saved and loaded by ours; the prompt is text,
`<img>`, the tile's `<IMG_CONTEXT>` tokens, `</img>`, text.

Reported per row: time to first token (a generate call of one new token: vision + prefill + one token), decode
tokens/s after the first token ((new - 1) / (median full call - median first-token call)), and the ratios.
Compilation is excluded (one warm-up call of each shape); the timed calls alternate between the contenders, in
reversed order every other repeat, so load from other processes on the machine falls on all of them alike; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Special ids of the Qwen2-VL rows, inside the small vocabulary (the released ids are beyond it).
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 1000, 1001, 1002, 1003


def race(contenders: dict, repeats: int) -> dict:
  """contenders: name -> (first_token_call, full_call). Warm each up (compiles), then time them in alternation;
  -> name -> (median first-token seconds, median full-call seconds)."""
  for first, full in contenders.values():
    first()
    full()
  names = list(contenders)
  got = {name: ([], []) for name in names}
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      for call, times in zip(contenders[name], got[name]):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
  return {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in got.items()}


def ours_calls(model, n_new, **inputs):
  """(first-token call, full call) of our generate; the full call checks it produced exactly n_new tokens."""
  ids = inputs["input_ids"]

  def full():
    out = model.generate(max_new_tokens=n_new, **inputs)
    assert out.shape[1] == ids.shape[1] + n_new, out.shape
    return out
  return (lambda: model.generate(max_new_tokens=1, **inputs)), full


def transformers_calls(model, n_new, **inputs):
  """(first-token call, full call) of transformers' greedy generate with its KV cache and no early stop."""
  import torch
  kw = {"do_sample": False, "use_cache": True, "pad_token_id": 0, "eos_token_id": None}

  def gen(n):
    with torch.no_grad():
      return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kw)

  def full():
    out = gen(n_new)
    assert out.shape[1] == inputs["input_ids"].shape[1] + n_new, out.shape
    return out
  return (lambda: gen(1)), full


def qwen_vl_rows(args, prompt) -> dict:
  """Qwen-VL decoder (unrolled and scanned layers) vs transformers' Qwen2ForCausalLM of the same dimensions."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM

  import qwenvl_jax as qv
  from qwenvl_jax.models.qwen_vl.config import QWEN_VL_DEMO
  cfg = QWEN_VL_DEMO.replace(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             kv_channels=args.hidden // args.heads, intermediate_size=2 * args.mlp,
                             vocab_size=args.vocab, visual={"output_dim": args.hidden})
  # Qwen-VL's attention is multi-head, so the reference gets as many key/value heads as query heads.
  hf_cfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=1e-6,
                       max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)
  torch.manual_seed(0)
  ref = Qwen2ForCausalLM(hf_cfg).float().eval()
  ids = np.asarray(prompt, np.int64)[None]
  return race({"qwenvl_jax": ours_calls(qv.QwenVLModel.random(cfg.replace(scan_layers=False), seed=0), args.new,
                                        input_ids=ids),
               "qwenvl_jax (scanned layers)": ours_calls(qv.QwenVLModel.random(cfg, seed=0), args.new, input_ids=ids),
               "transformers Qwen2ForCausalLM": transformers_calls(ref, args.new, input_ids=torch.from_numpy(ids))},
              args.repeats)


def qwen2_vl_config(args):
  """A small Qwen2-VL of the decoder dimensions given, a 2-block vision tower and M-RoPE sections like the released
  ones (temporal 1/4, height and width 3/8 each of the rotary frequencies)."""
  from transformers import Qwen2VLConfig
  half = args.hidden // args.heads // 2
  hw = 3 * half // 8
  return Qwen2VLConfig(
    text_config={"vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.mlp,
                 "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                 "num_key_value_heads": args.kv_heads, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                 "bos_token_id": VIDEO_PAD + 1, "eos_token_id": VIDEO_PAD + 2, "pad_token_id": VIDEO_PAD + 3,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                     "mrope_section": [half - 2 * hw, hw, hw]}},
    vision_config={"depth": 2, "embed_dim": 64, "num_heads": 4, "hidden_size": args.hidden, "mlp_ratio": 2,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, image_token_id=IMAGE_PAD,
    video_token_id=VIDEO_PAD, tie_word_embeddings=False)


def qwen2_vl_rows(args) -> tuple[dict, int, int]:
  """Qwen2-VL with one image in the prompt: ours vs transformers' Qwen2VLForConditionalGeneration, same weights.
  -> (rows, image tokens, greedy tokens that agree from the start)."""
  import torch
  from PIL import Image
  from transformers import Qwen2VLForConditionalGeneration
  from transformers.utils import logging as hf_logging

  import qwenvl_jax as qv
  if VIDEO_PAD + 3 >= args.vocab:
    raise SystemExit(f"--vocab must exceed {VIDEO_PAD + 3} for the Qwen2-VL rows (its special ids)")
  torch.manual_seed(0)
  ref = Qwen2VLForConditionalGeneration(qwen2_vl_config(args)).float().eval()
  hf_logging.disable_progress_bar()  # its shard-writing bar would interleave with the table on the terminal
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp, safe_serialization=True)
    ours = qv.load(tmp, dtype="float32", scan_layers=False)
  proc = ours.processor()
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (args.image, args.image, 3), dtype=np.uint8))
  vis = proc(images=[image])
  n_img = proc.tokens(vis["image_grid_thw"][0])
  n_text = args.prompt - n_img - 2
  if n_text < 2:
    raise SystemExit(f"--prompt {args.prompt} leaves no room for text around the image's {n_img} tokens")
  text = rng.integers(0, VISION_START, size=n_text)
  ids = np.concatenate([text[:n_text // 2], [VISION_START], np.full(n_img, IMAGE_PAD), [VISION_END],
                        text[n_text // 2:]]).astype(np.int64)[None]
  ours_in = {"input_ids": ids, "pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}
  ref_in = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones_like(torch.from_numpy(ids)),
            "pixel_values": torch.from_numpy(vis["pixel_values"]),
            "image_grid_thw": torch.from_numpy(vis["image_grid_thw"]),
            "mm_token_type_ids": torch.from_numpy((ids == IMAGE_PAD).astype(np.int64))}
  contenders = {"qwenvl_jax Qwen2-VL": ours_calls(ours, args.new, **ours_in),
                "transformers Qwen2VLForCondGen": transformers_calls(ref, args.new, **ref_in)}
  a = np.asarray(contenders["qwenvl_jax Qwen2-VL"][1]())[0, ids.shape[1]:]
  b = contenders["transformers Qwen2VLForCondGen"][1]().numpy()[0, ids.shape[1]:]
  differ = np.flatnonzero(a != b)
  agree = int(differ[0]) if differ.size else len(a)
  return race(contenders, args.repeats), n_img, agree


def internvl_rows(args) -> tuple[dict, int, int]:
  """InternVL with one image tile in the prompt: ours vs transformers' InternVLForConditionalGeneration, same
  weights. -> (rows, image tokens, greedy tokens that agree from the start)."""
  import torch
  from transformers import InternVLConfig, InternVLForConditionalGeneration
  from transformers.utils import logging as hf_logging

  import qwenvl_jax as qv
  img_start, img_end, img_context = VISION_START, VISION_END, IMAGE_PAD
  text = {"model_type": "qwen2", "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.mlp,
          "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
          "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
  vision = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "image_size": [args.image, args.image], "patch_size": [14, 14]}
  torch.manual_seed(0)
  ref = InternVLForConditionalGeneration(InternVLConfig(text_config=text, vision_config=vision,
                                                        image_token_id=img_context)).float().eval()
  hf_logging.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp, safe_serialization=True)
    ours = qv.load(tmp, dtype="float32", scan_layers=False)
  n_img = ours.config.tokens_per_tile
  n_text = args.prompt - n_img - 2
  if n_text < 2:
    raise SystemExit(f"--prompt {args.prompt} leaves no room for text around the tile's {n_img} tokens")
  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(1, 3, args.image, args.image)).astype(np.float32)
  words = rng.integers(0, img_start, size=n_text)
  ids = np.concatenate([words[:n_text // 2], [img_start], np.full(n_img, img_context), [img_end],
                        words[n_text // 2:]]).astype(np.int64)[None]
  contenders = {"qwenvl_jax InternVL": ours_calls(ours, args.new, input_ids=ids, pixel_values=pixels),
                "transformers InternVLForCondGen": transformers_calls(
                    ref, args.new, input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(
                        torch.from_numpy(ids)), pixel_values=torch.from_numpy(pixels))}
  a = np.asarray(contenders["qwenvl_jax InternVL"][1]())[0, ids.shape[1]:]
  b = contenders["transformers InternVLForCondGen"][1]().numpy()[0, ids.shape[1]:]
  differ = np.flatnonzero(a != b)
  return race(contenders, args.repeats), n_img, int(differ[0]) if differ.size else len(a)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", choices=("all", "qwen_vl", "qwen2_vl", "internvl"), default="all")
  ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (Qwen2-VL: the image's tokens included)")
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=2, help="Qwen2-VL key/value heads (Qwen-VL's are --heads)")
  ap.add_argument("--mlp", type=int, default=512)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--image", type=int, default=112, help="side of the Qwen2-VL rows' square image and of the "
                  "InternVL rows' tile, pixels")
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  args = ap.parse_args()
  # OpenMP reads this when torch loads, so it is set before the first import of torch.
  os.environ["OMP_NUM_THREADS"] = str(args.threads)
  import torch
  torch.set_num_threads(args.threads)

  print(f"decoder: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLP {args.mlp}, vocab {args.vocab}; "
        f"prompt {args.prompt} tokens, {args.new} new tokens, batch 1, float32, CPU, {args.threads} torch threads, "
        f"median of {args.repeats}")

  def report(rows, ours, ref):
    rates = {}
    for name, (ttft, total) in rows.items():
      rates[name] = (args.new - 1) / max(total - ttft, 1e-9)
      print(f"{name:>32s}: time to first token {ttft * 1e3:7.1f} ms   decode {rates[name]:8.1f} tokens/s")
    print(f"{'':>32s}  decode speed ratio (ours / transformers): {rates[ours] / rates[ref]:.1f}x;  "
          f"time-to-first-token ratio (transformers / ours): {rows[ref][0] / rows[ours][0]:.1f}x")

  if args.rows in ("all", "qwen_vl"):
    prompt = list(np.random.default_rng(0).integers(300, args.vocab, size=args.prompt))
    print("Qwen-VL (text only; transformers: its own random weights)")
    report(qwen_vl_rows(args, prompt), "qwenvl_jax", "transformers Qwen2ForCausalLM")
  if args.rows in ("all", "qwen2_vl"):
    rows, n_img, agree = qwen2_vl_rows(args)
    print(f"Qwen2-VL ({args.kv_heads} key/value heads; one {args.image}x{args.image} image = {n_img} of the prompt's "
          f"tokens; same weights): greedy tokens "
          + ("all agree" if agree == args.new else f"agree for the first {agree} of {args.new}"))
    report(rows, "qwenvl_jax Qwen2-VL", "transformers Qwen2VLForCondGen")
  if args.rows in ("all", "internvl"):
    rows, n_img, agree = internvl_rows(args)
    print(f"InternVL ({args.kv_heads} key/value heads; one {args.image}x{args.image} tile = {n_img} of the prompt's "
          f"tokens; same weights): greedy tokens "
          + ("all agree" if agree == args.new else f"agree for the first {agree} of {args.new}"))
    report(rows, "qwenvl_jax InternVL", "transformers InternVLForCondGen")


if __name__ == "__main__":
  main()

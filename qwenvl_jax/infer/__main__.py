"""Chat with a Qwen-VL or Qwen2-VL checkpoint from the command line.

    python -m qwenvl_jax.infer --checkpoint DIR --image a.png --prompt "Describe the image."
    python -m qwenvl_jax.infer --checkpoint DIR                 # interactive: type questions, /image PATH, /reset
    python -m qwenvl_jax.infer --checkpoint DIR --mesh 1,1,8 ...  # weights sharded over 8 devices, tensor-parallel
    python -m qwenvl_jax.infer --checkpoint DIR --quantize int8 ...  # int8 linear weights (half of bfloat16)
    python -m qwenvl_jax.infer --plan --model qwen_vl_7b --devices v5e-1 --dtype int8 --batch 1 --context 2048

DIR is an HF folder (Qwen-VL: qwen.tiktoken; Qwen2-VL: tokenizer.json), this project's checkpoint, or a train.py
workdir (one stage). Boxes in an answer are drawn on the image and saved as PNG (--boxes_out). Bad input (a missing
or unreadable image, a FIFO or device as --image, text that is not valid Unicode) is one `error:` line, exit 2 (in
interactive mode the session goes on); bad option values are usage errors; Ctrl-C ends quietly with exit 130.
"""

from __future__ import annotations

import argparse
import os
import sys


def _answer(model, tok, query, history, images, args):
  from qwenvl_jax.data.boxes import BOX_RE
  from qwenvl_jax.data.images import load_image
  from qwenvl_jax.infer.chat import chat
  from qwenvl_jax.infer.grounding import draw_grounding, parse_grounding

  kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p)
  response, history = chat(model, tok, query, history=history, images=images, **kw)
  print(response, flush=True)
  last_image = next((i for i in reversed(images or []) if isinstance(i, str)), None)
  if last_image and BOX_RE.search(response):
    image = load_image(last_image)
    boxes = parse_grounding(response, *image.size)
    out = args.boxes_out or os.path.splitext(os.path.basename(last_image))[0] + "_boxes.png"
    draw_grounding(image, response, out)
    print(f"[{len(boxes)} box(es) drawn on {out}]", file=sys.stderr)
  return history


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m qwenvl_jax.infer", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", default=None, help="HF folder, this project's checkpoint or a train.py workdir")
  p.add_argument("--tokenizer", default=None, help="default: the one stored with the checkpoint")
  p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
  p.add_argument("--prompt", default=None, help="one question; without it: interactive mode")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default float32); --plan also int8 (default "
                 "bfloat16)")
  p.add_argument("--boxes_out", default=None, help="PNG path for drawn boxes (default: <image>_boxes.png)")
  p.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR device mesh, e.g. 1,1,8: weights are loaded straight "
                 "into their shards and decoding runs tensor-parallel (default: one device)")
  p.add_argument("--quantize", default=None, choices=["int8"], help="weight-only int8 linear layers, quantized as "
                 "the weights are read (with --mesh too)")
  g = p.add_argument_group("memory plan (--plan: per-device bytes, no model is loaded)")
  g.add_argument("--plan", action="store_true")
  g.add_argument("--model", default=None, help="a named config (e.g. qwen_vl_7b, qwen2_vl_7b) or a checkpoint path")
  g.add_argument("--devices", default=None, help="a TPU slice: v2-8, v3-8, v4-8, v5e-1, v5e-4, v5e-8, v5p-8, v6e-1 ...")
  g.add_argument("--batch", type=int, default=1)
  g.add_argument("--context", type=int, default=2048, help="prompt + new tokens held in the KV cache")
  args = p.parse_args(argv)
  if args.plan:
    return _plan(args)
  if args.checkpoint is None:
    p.error("--checkpoint is required (or --plan)")
  if args.dtype not in (None, "float32", "bfloat16"):
    p.error(f"--dtype {args.dtype}: float32 or bfloat16")
  if not args.temperature >= 0:  # NaN too
    p.error(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
  if args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
    p.error(f"--top_k {args.top_k}, --top_p {args.top_p}, --max_new_tokens {args.max_new_tokens}: need top_k >= 0, "
            "0 < top_p <= 1 and max_new_tokens >= 1")
  args.dtype = args.dtype or "float32"
  try:
    return _chat(args)
  except KeyboardInterrupt:  # Ctrl-C while loading or answering: no traceback
    print(file=sys.stderr)
    return 130


def _chat(args) -> int:
  try:
    import qwenvl_jax as qv
    from qwenvl_jax.api import find_tokenizer
    from qwenvl_jax.data.hf_tokenizer import find_tokenizer_json
    from qwenvl_jax.data.images import load_image
    from qwenvl_jax.data.special_tokens import check_unicode

    if not os.path.exists(args.checkpoint):
      raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    for img in args.image:
      load_image(img)  # fail early, with the image's name, before loading the model
    if args.prompt is not None:
      check_unicode(args.prompt)  # bytes that are not UTF-8 in argv arrive as lone surrogates
    tok_path = args.tokenizer or find_tokenizer(args.checkpoint) or find_tokenizer_json(args.checkpoint)
    if tok_path is None:
      raise FileNotFoundError(f"no tokenizer found with {args.checkpoint}; pass --tokenizer")
    mesh = None
    if args.mesh:
      from qwenvl_jax.sharding import parse_mesh
      mesh = parse_mesh(args.mesh)
    model = qv.load(args.checkpoint, dtype=args.dtype, scan_layers=False, mesh=mesh,  # unrolled: faster decoding
                    quantize=args.quantize)
    tok = qv.load_tokenizer(tok_path, image_span=model.processor().fixed_image_tokens)
    if args.prompt is not None:
      _answer(model, tok, args.prompt, None, args.image, args)
      return 0
    history, images = None, list(args.image)
    print("Type a question; /image PATH adds an image to the next question, /reset starts over, /quit ends.",
          file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused by the tokenizer, not the loop
      sys.stdin.reconfigure(errors="surrogateescape")
    for line in sys.stdin:
      line = line.strip()
      if not line:
        continue
      if line in ("/quit", "/exit"):
        break
      if line == "/reset":
        history, images = None, []
        continue
      if line.startswith("/image "):
        path = line[len("/image "):].strip()
        try:
          load_image(path)
          images.append(path)
        except ValueError as e:
          print(f"error: {e}", file=sys.stderr)
        continue
      try:
        history = _answer(model, tok, line, history, images, args)
        images = []
      except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _plan(args) -> int:
  from qwenvl_jax.infer.plan import describe, plan
  try:
    if not args.model or not args.devices:
      raise ValueError("--plan needs --model and --devices")
    mesh = None
    if args.mesh:
      try:
        mesh = tuple(int(v) for v in args.mesh.split(","))
      except ValueError:
        raise ValueError(f"mesh {args.mesh!r}: expected three sizes DATA,FSDP,TENSOR such as 1,1,8") from None
    model = args.model
    if os.path.exists(model):  # a checkpoint: its config.json, no weight read
      import qwenvl_jax as qv
      model = qv.load_config(model)
    print(describe(plan(model, args.devices, args.dtype or "bfloat16", args.batch, args.context, mesh)))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

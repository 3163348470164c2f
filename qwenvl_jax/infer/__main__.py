"""Chat with a Qwen-VL or Qwen2-VL checkpoint from the command line.

    python -m qwenvl_jax.infer --checkpoint DIR --image a.png --prompt "Describe the image."
    python -m qwenvl_jax.infer --checkpoint DIR                 # interactive: type questions, /image PATH, /reset

DIR is an HF folder (Qwen-VL: qwen.tiktoken; Qwen2-VL: tokenizer.json), this project's checkpoint, or a train.py
workdir (one stage). Boxes in an answer are drawn on the image and saved as PNG (--boxes_out).
"""

from __future__ import annotations

import argparse
import os
import sys


def _answer(model, tok, query, history, images, args):
  from qwenvl_jax.data.boxes import BOX_RE
  from qwenvl_jax.infer.chat import chat
  from qwenvl_jax.infer.grounding import draw_grounding, parse_grounding

  kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p)
  response, history = chat(model, tok, query, history=history, images=images, **kw)
  print(response, flush=True)
  last_image = next((i for i in reversed(images or []) if isinstance(i, str)), None)
  if last_image and BOX_RE.search(response):
    from PIL import Image
    with Image.open(last_image) as im:
      size = im.size
    boxes = parse_grounding(response, *size)
    out = args.boxes_out or os.path.splitext(os.path.basename(last_image))[0] + "_boxes.png"
    draw_grounding(last_image, response, out)
    print(f"[{len(boxes)} box(es) drawn on {out}]", file=sys.stderr)
  return history


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m qwenvl_jax.infer", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--tokenizer", default=None, help="default: the one stored with the checkpoint")
  p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
  p.add_argument("--prompt", default=None, help="one question; without it: interactive mode")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--boxes_out", default=None, help="PNG path for drawn boxes (default: <image>_boxes.png)")
  args = p.parse_args(argv)
  try:
    import qwenvl_jax as qv
    from qwenvl_jax.api import find_tokenizer
    from qwenvl_jax.data.images import load_image

    if not os.path.exists(args.checkpoint):
      raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    for img in args.image:
      load_image(img)  # fail early, with the image's name, before loading the model
    tok_path = args.tokenizer or find_tokenizer(args.checkpoint)
    if tok_path is None:
      raise FileNotFoundError(f"no tokenizer found with {args.checkpoint}; pass --tokenizer")
    model = qv.load(args.checkpoint, dtype=args.dtype, scan_layers=False)  # unrolled layers decode faster
    tok = qv.load_tokenizer(tok_path, image_span=model.processor().fixed_image_tokens)
    if args.prompt is not None:
      _answer(model, tok, args.prompt, None, args.image, args)
      return 0
    history, images = None, list(args.image)
    print("Type a question; /image PATH adds an image to the next question, /reset starts over, /quit ends.",
          file=sys.stderr)
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


if __name__ == "__main__":
  sys.exit(main())

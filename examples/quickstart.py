"""Quick start on the embedded tiny Qwen-VL (no downloads).

    python examples/quickstart.py

Loads the tiny random Qwen-VL shipped in tests/fixtures (official HF layout), encodes its images, runs the
model on a padded two-row batch with three images, checks the logits against the official PyTorch outputs
stored next to it, converts it HF -> Orbax -> HF, and prints the parameter count of the real 7B config.
"""

import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qwenvl_jax as qv  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "qwen_vl_tiny")


def main():
  t0 = time.time()
  model = qv.load(FIXTURE, dtype="float32")
  case = np.load(os.path.join(FIXTURE, "case_batch.npz"))
  print(f"loaded {FIXTURE} in {time.time() - t0:.1f}s: {qv.count_params(model.config):,} parameters")

  feats = np.asarray(model.encode_images(case["pixel_values"]))
  print(f"encode_images {case['pixel_values'].shape} -> {feats.shape}; "
        f"max |diff| vs official = {np.abs(feats - case['vision_features']).max():.2e}")

  logits = np.asarray(model.logits(case["input_ids"], case["attention_mask"], case["pixel_values"]))
  real = case["attention_mask"].astype(bool)
  print(f"logits {case['input_ids'].shape} -> {logits.shape}; "
        f"max |diff| vs official = {np.abs(logits - case['logits'])[real].max():.2e}")

  with tempfile.TemporaryDirectory() as tmp:
    model.save(os.path.join(tmp, "ckpt"))
    back = qv.load(os.path.join(tmp, "ckpt"))
    files = qv.export_hf(back, os.path.join(tmp, "hf"), dtype="float32")
    again = qv.load(os.path.join(tmp, "hf"))
    args = (case["input_ids"], case["attention_mask"], case["pixel_values"])
    same = np.array_equal(np.asarray(again.logits(*args)), logits)
    print(f"HF -> Orbax -> HF ({', '.join(files)}): identical logits = {same}")

  print(f"qwen_vl_7b parameters (from the config alone): {qv.count_params('qwen_vl_7b'):,}")


if __name__ == "__main__":
  main()

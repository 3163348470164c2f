"""Qwen2-VL stage 2 (multi-task pre-training): everything trainable on images, videos, interleaved and text data.

    python train.py --config=configs/qwen2_vl_stage2.py --workdir=DIR2 \
        --config.init.path=DIR1 --config.data.path=multitask.jsonl --config.data.tokenizer=/ckpt/Qwen2-VL-7B
    python train.py --config=configs/qwen2_vl_stage2.py --dry_run --config.mesh.fsdp=64

From the Qwen2-VL paper: all parameters are unfrozen and trained on a further ~800B tokens (image-text, OCR, VQA,
video dialogue, grounding, interleaved and text-only data), videos sampled at 2 fps with at most 16384 visual
tokens each (the processor's `video_fps` / `video_max_tokens`). Learning rate, rows and the ViT's layer-wise decay
(0.95) are our choice, as in Qwen-VL's stage 2. Starts from the stage-1 workdir (init.source=checkpoint) or an HF
folder (init.source=hf). Expected: every task's loss (loss/<task> when the data names tasks) decreasing.
"""

from qwenvl_jax.models.qwen2_vl.config import STAGE_FREEZE, STAGE_PIXELS
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen2_vl_7b"
  c.model.remat_policy = "full"
  c.init.update(source="checkpoint", path="")
  c.data.update(source="jsonl", tokenizer="", mode="chat", seq_len=4096, patch_budget=4096,
                max_images=8, **STAGE_PIXELS, batch_size=128)
  c.optim.update(lr=5e-5, min_lr=1e-5, warmup_steps=400, total_steps=50_000, freeze=STAGE_FREEZE["stage2"])
  c.mesh.update(data=1, fsdp=8, tensor=1)
  return c

"""Qwen2-VL stage 1 (vision pre-training): the ViT and the merger learn on image-text pairs, the LLM is frozen.

    python train.py --config=configs/qwen2_vl_stage1.py --workdir=DIR1 \
        --config.init.path=/ckpt/Qwen2-VL-7B --config.data.path=captions.jsonl \
        --config.data.tokenizer=/ckpt/Qwen2-VL-7B --config.mesh.fsdp=64
    python train.py --config=configs/qwen2_vl_stage1.py --dry_run --config.mesh.fsdp=64   # memory plan only

From the Qwen2-VL paper: the LLM starts from Qwen2 and the ViT (675M) from DFN's with 2-D RoPE in place of its
absolute positions; stage 1 trains only the vision side on ~600B tokens of image-text pairs, OCR and
classification data, with the loss on text tokens (here one-turn ChatML samples, the family's one layout); images
keep their aspect ratio (naive dynamic resolution).
The paper publishes no learning rates, batch sizes or sequence lengths: those below (AdamW 0.9/0.98, lr 2e-4 cosine
to 1e-6, 4096-token rows with up to 4096 ViT patches each, images within 56x56 px and 1024 visual tokens) are our
choice, scaled from Qwen-VL's stage 1. Expected: caption loss falling steadily; the frozen LLM's optimizer state
is absent (see the dry-run plan).
"""

from qwenvl_jax.models.qwen2_vl.config import STAGE_FREEZE, STAGE_PIXELS
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen2_vl_7b"
  c.model.remat_policy = "full"  # recompute activations in the backward pass: 4096-token rows need it
  c.init.update(source="hf", path="")
  c.data.update(source="jsonl", tokenizer="", mode="chat", seq_len=4096, patch_budget=4096,
                max_images=8, **STAGE_PIXELS, batch_size=256)
  c.optim.update(lr=2e-4, min_lr=1e-6, warmup_steps=500, total_steps=50_000, freeze=STAGE_FREEZE["stage1"])
  c.mesh.update(data=1, fsdp=8, tensor=1)
  return c

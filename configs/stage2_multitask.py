"""Qwen-VL stage 2 (multi-task pre-training): 448 px images, everything trainable, ChatML multi-task mix.

    python train.py --config=configs/stage2_multitask.py --workdir=DIR2 \
        --config.init.path=DIR1 --config.data.path=multitask.jsonl --config.data.tokenizer=/ckpt/Qwen-VL
    python train.py --config=configs/stage2_multitask.py --dry_run --config.mesh.fsdp=64

Paper recipe: lr 5e-5 -> 1e-5 cosine, warmup 400, rows of 2048 tokens packing several samples, ViT layer-wise LR
decay 0.95. Starts from the stage-1 workdir (init.source=checkpoint) or an imported HF checkpoint (init.source=hf).
Expected: every task's loss (logged as loss/<task> when the data names tasks) decreasing.
"""

from qwenvl_jax.models.qwen_vl.config import STAGE_FREEZE
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen_vl_7b"
  c.model.remat_policy = "full"  # recompute activations in the backward pass: a 7B at 2048 tokens needs it
  c.init.update(source="checkpoint", path="")
  c.data.update(source="jsonl", tokenizer="", mode="chat", image_size=448, seq_len=2048, max_images=8, batch_size=64)
  c.optim.update(lr=5e-5, min_lr=1e-5, warmup_steps=400, total_steps=19_000, freeze=STAGE_FREEZE["stage2"])
  c.mesh.update(data=1, fsdp=8, tensor=1)
  return c

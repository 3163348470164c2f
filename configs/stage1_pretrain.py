"""Qwen-VL stage 1 (pre-training): 224 px images, LLM frozen, ViT + adapter trained on image-caption pairs.

    python train.py --config=configs/stage1_pretrain.py --workdir=gs://bucket/qwenvl/stage1 \
        --config.data.source=jsonl --config.data.path=captions.jsonl --config.data.tokenizer=/ckpt/Qwen-VL \
        --config.init.source=hf --config.init.path=/ckpt/Qwen-VL --config.mesh.fsdp=64
    python train.py --config=configs/stage1_pretrain.py --dry_run --config.mesh.fsdp=64   # memory plan only

Paper recipe: AdamW (0.9, 0.98, eps 1e-6), weight decay 0.05, lr 2e-4 -> 1e-6 cosine, warmup 500, packed rows of
512 tokens, images in the pre-training form `<img>...</img>caption<|endoftext|>`. Expected: caption loss falling
steadily (the paper trains 50k steps on 1.4B pairs with a global batch of 30720 images).
"""

from qwenvl_jax.models.qwen_vl.config import STAGE_FREEZE
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen_vl_7b"
  c.model.remat_policy = "full"  # recompute activations in the backward pass: a 7B at 2048 tokens needs it
  c.init.source = "random"
  c.data.update(source="jsonl", tokenizer="", mode="pretrain", image_size=224, seq_len=512, max_images=8,
                batch_size=256)
  c.optim.update(lr=2e-4, min_lr=1e-6, warmup_steps=500, total_steps=50_000, freeze=STAGE_FREEZE["stage1"])
  c.mesh.update(data=1, fsdp=8, tensor=1)
  return c

"""Qwen-VL stage 3 (supervised fine-tuning, Qwen-VL-Chat): ViT frozen, ChatML conversations, 448 px.

    python train.py --config=configs/stage3_sft.py --workdir=DIR3 \
        --config.init.path=DIR2 --config.data.path=chat.json --config.data.tokenizer=/ckpt/Qwen-VL
    python train.py --config=configs/stage3_sft.py --dry_run --config.mesh.fsdp=64

Paper recipe: lr 1e-5 -> 1e-6 cosine, warmup 3000, rows of 2048 tokens, loss on assistant turns only (official
finetune masks). Data in the official finetune JSON format works unchanged (data.source=jsonl). Expected: assistant
loss decreasing; the chat model answers in ChatML.

Freezing: the paper's wording ("freeze the visual encoder, optimise the LLM and the adapter"), with the resampler's
2-D sin-cos table kept fixed as the official Resampler creates it; the ViT's ln_post and proj, which sit after the
resampler, train with the adapter. The official finetune.py's `fix_vit` differs on both points (it re-enables the
whole attn_pool, pos_embed included, and leaves ln_post/proj frozen); configs/finetune_*.py follow that code, as
fine-tuning a released checkpoint should (STAGE_FREEZE["finetune"]).
"""

from qwenvl_jax.models.qwen_vl.config import STAGE_FREEZE
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen_vl_7b"
  c.model.remat_policy = "full"  # recompute activations in the backward pass: a 7B at 2048 tokens needs it
  c.init.update(source="checkpoint", path="")
  c.data.update(source="jsonl", tokenizer="", mode="chat", image_size=448, seq_len=2048, max_images=8, batch_size=32)
  c.optim.update(lr=1e-5, min_lr=1e-6, warmup_steps=3000, total_steps=8_000, freeze=STAGE_FREEZE["stage3"])
  c.mesh.update(data=1, fsdp=8, tensor=1)
  return c

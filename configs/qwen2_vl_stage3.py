"""Qwen2-VL stage 3 (instruction tuning, Qwen2-VL-Instruct): the ViT frozen, the LLM and the merger trained on
ChatML conversations.

    python train.py --config=configs/qwen2_vl_stage3.py --workdir=DIR3 \
        --config.init.path=DIR2 --config.data.path=chat.json --config.data.tokenizer=/ckpt/Qwen2-VL-7B
    python train.py --config=configs/qwen2_vl_stage3.py --dry_run --config.mesh.fsdp=64

From the Qwen2-VL paper: the ViT is locked and the LLM fine-tuned on instruction data in ChatML (pure text
dialogue, multimodal conversation, document parsing, grounding, video, agent data); the loss is on the assistant's
answers and their <|im_end|>. The learning rate, rows and steps are our choice (Qwen-VL's stage 3 values). Data in
the official finetune JSON format works unchanged (data.source=jsonl). Expected: assistant loss decreasing; the
model answers in ChatML.
"""

from qwenvl_jax.models.qwen2_vl.config import STAGE_FREEZE, STAGE_PIXELS
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen2_vl_7b"
  c.model.remat_policy = "full"
  c.init.update(source="checkpoint", path="")
  c.data.update(source="jsonl", tokenizer="", mode="chat", seq_len=4096, patch_budget=4096,
                max_images=8, **STAGE_PIXELS, batch_size=64)
  c.optim.update(lr=1e-5, min_lr=1e-6, warmup_steps=3000, total_steps=8_000, freeze=STAGE_FREEZE["stage3"])
  c.mesh.update(data=1, fsdp=8, tensor=1)
  return c

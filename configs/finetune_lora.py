"""LoRA fine-tuning of Qwen-VL-Chat on one's own data, as the official finetune/finetune_lora_ds.sh runs it.

    python train.py --config=configs/finetune_lora.py --workdir=DIR \
        --config.init.path=/ckpt/Qwen-VL-Chat --config.data.path=train.json --config.data.tokenizer=/ckpt/Qwen-VL-Chat
    python train.py --config=configs/finetune_lora.py --dry_run --config.mesh.fsdp=8     # memory plan
    python -c "import qwenvl_jax as qv; m = qv.load('DIR'); qv.export_hf(m, 'merged'); qv.export_peft(m, 'peft')"

The official values (QwenLM/Qwen-VL finetune.py and finetune/finetune_lora_ds.sh):
- LoRA r 64, alpha 16, dropout 0.05 on c_attn, attn.c_proj, w1, w2 (the LLM's attention and the MLP's two input
  projections: Family.lora_targets), bias none;
- modules_to_save ["wte", "lm_head"]: the embedding and the LM head train in full (lora.trainable); nothing of the
  ViT or the resampler trains -- finetune.py applies fix_vit only without --use_lora, and PEFT freezes every
  parameter that is neither an adapter nor a module to save;
- AdamW lr 1e-5, weight decay 0.1, betas (0.9, 0.95), warmup ratio 0.01, cosine to 0, model_max_length 2048;
- 8 GPUs x batch 2 x gradient accumulation 8 = 128 conversations per step, 5 epochs, bf16, gradient checkpointing.
Data: the official finetune JSON (a list of {"conversations": [{"from": "user", "value": ...}, ...]}), read by
data.source=jsonl. total_steps = 5 epochs x conversations / 128 (set it for your data).
"""

from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(name="qwen_vl_7b", param_dtype="bfloat16", dtype="bfloat16", remat_policy="full")
  c.init.update(source="hf", path="")
  c.lora.update(rank=64, alpha=16.0, dropout=0.05, targets="", trainable=r"^(wte|lm_head)/", quantize="")
  c.data.update(source="jsonl", tokenizer="", mode="chat", image_size=448, seq_len=2048, max_images=8,
                batch_size=128)
  c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=0, warmup_ratio=0.01, total_steps=1000, b1=0.9, b2=0.95,
                 eps=1e-8, weight_decay=0.1, clip_norm=1.0, layer_decay=1.0, grad_accum=8)
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.checkpoint.update(every=1000, keep=10)
  return c

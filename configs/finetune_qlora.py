"""Q-LoRA fine-tuning of Qwen-VL-Chat, as the official finetune/finetune_qlora_ds.sh runs it.

    python train.py --config=configs/finetune_qlora.py --workdir=DIR \
        --config.init.path=/ckpt/Qwen-VL-Chat --config.data.path=train.json --config.data.tokenizer=/ckpt/Qwen-VL-Chat
    python train.py --config=configs/finetune_qlora.py --dry_run --config.mesh.fsdp=1     # one chip / GPU

The official run starts from Qwen-VL-Chat-Int4 (GPTQ 4-bit weights of the LLM's blocks; the ViT in half precision)
with the LoRA settings of configs/finetune_lora.py but no modules_to_save (only the adapters train) and fp16. Here
the float checkpoint is read and the LLM blocks' kernels are quantized as they are placed (lora.quantize: nf4 in
blocks of 64 as QLoRA; int8 and int4 too); a GPTQ checkpoint is not read. Same optimizer values: AdamW lr 1e-5,
weight decay 0.1, betas (0.9, 0.95), warmup ratio 0.01, cosine, model_max_length 2048, 128 conversations per step.
"""

import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location("finetune_lora", os.path.join(os.path.dirname(__file__),
                                                                              "finetune_lora.py"))
  lora = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lora)
  c = lora.get_config()
  c.lora.update(trainable="", quantize="nf4")
  return c

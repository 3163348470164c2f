"""LoRA on the shapes data from a trained demo checkpoint: a few CPU minutes on one weak task.

    python demo.py                                                     # the trained demo (workdir /tmp/qwenvl_demo)
    python train.py --config=configs/lora_demo.py --workdir=/tmp/lora_demo \
        --config.init.path=/tmp/qwenvl_demo/stage3 --config.data.tokenizer=/tmp/qwenvl_demo/tokenizer.model
    python eval.py --config=configs/lora_demo.py --checkpoint=/tmp/lora_demo \
        --tokenizer=/tmp/qwenvl_demo/tokenizer.model                  # base + adapters merged (qv.load)

Adapters of rank 16 (alpha 32, dropout 0.05) on the demo LLM's attention and MLP input projections (Qwen-VL's
official targets); the ViT, the resampler, the embedding and the head stay frozen. The data is one task (`data.mix`,
default the text questions: sums, differences, opposites, word lengths, sides); 150 steps of 8 rows of 256 tokens
at lr 1e-3.

Measured (a 164-step stage-2 demo checkpoint as the base, 2-core CPU shared with other work): the text questions'
exact match 0.090 -> 0.282 on the 500 test examples after 3 min 53 s of training. With `data.mix=vqa_count=1`
counting stayed at 0.368 -> 0.366: counting needs better visual features, and LoRA on the LLM leaves the vision path
as it is.
"""

from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(name="qwen_vl_demo", dtype="float32")
  c.init.update(source="checkpoint", path="")
  c.lora.update(rank=16, alpha=32.0, dropout=0.05, targets="", trainable="", quantize="")
  c.data.update(source="shapes", tokenizer="", mode="chat", image_size=112, seq_len=256, max_images=4, batch_size=8,
                num_records=20000, packing_window=256, mix="text=1")
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=150, layer_decay=1.0, weight_decay=0.0,
                 loss_chunk=256)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=150, keep=1)
  c.log.update(every=25)
  return c

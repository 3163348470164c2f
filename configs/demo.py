"""Tiny three-stage run on the embedded synthetic 'shapes' dataset (no downloads), on a 2-core CPU.

    python train.py --config=configs/demo.py --workdir=/tmp/qwenvl_demo

Stage 1 (LLM frozen, pre-training form, 112 px), stage 2 (all trainable, multi-task ChatML) and stage 3 (ViT frozen,
ChatML) each start from the previous one's last checkpoint, in workdir/stage{1,2,3}; a SentencePiece tokenizer
trained on the shapes texts is stored in the workdir. The loss should fall well below its starting value
(~6.9 = ln 1024) in every stage.
"""

import ml_collections

from qwenvl_jax.train.config import STAGE_FREEZE, base_config


def get_config():
  c = base_config()
  c.model.name = "qwen_vl_demo"
  c.model.dtype = "float32"
  c.data.update(source="shapes", tokenizer="shapes", image_size=112, seq_len=256, max_images=4, batch_size=8,
                num_records=20000, packing_window=256)
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=20, total_steps=200, layer_decay=0.95, loss_chunk=256)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=100, keep=2)
  c.log.every = 20
  c.stages = ("stage1", "stage2", "stage3")
  c.stage_overrides = ml_collections.ConfigDict({
      "stage1": {"data": {"mode": "pretrain"}, "optim": {"freeze": STAGE_FREEZE["stage1"], "total_steps": 200}},
      "stage2": {"data": {"mode": "chat"}, "optim": {"freeze": STAGE_FREEZE["stage2"], "total_steps": 300}},
      "stage3": {"data": {"mode": "chat"}, "optim": {"freeze": STAGE_FREEZE["stage3"], "total_steps": 100,
                                                     "lr": 3e-4, "min_lr": 3e-5}},
  })
  return c

"""Tiny Qwen2-VL on the embedded synthetic 'shapes' dataset (no downloads): any-resolution images and short videos,
trained on a 2-core CPU in minutes and evaluated by eval.py.

    python train.py --config=configs/qwen2_vl_demo.py --workdir=/tmp/qwen2_vl_demo
    python eval.py --config=configs/qwen2_vl_demo.py --checkpoint=/tmp/qwen2_vl_demo --max_examples=200

Images are drawn with sides of 56-112 px and keep them (naive dynamic resolution: 4-16 visual tokens each); the
`video_motion` task adds 6-frame videos (3 temporal patches, 27 visual tokens). Rows of 256 tokens pack several
samples with up to 256 ViT patches each. A Qwen2-style tokenizer.json is trained on the shapes texts into the
workdir (`data.tokenizer='shapes'`), its added tokens at the ids `qwen2_vl_demo` names.

One stage with everything trainable (the paper's stage 2 freezing): the LLM starts random, so the paper's stage 1
(LLM frozen) would have nothing to learn from (see configs/demo.py); the ViT and merger learn at 0.1x the LLM's
rate, as in the Qwen-VL demo, and without layer-wise decay.

Measured on 2 CPU cores: 400 steps in 11:00 (~1,150 tokens/s), loss 6.9 -> 1.03; eval.py on the 500 test examples
(34 s): caption CIDEr 0.91, VQA accuracy 0.36, two-image questions 0.59, video direction 0.26 (chance 0.25: the
videos are not learned yet), grounding acc@0.5 0.02, OCR exact match 0.05. Like the Qwen-VL demo, it learns captions
first; grounding, OCR and video need more than these minutes (the demo-quality work is the Qwen-VL demo's).
"""

from qwenvl_jax.models.qwen2_vl.config import STAGE_FREEZE
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(name="qwen2_vl_demo", dtype="float32")
  c.data.update(source="shapes", tokenizer="shapes", image_sides="56,112", min_pixels=56 * 56, max_pixels=112 * 112,
                seq_len=256, patch_budget=256, batch_size=8, num_records=20000, packing_window=256,
                mix="caption=0.14,vqa_color=0.1,vqa_shape=0.1,vqa_count=0.1,vqa_position=0.1,grounding=0.14,"
                    "grounded_caption=0.1,ocr=0.1,multi_image=0.07,text=0.05,video_motion=0.1")
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=20, total_steps=400, layer_decay=1.0, vision_lr_scale=0.1,
                 loss_chunk=256, freeze=STAGE_FREEZE["stage2"])
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=100, keep=2)
  c.log.every = 25
  return c

"""The contrastive alignment stage (InternVL's stage 1) on the embedded shapes captions, on a 2-core CPU.

    python train.py --config=configs/contrastive_demo.py --workdir=/tmp/contrastive_demo
    python eval.py --config=configs/contrastive_demo.py --checkpoint=/tmp/contrastive_demo   # zero-shot metrics
    python train.py --config=configs/demo.py --workdir=/tmp/qwenvl_demo \\
        --config.init.source=checkpoint --config.init.path=/tmp/contrastive_demo   # a generative stage from it

The demo's Qwen-VL model (`qwen_vl_demo`: 4-block ViT of width 192 at 112 px, 4-layer LLM of width 256) learns to
put a shapes image and its caption ("a red circle and a blue square.") close together: CLIP's symmetric InfoNCE over
batches of 64 pairs (each pair's 63 others are its negatives), image features = the ViT's tokens averaged, text
features = the LLM's hidden state at the caption's end-of-text token, both projected to 128 dimensions. Everything
is trained (the model starts random: nothing can be downloaded), the ViT and LLM at the same rate. Switch to
SigLIP's loss with --config.contrastive.loss=siglip, to another family with --config.model.name=qwen2_vl_demo or
internvl_tiny (their tokenizer.json is trained on the shapes texts into the workdir).

eval.py reports image -> text and text -> image recall@1/5 on the 500 test captions (a hit is any item with the
partner's caption: shapes captions repeat) with their chance levels, and zero-shot classification of one-object
images over the 18 prompts "a {colour} {shape}." (chance 1/18); README gives the figures this config reached.
The trained vision tower (and LLM) then start a generative stage of the same model: `init.source=checkpoint` on this
workdir reads its parameters and leaves the contrastive head behind.
"""

from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.mode = "contrastive"
  c.contrastive.update(loss="clip", embed_dim=128, text_pooling="last", text_len=24)
  c.model.name = "qwen_vl_demo"
  c.model.dtype = "float32"
  c.data.update(source="shapes", tokenizer="shapes", image_size=112, batch_size=64, num_records=20000,
                mix="caption=1")
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=20, total_steps=300, layer_decay=1.0, weight_decay=0.05,
                 freeze=())
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=100, keep=2)
  c.log.every = 25
  return c

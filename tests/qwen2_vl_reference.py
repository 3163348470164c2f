"""Test helper: tiny random transformers Qwen2-VL models and batches of prompts with images and videos, so tests
can compare against transformers beyond the committed goldens."""

import numpy as np

VISION_START, VISION_END, IMAGE, VIDEO, PAD = 200, 201, 202, 203, 204


def tiny_config(**text):
  """A transformers Qwen2VLConfig: 2-layer decoder of width 64 (GQA 4:1 by default), 2-block ViT of width 32."""
  from transformers import Qwen2VLConfig
  t = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "mrope_section": [2, 3, 3]}, max_position_embeddings=1024,
           rms_norm_eps=1e-6)
  t.update(text)
  tie = t.pop("tie_word_embeddings", False)
  return Qwen2VLConfig(text_config=t, vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2,
                                                         hidden_size=t["hidden_size"]),
                       vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, image_token_id=IMAGE,
                       video_token_id=VIDEO, tie_word_embeddings=tie)


def save_random_model(folder, seed=0, **text):
  """A random transformers model (every parameter perturbed, biases non-zero) saved to `folder`; returns it."""
  import torch
  from transformers import Qwen2VLForConditionalGeneration
  torch.manual_seed(seed)
  model = Qwen2VLForConditionalGeneration(tiny_config(**text)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(folder)
  return model


def batch(rows, seed=0, merge=2, patch_dim=1176):
  """rows: lists of items: int (that many random text tokens), ("image", h, w) or ("video", t, h, w) patch grids.
  -> dict of left-padded input_ids, attention_mask, mm_token_type_ids and random pixel arrays with grids."""
  rng = np.random.default_rng(seed)
  seqs, grids = [], {"image": [], "video": []}
  for row in rows:
    ids = []
    for item in row:
      if isinstance(item, int):
        ids += list(rng.integers(0, VISION_START, item))
        continue
      kind, *g = item
      grid = [1] + g if kind == "image" else g
      grids[kind].append(grid)
      n = int(np.prod(grid)) // merge ** 2
      ids += [VISION_START] + [IMAGE if kind == "image" else VIDEO] * n + [VISION_END]
    seqs.append(ids)
  s = max(map(len, seqs))
  out = {"input_ids": np.full((len(seqs), s), PAD, np.int64), "attention_mask": np.zeros((len(seqs), s), np.int64)}
  for r, ids in enumerate(seqs):
    out["input_ids"][r, s - len(ids):] = ids
    out["attention_mask"][r, s - len(ids):] = 1
  ids = out["input_ids"]
  out["mm_token_type_ids"] = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0)) * out["attention_mask"]
  for kind, (pix, grid) in {"image": ("pixel_values", "image_grid_thw"),
                            "video": ("pixel_values_videos", "video_grid_thw")}.items():
    if grids[kind]:
      g = np.asarray(grids[kind], np.int64)
      out[grid] = g
      out[pix] = rng.standard_normal((int(np.prod(g, axis=1).sum()), patch_dim)).astype(np.float32)
  return out


def reference_logits(model, b):
  """transformers logits [B, S, V] for a `batch` (5.23 positions: fine while every video has t <= max(h, w)/2)."""
  import torch
  kw = {k: torch.tensor(v) for k, v in b.items()}
  with torch.no_grad():
    return model(**kw).logits.float().numpy()


def ours(b):
  """The batch's arguments of `model.logits` / `model.generate` (no mm_token_type_ids)."""
  return {k: v for k, v in b.items() if k != "mm_token_type_ids"}


def reference_positions(cfg, ids, image_grids=None, video_grids=None):
  """transformers' `Qwen2VLModel.get_rope_index` over one sample `ids` [n] with our config `cfg`'s vision token ids
  -> [3, n] (5.23's rule: equal to the paper's while every video has t <= max(h, w) / merge)."""
  import torch
  from transformers import Qwen2VLConfig, Qwen2VLModel
  hf = Qwen2VLModel(Qwen2VLConfig(text_config=dict(vocab_size=512, hidden_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                   rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                    "rope_theta": 1e6}),
                                  vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64),
                                  image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                  vision_start_token_id=cfg.vision_start_token_id))
  t = torch.tensor(np.asarray(ids, np.int64)[None])
  types = (t == cfg.image_token_id).int() + 2 * (t == cfg.video_token_id).int()
  grids = {k: torch.tensor(np.asarray(g, np.int64)) if g is not None and len(g) else None
           for k, g in (("image_grid_thw", image_grids), ("video_grid_thw", video_grids))}
  pos, _ = hf.get_rope_index(t, types, attention_mask=torch.ones_like(t), **grids)
  return pos[:, 0].numpy()

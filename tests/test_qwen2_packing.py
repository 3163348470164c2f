"""Qwen2-VL any-resolution training data: samples (ChatML targets, vision blocks sized by each image's grid, M-RoPE
ids and patches equal to transformers' for the sample alone), packing on tokens and patches per row (no sample
crosses a row, every patch lands in its row's image slots, attention confined to each image and sample: a packed
batch's loss equals the samples' losses computed alone), bad input skipped and counted, exact resume."""

import io
import logging

import jax
import numpy as np
import PIL.Image
import pytest
from qwen2_tokenizer_fixture import build
from qwen2_vl_reference import reference_positions

import qwenvl_jax as qv
from qwenvl_jax.data.hf_tokenizer import HFTokenizer
from qwenvl_jax.data.patch_packing import assemble_batch, budget_for, num_patches, pack_batches
from qwenvl_jax.data.pipeline import DataConfig, build_patch_dataset
from qwenvl_jax.data.shapes import ShapesSource
from qwenvl_jax.models.qwen2_vl.inputs import qwen2_grounding
from qwenvl_jax.models.qwen2_vl.processor import Qwen2VLProcessor
from qwenvl_jax.models.qwen2_vl.samples import Qwen2VLSampleEncoder

SIDES = (40, 150)  # shapes images of 40-150 px sides: 4 to 25 merged tokens each under max_pixels 112 * 112


@pytest.fixture(scope="module")
def setup(q2_dir, tmp_path_factory):
  tok = HFTokenizer(build(str(tmp_path_factory.mktemp("q2_pack") / "tokenizer.json")))
  cfg = qv.load_config(q2_dir)
  proc = Qwen2VLProcessor.for_config(cfg, min_pixels=56 * 56, max_pixels=112 * 112)
  return tok, cfg, proc


def encoder(setup, patch_budget=4096, **data):
  tok, cfg, proc = setup
  return Qwen2VLSampleEncoder(tok, cfg, proc, DataConfig(**{"seq_len": 512, "batch_size": 2, **data}), patch_budget)


def video_record():
  frames = [PIL.Image.new("RGB", (84, 56), (30 * k, 200 - 30 * k, 90)) for k in range(4)]
  return {"id": "video-0", "videos": {"v0": frames}, "images": {},
          "conversations": [{"from": "user", "value": "Video 1: <video>v0</video>\nWhat changes?"},
                            {"from": "assistant", "value": "The colour."}]}


def test_pack_batches_uses_every_sample_once_within_both_budgets():
  rng = np.random.default_rng(0)
  tokens = rng.integers(10, 200, 1000)
  patches = 4 * rng.integers(0, tokens // 2 + 1) * (rng.random(1000) < 0.9)  # up to half the tokens visual; some text
  budget = int(np.ceil(patches.sum() / tokens.sum() * 512))  # the mix's patches per token: both can fill
  batches = pack_batches(tokens, patches, batch_size=4, seq_len=512, patch_budget=budget)
  used = [i for b in batches for row in b for i in row]
  assert sorted(used) == list(range(1000))
  for b in batches:
    assert len(b) == 4
    assert all(sum(tokens[i] for i in row) <= 512 and sum(patches[i] for i in row) <= budget and row == sorted(row)
               for row in b)
  full = batches[:-2]  # the window's last batches take what is left
  assert np.mean([sum(tokens[i] for r in b for i in r) / 2048 for b in full]) > 0.95
  assert np.mean([sum(patches[i] for r in b for i in r) / (4 * budget) for b in full]) > 0.95
  with pytest.raises(ValueError, match="exceeds a row of 512 tokens"):
    pack_batches([600], [0], 1, 512, 2048)


def test_sample_targets_blocks_and_positions_equal_transformers(setup):
  from transformers import Qwen2VLImageProcessorPil
  tok, cfg, proc = setup
  source = ShapesSource("train", 50, image_size=SIDES, mix=["grounding", "multi_image"])
  record = next(source[i] for i in range(50) if len(source[i]["images"]) >= 2)
  s = encoder(setup)(record)
  ids, grids = s["ids"], s["image_grid_thw"]
  # one <|vision_start|> block per image, as many <|image_pad|> as its grid makes; images keep their own sizes
  starts = np.flatnonzero(ids == cfg.vision_start_token_id)
  assert len(starts) == len(record["images"]) == len(grids)
  for k, start in enumerate(starts):
    n = int(np.prod(grids[k])) // 4
    assert (ids[start + 1:start + 1 + n] == cfg.image_token_id).all() and ids[start + 1 + n] == cfg.vision_end_token_id
  for g, im in zip(grids, record["images"].values()):
    assert tuple(g) == proc.image_grid(im.height, im.width)  # each image at its own smart_resize'd size
  # targets: every answer and its <|im_end|>, nothing else
  answers = [t["value"] for t in record["conversations"] if t["from"] == "assistant"]
  assert tok.decode(ids[s["loss_mask"] == 1]) == "".join(qwen2_grounding(a) + "<|im_end|>" for a in answers)
  # patches: transformers' image processor of each image; positions: its get_rope_index over the sample alone
  hf_proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
  ref = hf_proc(images=list(record["images"].values()), return_tensors="np")
  np.testing.assert_array_equal(ref["image_grid_thw"], grids)
  np.testing.assert_allclose(ref["pixel_values"], s["image_patches"], atol=1e-5)
  np.testing.assert_array_equal(reference_positions(cfg, ids, image_grids=grids), s["positions"])


@pytest.fixture(scope="module")
def packed(setup):
  """Shapes samples (and one video) packed into a batch of 2 rows of 160 tokens and 256 patches each."""
  enc = encoder(setup, patch_budget=256, seq_len=160)
  source = ShapesSource("train", 40, image_size=SIDES)
  samples = [x for x in (enc(source[i]) for i in range(40)) if x is not None] + [enc(video_record())]
  batches = pack_batches([len(x["ids"]) for x in samples], [num_patches(x) for x in samples], 2, 160, 256)
  rows = max(batches, key=lambda b: sum(len(r) for r in b))
  rows = [[samples[i] for i in r] for r in rows]
  if not any(len(x["video_patches"]) for r in rows for x in r):  # make sure the batch mixes images and a video
    rows[1] = [x for x in rows[1] if not len(x["image_patches"])] + [samples[-1]]
  return rows, assemble_batch(rows, 160, 256, setup[2].patch_dim, 2)


def test_packed_batch_places_every_patch_and_token(setup, packed):
  rows, b = packed
  cfg = setup[1]
  assert b["pixel_values"].shape == (2, 256, setup[2].patch_dim)
  for r, row in enumerate(rows):  # patches: the row's images in sample order, then its videos, each block intact
    k = 0
    for media in ("image", "video"):
      for x in row:
        n = len(x[f"{media}_patches"])
        np.testing.assert_array_equal(b["pixel_values"][r, k:k + n], x[f"{media}_patches"])
        np.testing.assert_array_equal(b["vision_rows_cols"][r, k:k + n], x[f"{media}_rows_cols"])
        k += n
      if media == "image":
        assert b["n_image_tokens"][r] == k // 4
    seg = b["vision_segments"][r]
    assert (seg[k:] == 0).all() and (seg[:k] > 0).all()
    n_blocks = sum(len(x["image_grid_thw"]) + int(x["video_grid_thw"][:, 0].sum()) for x in row)
    assert len(np.unique(seg[:k])) == n_blocks  # one attention segment per image / frame pair
  for r, row in enumerate(rows):  # tokens: samples in order, never across rows, each with its own positions
    t = 0
    for sid, x in enumerate(row, 1):
      n = len(x["ids"])
      assert (b["segment_ids"][r, t:t + n] == sid).all()
      np.testing.assert_array_equal(b["input_ids"][r, t:t + n], x["ids"])
      np.testing.assert_array_equal(b["positions"][r, :, t:t + n], x["positions"])
      t += n
    assert (b["segment_ids"][r, t:] == 0).all()
  assert (b["input_ids"] == cfg.video_token_id).sum() == sum(len(x["video_patches"]) for r in rows for x in r) // 4


def _target_logprob(logits, ids, mask):
  logp = jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1)
  return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]))


def test_packed_batch_loss_equals_the_samples_alone(q2_dir, packed):
  """Features reach their own placeholders and attention stays within each image and each sample: the targets'
  log-likelihood of every sample in the packed batch equals that of the sample alone through model.logits."""
  rows, b = packed
  model = qv.load(q2_dir, scan_layers=False)
  seg = b["segment_ids"]
  packed_logits = model.module.apply(
      {"params": model.params}, b["input_ids"], attention_mask=seg > 0, positions=b["positions"].transpose(1, 0, 2),
      segment_ids=seg, pixel_values=b["pixel_values"], vision_rows_cols=b["vision_rows_cols"],
      vision_segments=b["vision_segments"], n_image_tokens=b["n_image_tokens"])
  for r, row in enumerate(rows):
    t = 0
    for x in row:
      n = len(x["ids"])
      vision = {}
      if len(x["image_grid_thw"]):
        vision.update(pixel_values=x["image_patches"], image_grid_thw=x["image_grid_thw"])
      if len(x["video_grid_thw"]):
        vision.update(pixel_values_videos=x["video_patches"], video_grid_thw=x["video_grid_thw"])
      alone = model.logits(x["ids"][None], **vision)[0]
      want = _target_logprob(alone, x["ids"], x["loss_mask"])
      got = _target_logprob(packed_logits[r, t:t + n], x["ids"], x["loss_mask"])
      assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
      t += n


def test_bad_samples_are_skipped_with_a_warning_and_counted(setup, caplog):
  def record(rid, image, text="What is it?", answer="A square."):
    return {"id": rid, "images": {"img0": image},
            "conversations": [{"from": "user", "value": "Picture 1: <img>img0</img>\n" + text},
                              {"from": "assistant", "value": answer}]}
  enc = encoder(setup, patch_budget=32, seq_len=160)
  cases = {"thin": record("thin", PIL.Image.new("RGB", (2000, 8))),           # aspect ratio 250:1
           "broken": record("broken", io.BytesIO(b"not an image").getvalue()),  # undecodable bytes
           "big": record("big", PIL.Image.new("RGB", (300, 300))),            # at max_pixels: 36 patches > 32
           "long": record("long", PIL.Image.new("RGB", (56, 56)), answer="many words " * 60)}
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    assert all(enc(r) is None for r in cases.values())
  c = enc.counts
  assert (c["bad_image"], c["dropped_too_long"], c["ok"]) == (2, 2, 0)
  text = caplog.text
  assert "thin" in text and "exceeds 200" in text and "broken" in text and "36 patches > patch_budget 32" in text
  assert "tokens > seq_len 160" in text
  strict = encoder(setup, patch_budget=32, seq_len=160, strict=True)
  with pytest.raises(ValueError, match="exceeds 200"):
    strict(cases["thin"])
  with pytest.raises(ValueError, match="big: 36 patches > patch_budget 32"):
    strict(cases["big"])


def test_pipeline_fills_both_budgets_and_resumes_exactly(setup):
  tok, cfg, proc = setup
  source = ShapesSource("train", 400, image_size=SIDES)
  dc = DataConfig(seq_len=512, batch_size=2, packing_window=200, num_threads=1)
  budget = budget_for([encoder(setup)(source[i]) for i in range(200)], 512, 2)
  enc = Qwen2VLSampleEncoder(tok, cfg, proc, dc, budget)
  ds = build_patch_dataset(source, enc, dc, patch_budget=budget, patch_dim=proc.patch_dim, merge=2, seed=3,
                           process_index=0, process_count=1)
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  rest = [next(it) for _ in range(5)]
  assert all(x["pixel_values"].shape == (2, budget, proc.patch_dim) and x["input_ids"].shape == (2, 512)
             for x in first + rest)  # static shapes
  fill = np.mean([(x["segment_ids"] > 0).mean() for x in first + rest])
  patch_fill = np.mean([(x["vision_segments"] > 0).mean() for x in first + rest])
  assert fill > 0.85 and patch_fill > 0.85, (fill, patch_fill)  # 2 rows of ~6 samples: coarse (bench: >= 95%)
  again = iter(ds)
  again.set_state(state)
  for want in rest:
    got = next(again)
    assert all(np.array_equal(got[k], want[k]) for k in want)

"""The Grain pipeline: packing keeps every sample intact and isolated, images follow their spans, bad data is
counted, hosts get disjoint shards, and the iterator state resumes exactly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from qwenvl_jax.data.images import ImageError
from qwenvl_jax.data.pipeline import DataConfig, DataPipeline, SampleEncoder
from qwenvl_jax.data.tokenizer import train_sentencepiece
from qwenvl_jax.models.qwen_vl import FAMILY
from qwenvl_jax.models.qwen_vl.config import QWEN_VL_TINY
from qwenvl_jax.models.qwen_vl.model import QwenVL

WORDS = "red green blue circle square triangle what color shape how many is the a and of record".split()


def make_records(n, seed=0, bad=()):
  rng = np.random.default_rng(seed)
  recs = []
  for i in range(n):
    k = int(rng.integers(0, 3))
    refs = [f"im{j}" for j in range(k)]
    images = {}
    for j, r in enumerate(refs):
      color = ((i * 7 + j * 50) % 250, (i * 13) % 250, (j * 90 + 30) % 250)
      images[r] = PIL.Image.new("RGB", (40, 30), color)
    if i in bad:
      images = {r: b"\x89PNG broken" for r in refs} or {"im0": b"x"}
      refs = refs or ["im0"]
    words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 30))))
    user = "".join(f"Picture {j + 1}: <img>{r}</img>\n" for j, r in enumerate(refs)) + f"record {i} {words}?"
    recs.append({"id": f"r{i}", "task": ["vqa", "caption"][i % 2], "images": images,
                 "conversations": [{"from": "user", "value": user},
                                   {"from": "assistant", "value": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))}]})
  return recs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  corpus = [" ".join(WORDS)] * 20 + [f"record {i}" for i in range(100)] + ["Picture 1: What?\n"] * 10
  return train_sentencepiece(corpus, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=600, image_span=16)


def config(**kw):
  base = dict(seq_len=192, max_images=4, image_size=28, batch_size=2, packing_bins=8, task_names=("vqa", "caption"))
  return DataConfig(**{**base, **kw})


def collect(it):
  return [jax.tree.map(np.asarray, b) for b in it]


def segments(batches):
  """-> list of (ids, loss_mask, positions, task, images) per packed sample, in row order."""
  out = []
  for b in batches:
    for r in range(b["input_ids"].shape[0]):
      seg = b["segment_ids"][r]
      img_slot = 0
      for s in range(1, seg.max() + 1):
        sel = seg == s
        ids = b["input_ids"][r][sel]
        n_img = int((ids == 215).sum())  # <img> id in SentencePieceTokenizer
        imgs = b["pixel_values"][r][img_slot:img_slot + n_img]
        img_slot += n_img
        out.append((ids, b["loss_mask"][r][sel], b["positions"][r][sel], b["task_ids"][r][sel], imgs))
  return out


def test_packing_keeps_every_sample_whole_once(tok):
  recs = make_records(60)
  cfg = config()
  enc = SampleEncoder(tok, cfg)
  expected = {tuple(e["ids"]): e for e in map(enc, recs)}
  assert tok.img_start_id == 215
  got = segments(collect(DataPipeline(recs, tok, cfg, seed=3, process_index=0, process_count=1)))
  # drop_remainder may drop the last partial batch: everything packed is a whole sample, none twice
  assert len(got) >= 50 and len({tuple(g[0]) for g in got}) == len(got)
  for ids, mask, pos, task, imgs in got:
    e = expected[tuple(ids)]
    np.testing.assert_array_equal(mask, e["loss_mask"])
    np.testing.assert_array_equal(pos, np.arange(len(ids)))
    np.testing.assert_array_equal(task, e["task"])
    np.testing.assert_allclose(imgs, e["images"], atol=1e-6)  # the k-th image slot holds the k-th span's image


def test_packing_efficiency_beats_padding(tok):
  cfg = config(seq_len=256, packing_bins=16)
  batches = collect(DataPipeline(make_records(120), tok, cfg, seed=0, process_index=0, process_count=1))
  used = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  total = sum(b["segment_ids"].size for b in batches)
  samples = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
  padding_only = used / (samples * cfg.seq_len)  # one sample per row
  assert used / total > 0.85 and used / total > 1.8 * padding_only


def test_bad_images_are_skipped_and_counted(tok, caplog):
  recs = make_records(20, bad=(3, 7))
  p = DataPipeline(recs, tok, config(), seed=0, process_index=0, process_count=1)
  collect(p)
  assert p.encoder.counts["bad_image"] == 2 and p.encoder.counts["ok"] == 18
  assert "r3:im0" in caplog.text and "end of data: 18 samples used" in caplog.text
  assert "data epoch 1 done: 18 samples used" in caplog.text and "'bad_image': 2" in caplog.text
  with pytest.raises(ImageError, match="r3:im0"):
    collect(DataPipeline(recs[:5], tok, config(strict=True), shuffle=False, process_index=0, process_count=1))


def test_video_records_are_skipped_and_counted(tok, caplog):
  """Fixed image spans hold no video: a video record is skipped with a warning (never trained on as text)."""
  from qwenvl_jax.data.conversation import FormatError
  from qwenvl_jax.data.shapes import generate
  video = generate("train", 0, image_size=32, task="video_motion")
  named_only = {**make_records(1)[0], "id": "named"}  # a reference without frames is no better
  named_only["conversations"] = [{"from": "user", "value": "Video 1: <video>clip.mp4</video>\nWhat moves?"},
                                 {"from": "assistant", "value": "a square"}]
  enc = SampleEncoder(tok, config())
  assert enc(video) is None and enc(named_only) is None and enc(make_records(1)[0]) is not None
  assert (enc.counts["unsupported_video"], enc.counts["ok"]) == (2, 1)
  assert "skipping shapes-train-0000000: has a video" in caplog.text and "skipping named" in caplog.text
  with pytest.raises(FormatError, match="shapes-train-0000000: has a video; .* take images only"):
    SampleEncoder(tok, config(strict=True))(video)


def test_stray_image_tags_in_a_turn_skip_the_record(tok, caplog):
  stray = {**make_records(1)[0], "id": "stray"}
  stray["conversations"] = [dict(stray["conversations"][0]), *stray["conversations"][1:]]
  stray["conversations"][0]["value"] += " and </img>"
  enc = SampleEncoder(tok, config())
  assert enc(stray) is None and enc(make_records(1)[0]) is not None
  assert (enc.counts["bad_record"], enc.counts["ok"]) == (1, 1)
  assert "skipping stray: TokenizerError: stray </img> in text" in caplog.text


def test_data_without_one_usable_sample_stops_after_one_pass_with_capped_warnings(tok, caplog):
  from qwenvl_jax.data.pipeline import WARNINGS_SHOWN, NoUsableData
  recs = make_records(30, bad=tuple(range(30)))  # every image unreadable
  p = DataPipeline(recs, tok, config(), seed=0, num_epochs=None, process_index=0, process_count=1)
  with pytest.raises(NoUsableData, match=r"no usable sample in a whole pass over the 30 records .*'bad_image': 30"):
    next(iter(p))
  assert caplog.text.count("skipping ") == WARNINGS_SHOWN
  assert "further 'bad_image' skips are counted, not shown" in caplog.text
  with pytest.raises(NoUsableData, match="no records for host 0 of 1"):
    DataPipeline([], tok, config(), seed=0, process_index=0, process_count=1)


def test_long_samples_truncated_or_dropped(tok):
  long = make_records(1)[0]
  long["conversations"][1]["value"] = "red " * 400
  enc = SampleEncoder(tok, config())
  out = enc(long)
  assert len(out["ids"]) == 192 and enc.counts["truncated"] == 1
  # an image span cut by the limit is removed whole, with its image
  img_first = make_records(1)[0]
  img_first["images"] = {"im0": PIL.Image.new("RGB", (8, 8))}
  img_first["conversations"][0]["value"] = "x " * 170 + "Picture 1: <img>im0</img>\nwhat"
  out = enc(img_first)
  assert 215 not in out["ids"] and out["images"].shape[0] == 0 and len(out["ids"]) <= 192
  drop = SampleEncoder(tok, config(truncation="drop"))
  assert drop(long) is None and drop.counts["dropped_too_long"] == 1


def test_host_shards_are_disjoint_and_complete(tok):
  recs = make_records(40)
  seen = []
  for host in range(2):
    got = segments(collect(DataPipeline(recs, tok, config(batch_size=1), seed=5, process_index=host, process_count=2)))
    seen.append({int(re.search(r"record (\d+)", tok.decode(g[0])).group(1)) for g in got})
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) >= 36  # each host may drop a last partial row


def test_iterator_state_resumes_exactly(tok):
  recs = make_records(50)
  p = DataPipeline(recs, tok, config(), seed=2, num_epochs=None, process_index=0, process_count=1)
  it = iter(p)
  for _ in range(2):
    next(it)
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  it2 = iter(DataPipeline(recs, tok, config(), seed=2, num_epochs=None, process_index=0, process_count=1))
  it2.set_state(state)
  for a, b in zip(after, [next(it2) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_pretrain_mode(tok):
  rec = make_records(3)[2]
  rec["images"] = {"im0": PIL.Image.new("RGB", (8, 8))}
  rec["conversations"] = [{"from": "user", "value": "<img>im0</img>"}, {"from": "assistant", "value": "a red circle"}]
  out = SampleEncoder(tok, config(mode="pretrain"))(rec)
  assert tok.decode(out["ids"]) == "<img></img>a red circle<|endoftext|>"
  assert tok.decode(out["ids"][out["loss_mask"] == 1]) == "a red circle<|endoftext|>"


def test_model_sees_packed_samples_in_isolation(tok):
  """Logits of a packed row equal those of each sample run alone: segments, positions and image slots agree."""
  cfg = QWEN_VL_TINY.replace(vocab_size=tok.vocab_size, visual=dict(image_start_id=tok.img_start_id))
  params = FAMILY.init_params(cfg, jax.random.key(0))
  model = QwenVL(cfg)
  apply = jax.jit(lambda ids, **kw: model.apply({"params": params}, ids, inference=False, **kw))
  dcfg = config(image_size=112, seq_len=224, max_images=3, batch_size=1)
  batches = collect(DataPipeline(make_records(16, seed=4), tok, dcfg, seed=1, process_index=0, process_count=1))
  batch = max(batches, key=lambda b: (min(b["segment_ids"].max(), 2), b["image_mask"].sum()))
  seg = batch["segment_ids"]
  assert seg.max() >= 2 and batch["image_mask"].any()
  packed = apply(jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(seg > 0),
                 positions=jnp.asarray(batch["positions"]), segment_ids=jnp.asarray(seg),
                 pixel_values=jnp.asarray(batch["pixel_values"]))
  slot = 0
  for s in range(1, seg.max() + 1):
    sel = seg[0] == s
    ids = batch["input_ids"][0][sel]
    n = int((ids == tok.img_start_id).sum())
    pix = jnp.asarray(batch["pixel_values"][0][slot:slot + n]) if n else None
    slot += n
    alone = apply(jnp.asarray(ids[None]), pixel_values=pix)
    np.testing.assert_allclose(np.asarray(packed[0][sel]), np.asarray(alone[0]), atol=1e-4)


def test_window_packer_fills_rows_and_respects_image_slots():
  from qwenvl_jax.data.packing import pack_window
  rng = np.random.default_rng(0)
  sizes = rng.choice([292, 296, 300, 344, 558, 30], size=400, p=[.3, .2, .15, .15, .1, .1])
  samples = [{"ids": np.zeros(n), "images": np.zeros((2 if n == 558 else (0 if n == 30 else 1), 1))} for n in sizes]
  rows = pack_window(samples, 2048, 8)
  assert sorted(i for r in rows for i in r) == list(range(400))
  fill = [sum(sizes[i] for i in r) for r in rows]
  assert max(fill) <= 2048 and all(sum(len(samples[i]["images"]) for i in r) <= 8 for r in rows)
  # rows are filled one after another: most are exactly full, only the window's tail is not
  assert sum(f == 2048 for f in fill) > 0.75 * len(rows) and sum(fill) / (2048 * len(rows)) > 0.95


def test_demo_tokenizer_matches_demo_model(tmp_path):
  from qwenvl_jax.data.shapes import train_tokenizer
  from qwenvl_jax.models.qwen_vl.config import QWEN_VL_DEMO
  tok = train_tokenizer(str(tmp_path / "tok"), num_records=300)
  assert tok.vocab_size <= QWEN_VL_DEMO.vocab_size
  assert tok.img_start_id == QWEN_VL_DEMO.visual.image_start_id and tok.image_span == QWEN_VL_DEMO.visual.n_queries
  assert (tmp_path / "tok.model").is_file()


def test_jsonl_and_tfds_sources_through_the_pipeline(tok, tmp_path):
  import json

  from qwenvl_jax.data.jsonl import JsonlSource
  from qwenvl_jax.data.tfds_sources import ShapesConfig, ShapesTfdsSource, prepare_shapes
  PIL.Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "blue.png")
  rows = [{"id": f"j{i}", "conversations": [{"from": "user", "value": f"Picture 1: <img>blue.png</img>\nrecord {i}"},
                                             {"from": "assistant", "value": "blue"}]} for i in range(6)]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  batches = collect(DataPipeline(JsonlSource(str(tmp_path / "d.jsonl")), tok, config(batch_size=1), seed=0,
                                 process_index=0, process_count=1))
  assert sum(int(b["image_mask"].sum()) for b in batches) == 6
  prepare_shapes(tmp_path / "tfds", ShapesConfig(name="t", num_train=8, num_validation=2, num_test=2, image_size=48))
  src = ShapesTfdsSource(tmp_path / "tfds", "train", config="t")
  p = DataPipeline(src, tok, config(batch_size=1, seq_len=256, image_size=48), seed=0, process_index=0, process_count=1)
  batches = collect(p)
  assert p.encoder.counts["ok"] == 8 and sum(int(b["segment_ids"].max()) for b in batches) == 8

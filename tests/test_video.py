"""Videos for Qwen2-VL training: files decoded with PyAV at 2 fps by their timestamps, the per-video token cap (smaller
frames, then fewer frames; grid and placeholders always agree), bad files skipped and counted, and the shapes video
task through the sample encoder and the patch packer (pad count and M-RoPE ids as transformers')."""

import io
import logging

import av
import numpy as np
import PIL.Image
import pytest
from qwen2_tokenizer_fixture import build
from qwen2_vl_reference import reference_positions

import qwenvl_jax as qv
from qwenvl_jax.data.hf_tokenizer import HFTokenizer
from qwenvl_jax.data.images import ImageError
from qwenvl_jax.data.patch_packing import assemble_batch
from qwenvl_jax.data.pipeline import DataConfig
from qwenvl_jax.data.shapes import generate
from qwenvl_jax.data.video import read_video, write_video
from qwenvl_jax.models.qwen2_vl.processor import Qwen2VLProcessor
from qwenvl_jax.models.qwen2_vl.samples import Qwen2VLSampleEncoder


def colour(k: int) -> tuple[int, int, int]:
  """Frame k's flat colour: far apart for every k < 10, so a lossy codec cannot blur one into another."""
  return (25 * k, 250 - 25 * k, 128)


def write_clip(path, n: int, fps: int, codec: str = "mpeg4", size=(64, 48)):
  """n flat frames at `fps` as a real video file (mpeg4 in MP4 by default, what cameras and the web carry)."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    for k in range(n):
      frame = np.zeros((size[1], size[0], 3), np.uint8) + np.asarray(colour(k), np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  return path


def which(frame: PIL.Image.Image) -> int:
  """The index k whose colour a decoded frame shows."""
  mean = np.asarray(frame, np.float64).reshape(-1, 3).mean(0)
  return int(np.argmin([np.abs(mean - colour(k)).sum() for k in range(10)]))


def test_read_video_samples_2_fps_by_timestamps(tmp_path):
  path = write_clip(tmp_path / "clip.mp4", 10, fps=10)  # 1 s: frames at 0.0, 0.1, ..., 0.9 s
  frames = read_video(path)
  assert [which(f) for f in frames] == [0, 5]  # t = 0 and 0.5 s
  assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
  assert [which(f) for f in read_video(path, fps=3)] == [0, 3, 7]  # nearest to 0, 1/3, 2/3 s
  assert [which(f) for f in read_video(path.read_bytes(), fps=100)] == list(range(10))  # each frame once
  assert [which(f) for f in read_video(path, fps=10, max_frames=3)] == [0, 4, 9]  # spread evenly
  short = write_clip(tmp_path / "short.mp4", 3, fps=10)  # 0.3 s: shorter than one interval
  assert [which(f) for f in read_video(short)] == [0]
  # lossless clips (the shapes TFDS build) written at 2 fps read back frame for frame
  clip = [np.full((8, 8, 3), colour(k), np.uint8) for k in range(5)]
  assert [np.asarray(f).tolist() for f in read_video(write_video(clip))] == [c.tolist() for c in clip]


def zero_frame_video() -> bytes:
  """An AVI file with a video stream that holds no frame."""
  buf = io.BytesIO()
  with av.open(buf, "w", format="avi") as container:
    stream = container.add_stream("mpeg4", rate=2)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
  return buf.getvalue()


def test_bad_video_files_are_one_line_errors(tmp_path):
  cases = {"random": (np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes(), "not a decodable video"),
           "missing": (str(tmp_path / "missing.mp4"), "no such file"),
           "empty": (zero_frame_video(), "no frames could be decoded")}
  for name, (src, why) in cases.items():
    with pytest.raises(ImageError, match=f"^cannot load video {name}: {why}") as e:
      read_video(src, name=name)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def setup(q2_dir, tmp_path_factory):
  tok = HFTokenizer(build(str(tmp_path_factory.mktemp("q2_video") / "tokenizer.json")))
  cfg = qv.load_config(q2_dir)
  return tok, cfg, Qwen2VLProcessor.for_config(cfg, min_pixels=56 * 56, max_pixels=112 * 112)


def video_record(rid: str, video) -> dict:
  return {"id": rid, "images": {}, "videos": {"v0": video},
          "conversations": [{"from": "user", "value": "Video 1: <video>v0</video>\nWhat moves?"},
                            {"from": "assistant", "value": "A square."}]}


def encoder(setup, **data):
  tok, cfg, proc = setup
  return Qwen2VLSampleEncoder(tok, cfg, proc, DataConfig(**{"seq_len": 512, "batch_size": 1, **data}), 4096)


def test_bad_videos_are_skipped_with_a_warning_and_counted(setup, tmp_path, caplog):
  enc = encoder(setup)
  records = [video_record("random", b"\x00\x17 not a video" * 50), video_record("missing", str(tmp_path / "no.mp4")),
             video_record("empty", zero_frame_video())]
  with caplog.at_level(logging.WARNING, logger="qwenvl_jax.data"):
    assert all(enc(r) is None for r in records)
  assert (enc.counts["bad_image"], enc.counts["ok"]) == (3, 0)
  for rid, why in (("random", "not a decodable video"), ("missing", "no such file"), ("empty", "no frames")):
    assert f"skipping {rid}: cannot load video {rid}:v0: {why}" in caplog.text
  with pytest.raises(ImageError, match="cannot load video missing:v0: no such file"):
    encoder(setup, strict=True)(records[1])


def test_video_file_equals_its_frames_and_no_cap_changes_nothing(setup, tmp_path):
  proc = setup[2]
  path = write_clip(tmp_path / "clip.mp4", 10, fps=10, size=(96, 64))
  from_file = proc.preprocess_video(str(path))
  from_frames = proc.preprocess_video(read_video(path))
  assert all(np.array_equal(a, b) for a, b in zip(from_file, from_frames))
  frames = [PIL.Image.new("RGB", (84, 56), colour(k)) for k in range(5)]
  capped, uncapped = proc.preprocess_video(frames), Qwen2VLProcessor(
      min_pixels=56 * 56, max_pixels=112 * 112, video_max_tokens=None).preprocess_video(frames)
  assert all(np.array_equal(a, b) for a, b in zip(capped, uncapped))  # under the cap: as before the cap existed
  assert tuple(capped[1]) == (3, 4, 6)


def test_token_cap_shrinks_frames_then_drops_frames(setup):
  tok, cfg, _ = setup
  frames = [PIL.Image.new("RGB", (112, 112), colour(k)) for k in range(8)]
  free = Qwen2VLProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
  assert tuple(free.video_grid(8, 112, 112)) == (4, 8, 8) and free.tokens((4, 8, 8)) == 64
  # 64 tokens > 32: every frame shrinks to 56 x 56 (2 x 2 merged patches), all 8 frames kept
  small = Qwen2VLProcessor(min_pixels=56 * 56, max_pixels=112 * 112, video_max_tokens=32)
  patches, grid = small.preprocess_video(frames)
  assert tuple(grid) == (4, 4, 4) and small.tokens(grid) == 16 <= 32 and len(patches) == 64
  ref, _ = free.preprocess_video([f.resize((56, 56), PIL.Image.Resampling.BICUBIC) for f in frames])
  np.testing.assert_array_equal(patches, ref)
  # 4 frame pairs need 4 tokens even at 28 x 28: a cap of 2 keeps 4 frames (0, 2, 5, 7), two whole pairs
  tiny = Qwen2VLProcessor(min_pixels=56 * 56, max_pixels=112 * 112, video_max_tokens=2)
  patches, grid = tiny.preprocess_video(frames)
  assert tuple(grid) == (2, 2, 2) and tiny.tokens(grid) == 2
  kept = [frames[k].resize((28, 28), PIL.Image.Resampling.BICUBIC) for k in (0, 2, 5, 7)]
  at_28 = Qwen2VLProcessor(min_pixels=28 * 28, max_pixels=112 * 112)  # takes 28 x 28 frames as they are
  np.testing.assert_array_equal(patches, at_28.preprocess_video(kept)[0])
  # through the sample encoder: the placeholder block is exactly the capped grid's tokens
  enc = Qwen2VLSampleEncoder(tok, cfg, small, DataConfig(seq_len=512, batch_size=1), 4096)
  s = enc(video_record("big", frames))
  assert (s["ids"] == cfg.video_token_id).sum() == small.tokens(s["video_grid_thw"][0]) == 16
  assert len(s["video_patches"]) == int(np.prod(s["video_grid_thw"][0]))
  with pytest.raises(ValueError, match="video_max_tokens >= 0"):
    Qwen2VLProcessor(video_max_tokens=-1)


def test_shapes_video_sample_packs_with_transformers_tokens_and_positions(setup):
  tok, cfg, proc = setup
  record = generate("train", 1, image_size=112, task="video_motion")
  frames = record["videos"]["vid0"]
  s = encoder(setup)(record)
  grid = s["video_grid_thw"][0]
  assert tuple(grid) == (len(frames) // 2, 8, 8) and len(s["image_grid_thw"]) == 0
  n = proc.tokens(grid)
  assert (s["ids"] == cfg.video_token_id).sum() == n == len(s["video_patches"]) // 4
  b = assemble_batch([[s]], 512, 1024, proc.patch_dim, 2)  # one row: its patches are the batch's
  assert (b["input_ids"] == cfg.video_token_id).sum() == n and np.all(b["n_image_tokens"] == 0)
  pixels, segments = b["pixel_values"].reshape(-1, proc.patch_dim), b["vision_segments"].reshape(-1)
  np.testing.assert_array_equal(pixels[:len(s["video_patches"])], s["video_patches"])
  assert len(np.unique(segments[segments > 0])) == grid[0] and (segments[len(s["video_patches"]):] == 0).all()
  # transformers: <|video_pad|> count of its grid, and get_rope_index over the sample (t <= h/2, w/2: same rule)
  assert n == int(np.prod(grid)) // cfg.vision.spatial_merge_size ** 2
  np.testing.assert_array_equal(reference_positions(cfg, s["ids"], video_grids=s["video_grid_thw"]), s["positions"])
  np.testing.assert_array_equal(b["positions"][0, :, :len(s["ids"])], s["positions"])

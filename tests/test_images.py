"""Image loading/preprocessing: parity with the official transform (fixture goldens), modes, and bad inputs."""

import io
import os
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.data.images import CLIP_MEAN, CLIP_STD, ImageError, load_image, preprocess_image, preprocess_images

SIZE = 112


def _norm(v: float, c: int) -> float:
  """What the transform gives for an 8-bit value v in channel c (float32 math, like the official code)."""
  return float((np.float32(v) / np.float32(255) - np.float32(CLIP_MEAN[c])) / np.float32(CLIP_STD[c]))


def _png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _crafted_png(width: int, height: int, idat: bytes = b"") -> bytes:
  """A hand-made 8-bit RGB PNG whose IHDR claims width x height (PIL refuses to write such files itself)."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# ---------------------------------------------------------------- parity with the official preprocessing


@pytest.mark.parametrize("case_name", ["batch", "generate", "long", "boundary"])
def test_matches_official_pixel_values(case, fixture_dir, case_name):
  c = case(case_name)
  assert len(c["image_indices"]) == len(c["pixel_values"]) > 0
  paths = [os.path.join(fixture_dir, f"img{k}.png") for k in c["image_indices"]]
  for path, ref in zip(paths, c["pixel_values"]):
    got = preprocess_image(path, SIZE)
    assert got.shape == (3, SIZE, SIZE) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-6
  batch = preprocess_images(paths, SIZE)
  assert batch.shape == c["pixel_values"].shape and batch.dtype == np.float32
  assert np.abs(batch - c["pixel_values"]).max() <= 1e-6


def test_path_bytes_and_pil_inputs_agree(fixture_dir):
  path = os.path.join(fixture_dir, "img1.png")
  with open(path, "rb") as f:
    data = f.read()
  ref = preprocess_image(path, SIZE)
  with Image.open(path) as lazy, Image.open(path) as lazy2:  # not yet decoded: load_image must decode them
    for src in (pathlib.Path(path), data, bytearray(data), memoryview(data), lazy, lazy.convert("RGB")):
      np.testing.assert_array_equal(preprocess_image(src, SIZE), ref)
    np.testing.assert_array_equal(preprocess_images([path, data, lazy2], SIZE), np.stack([ref] * 3))


def test_load_image_is_rgb_and_does_not_alias_input(fixture_dir):
  src = Image.open(os.path.join(fixture_dir, "img0.png")).convert("RGB")
  img = load_image(src)
  assert img.mode == "RGB" and img.size == (150, 130) and img is not src
  np.testing.assert_array_equal(np.asarray(img), np.asarray(src))


def test_empty_batch():
  out = preprocess_images([], 28)
  assert out.shape == (0, 3, 28, 28) and out.dtype == np.float32


def test_constant_colour_normalises_to_expected_values():
  out = preprocess_image(Image.new("RGB", (37, 23), (0, 128, 255)), 14)
  for c, v in enumerate((0, 128, 255)):
    np.testing.assert_allclose(out[c], _norm(v, c), atol=1e-6)


# ---------------------------------------------------------------- modes


def _save(img: Image.Image, tmp_path, fmt: str) -> str:
  path = str(tmp_path / f"{img.mode.replace(';', '_')}.{fmt.lower()}")
  img.save(path, fmt)
  return path


def _gray_value(out: np.ndarray) -> np.ndarray:
  """Undo the normalisation of a preprocessed image -> 8-bit values [3, H, W]."""
  mean, std = np.asarray(CLIP_MEAN).reshape(3, 1, 1), np.asarray(CLIP_STD).reshape(3, 1, 1)
  return (out * std + mean) * 255


def _check(out: np.ndarray, size: int = 16):
  assert out.shape == (3, size, size) and out.dtype == np.float32 and np.isfinite(out).all()


def test_rgba_drops_alpha_without_compositing(tmp_path):
  rng = np.random.default_rng(0)
  rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
  rgba[..., 3] = 0  # fully transparent: compositing on white/black would change the colours
  path = _save(Image.fromarray(rgba), tmp_path, "PNG")
  img = load_image(path)
  assert img.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(img), rgba[..., :3])
  np.testing.assert_array_equal(preprocess_image(path, 16), preprocess_image(Image.fromarray(rgba[..., :3]), 16))


def test_la_p_cmyk_l(tmp_path):
  la = Image.new("LA", (8, 6), (77, 0))
  assert np.asarray(load_image(_save(la, tmp_path, "PNG"))).tolist() == [[[77] * 3] * 8] * 6
  pal = Image.new("P", (8, 6))
  pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pal.paste(1, (0, 0, 4, 6))  # left half palette index 1, right half index 0
  got = np.asarray(load_image(_save(pal, tmp_path, "PNG")))
  assert got[:, :4].reshape(-1, 3).tolist() == [[200, 100, 50]] * 24
  assert got[:, 4:].reshape(-1, 3).tolist() == [[10, 20, 30]] * 24
  cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in PIL's naive CMYK -> RGB
  assert np.asarray(load_image(_save(cmyk, tmp_path, "TIFF")))[0, 0].tolist() == [255, 0, 0]
  gray = Image.new("L", (8, 6), 200)
  out = preprocess_image(_save(gray, tmp_path, "PNG"), 16)
  _check(out)
  for c in range(3):
    np.testing.assert_allclose(out[c], _norm(200, c), atol=1e-6)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_is_rescaled_not_clipped(tmp_path, mode):
  dtype = ">u2" if mode == "I;16B" else "<u2"
  for value, expect in ((65535, 255), (32768, 128), (0, 0), (257 * 40, 40)):
    img = Image.fromarray(np.full((10, 12), value, dtype=dtype))
    assert img.mode == mode
    for src in (img, _save(img, tmp_path, "PNG"), _save(img, tmp_path, "TIFF")):
      out = preprocess_image(src, 16)
      _check(out)
      np.testing.assert_allclose(_gray_value(out), expect, atol=1e-3)


def test_16bit_gradient_keeps_order(tmp_path):
  ramp = np.tile(np.linspace(0, 65535, 12).astype(np.uint16), (5, 1))
  got = np.asarray(load_image(_save(Image.fromarray(ramp), tmp_path, "PNG")))[..., 0]
  np.testing.assert_array_equal(got[0], np.round(ramp[0] / 257).astype(np.uint8))


@pytest.mark.parametrize("mode,dtype", [("I", np.int32), ("F", np.float32)])
def test_32bit_modes_are_min_max_scaled(tmp_path, mode, dtype):
  a = np.zeros((6, 10), dtype)
  a[:, 5:] = 1_000_000 if mode == "I" else 3.5e6  # far above 255: plain convert would clip it all to white
  a[:, :5] = -20_000
  path = _save(Image.fromarray(a), tmp_path, "TIFF")
  with Image.open(path) as reread:
    assert reread.mode == mode
  got = np.asarray(load_image(path))
  assert got[:, :5].max() == 0 and got[:, 5:].min() == 255
  _check(preprocess_image(path, 16))
  mid = a.copy()
  mid[0, 0] = (a.max() + a.min()) / 2
  assert np.asarray(load_image(Image.fromarray(mid)))[0, 0, 0] in (127, 128)


def test_float_with_non_finite_values():
  a = np.array([[0.0, 1.0], [np.nan, np.inf]], np.float32)
  got = np.asarray(load_image(Image.fromarray(a)))[..., 0]
  assert got.tolist() == [[0, 255], [0, 255]]


# ---------------------------------------------------------------- bad inputs


def _raises(src, name=None, **kw) -> str:
  with pytest.raises(ImageError) as e:
    load_image(src, name=name, **kw)
  msg = str(e.value)
  assert "\n" not in msg and msg.strip() == msg
  assert (name if name is not None else str(src)) in msg
  return msg


def test_missing_file(tmp_path):
  assert "no such file" in _raises(str(tmp_path / "nope.png"))
  assert "no such file" in _raises(tmp_path / "nope.png")


def test_random_bytes_and_empty(tmp_path):
  data = np.random.default_rng(1).bytes(1000)
  _raises(data, name="random-bytes")
  _raises(b"", name="empty-bytes")
  path = tmp_path / "noise.png"
  path.write_bytes(data)
  _raises(str(path))
  _raises(str(tmp_path))  # a directory is not an image either
  _raises(12345, name="not-an-image")


def test_truncated_png(fixture_dir, tmp_path):
  with open(os.path.join(fixture_dir, "img2.png"), "rb") as f:
    data = f.read()
  path = tmp_path / "half.png"
  path.write_bytes(data[: len(data) // 2])
  _raises(str(path))
  _raises(data[: len(data) // 2], name="half-bytes")
  with Image.open(path) as lazy, pytest.raises(ImageError, match="lazy.*truncated"):
    load_image(lazy, name="lazy")  # a lazily opened PIL image is decoded (and fails) inside load_image


def test_zero_sized(tmp_path):
  for w, h in ((0, 10), (10, 0)):
    path = tmp_path / f"zero_{w}x{h}.png"
    path.write_bytes(_crafted_png(w, h))
    _raises(str(path))
    assert "zero-sized" in _raises(Image.new("RGB", (w, h)), name=f"mem-{w}x{h}")


def test_decompression_bomb_checked_from_header(tmp_path):
  path = tmp_path / "bomb.png"
  Image.new("RGB", (2000, 2000), (3, 4, 5)).save(path)
  assert path.stat().st_size < 50_000
  assert "4000000 pixels" in _raises(str(path), max_pixels=1_000_000)
  assert load_image(str(path)).size == (2000, 2000)  # fine under the default limit
  # header claims 5000x5000 (under PIL's own limit) but the body is garbage: our size check must fire first
  fake = _crafted_png(5000, 5000, idat=b"garbage")
  assert "25000000 pixels exceeds max_pixels=1000000" in _raises(fake, name="fake-bomb", max_pixels=1_000_000)
  assert "broken data stream" in _raises(fake, name="fake-small")  # under the limit it is decoded: corrupt
  assert "zero-sized" in _raises(Image.new("L", (0, 0)), name="mem", max_pixels=0)


@pytest.mark.parametrize("pil_limit", [3_000_000, 1_000_000])
def test_pil_decompression_bomb_becomes_image_error(tmp_path, monkeypatch, pil_limit):
  path = tmp_path / "bomb.png"
  Image.new("RGB", (2000, 2000)).save(path)
  # 4M pixels: above PIL's limit (warning) or above twice it (DecompressionBombError), below our max_pixels
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
  assert "decompression bomb" in _raises(str(path), max_pixels=10_000_000)


def test_batch_error_names_the_sample(fixture_dir):
  good = os.path.join(fixture_dir, "img0.png")
  with pytest.raises(ImageError, match=r"srcs\[1\]"):
    preprocess_images([good, b"not an image"], SIZE)

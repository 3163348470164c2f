"""TFDS: the shapes builder (qwenvl_jax.data.tfds_sources), and user-style builders read through the adapters."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from shapes_records import image_array, same_record

from qwenvl_jax.data import shapes, tfds_sources
from qwenvl_jax.data.boxes import box_text, normalize_box


class _NoCodePath:
  """Skip TFDS's download-checksum lookup, which needs the optional `importlib_resources` inside packages."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None


CAPTION_IMAGES = [((40, 30), (200, 20, 20)), ((64, 48), (20, 200, 20)), ((50, 50), (20, 20, 200))]
CAPTIONS = [["a red picture", "something red"], ["a green picture"], ["blue", "a blue picture", "azure"]]
# (width, height), pixel box (x1, y1, x2, y2), phrase
REFEXP = [((100, 80), (10.0, 20.0, 50.0, 60.0), "the left box"),
          ((64, 64), (0.0, 0.0, 64.0, 64.0), "everything"),
          ((120, 90), (12.0, 27.0, 84.0, 63.0), "the middle thing")]


def _test_image(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
  image = Image.new("RGB", size, color)
  image.putpixel((1, 2), (255, 255, 255))  # so orientation errors would show
  return image


class QwenvlTestCaptions(_NoCodePath, tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "image_id": tfds.features.Text(),
    }), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, ((size, color), captions) in enumerate(zip(CAPTION_IMAGES, CAPTIONS)):
      yield i, {"image": _test_image(size, color), "captions": captions, "image_id": f"cap{i}"}


class QwenvlTestRefexp(_NoCodePath, tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "phrase": tfds.features.Text(),
      "bbox": tfds.features.BBoxFeature(),
      "bbox_pixels": tfds.features.Tensor(shape=(4,), dtype=np.float32),
    }), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, ((w, h), (x1, y1, x2, y2), phrase) in enumerate(REFEXP):
      bbox = tfds.features.BBox(ymin=y1 / h, xmin=x1 / w, ymax=y2 / h, xmax=x2 / w)
      yield i, {"image": _test_image((w, h), (90, 90, 90)), "phrase": phrase, "bbox": bbox,
                "bbox_pixels": np.array([x1, y1, x2, y2], np.float32)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_sources.prepare_shapes(data_dir, "tiny")
  for builder_cls in (QwenvlTestCaptions, QwenvlTestRefexp):
    builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_shapes_round_trip(tfds_dir):
  for split, n in (("train", 20), ("validation", 5), ("test", 5)):
    source = tfds_sources.ShapesTfdsSource(tfds_dir, split, "tiny")
    assert len(source) == n
    for i in range(n):
      # Images went through PNG, which is lossless: pixels must match exactly.
      assert same_record(source[i], shapes.generate(split, i)), (split, i)
  assert "config='tiny'" in repr(source)
  # The plain TFDS entry point reads the same files.
  raw = tfds.data_source("qwenvl_shapes/tiny", data_dir=str(tfds_dir), split="validation")
  assert same_record(tfds_sources.example_to_record(raw[2]), shapes.generate("validation", 2))
  with pytest.raises(FileNotFoundError):
    tfds_sources.ShapesTfdsSource(tfds_dir / "missing", "train", "tiny")


def test_tfds_shapes_custom_config(tfds_dir):
  config = tfds_sources.ShapesConfig(name="mini", num_train=4, num_validation=0, num_test=2, seed=5, image_size=64,
                                     mix=(("ocr", 1.0), ("multi_image", 1.0)))
  tfds_sources.prepare_shapes(tfds_dir, config)
  mix = {"ocr": 1.0, "multi_image": 1.0}
  for split, n in (("train", 4), ("test", 2)):
    # Read back by name only: the build is found from its files.
    source = tfds_sources.ShapesTfdsSource(tfds_dir, split, "mini")
    assert len(source) == n
    for i in range(n):
      assert same_record(source[i], shapes.generate(split, i, seed=5, image_size=64, mix=mix))


def test_tfds_shapes_videos_are_video_files(tfds_dir):
  config = tfds_sources.ShapesConfig(name="clips", num_train=3, num_validation=0, num_test=0, seed=2, image_size=40,
                                     mix=(("video_motion", 1.0), ("caption", 1.0)))
  tfds_sources.prepare_shapes(tfds_dir, config)
  source = tfds_sources.ShapesTfdsSource(tfds_dir, "train", "clips")
  mix = {"video_motion": 1.0, "caption": 1.0}
  records = [source[i] for i in range(3)]
  assert any("videos" in r for r in records)
  for i, r in enumerate(records):
    want = shapes.generate("train", i, seed=2, image_size=40, mix=mix)
    # a real (lossless) video file that, sampled at 2 fps, gives back every frame pixel for pixel
    assert all(isinstance(v, bytes) for v in r.get("videos", {}).values())
    assert same_record(r, want), i


def test_tfds_caption_adapter(tfds_dir):
  data = tfds.data_source("qwenvl_test_captions", data_dir=str(tfds_dir), split="train")
  source = tfds_sources.TfdsCaptionSource(data, image_key="image", caption_key="captions", name="caps")
  assert len(source) == 3
  for i, ((size, color), captions) in enumerate(zip(CAPTION_IMAGES, CAPTIONS)):
    record = source[i]
    assert record["id"] == f"caps-{i:07d}" and record["task"] == "caption"
    assert record["conversations"] == [
      {"from": "user", "value": "Picture 1: <img>img0</img>\nDescribe the image."},
      {"from": "assistant", "value": captions[0]}]
    assert np.array_equal(image_array(record["images"]["img0"]), image_array(_test_image(size, color)))
    assert record["objects"] == [[]]
  picked = tfds_sources.TfdsCaptionSource(data, caption_key="captions", id_key="image_id", choice="random", seed=1)
  again = tfds_sources.TfdsCaptionSource(data, caption_key="captions", id_key="image_id", choice="random", seed=1)
  for i in range(3):
    answer = picked[i]["conversations"][1]["value"]
    assert answer in CAPTIONS[i] and answer == again[i]["conversations"][1]["value"]
    assert picked[i]["id"] == f"cap{i}"
  with pytest.raises(IndexError):
    source[3]


def test_tfds_refexp_adapter(tfds_dir):
  builder = QwenvlTestRefexp(data_dir=str(tfds_dir), file_format="array_record")
  data = builder.as_data_source("train")
  normalized = tfds_sources.TfdsRefExpSource(data, "image", "phrase", "bbox", box_format="yxyx_normalized")
  pixels = tfds_sources.TfdsRefExpSource(data, "image", "phrase", "bbox_pixels", box_format="xyxy_pixels")
  assert len(normalized) == len(pixels) == 3
  for i, ((w, h), box, phrase) in enumerate(REFEXP):
    expected = box_text(normalize_box(box, w, h))
    for source in (normalized, pixels):
      record = source[i]
      assert record["task"] == "grounding"
      assert record["conversations"] == [
        {"from": "user", "value": f"Picture 1: <img>img0</img>\n<ref>{phrase}</ref>"},
        {"from": "assistant", "value": expected}]
      assert record["images"]["img0"].size == (w, h)
      assert record["objects"][0][0]["phrase"] == phrase
      np.testing.assert_allclose(record["objects"][0][0]["box"], box, atol=1e-3)


def test_refexp_adapter_many_objects():
  """(N, 4) boxes with one phrase list per object, as nested TFDS features decode."""
  image = np.zeros((50, 100, 3), np.uint8)
  examples = [{"image": image, "objects": {"bbox": np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], np.float32),
                                           "refs": [[b"top left", b"upper left"], [b"bottom right"]]}}]
  first = tfds_sources.TfdsRefExpSource(examples, phrase_key="objects/refs", box_key="objects/bbox",
                                        box_format="xyxy_normalized")
  record = first[0]
  assert record["conversations"][0]["value"].endswith("<ref>top left</ref>")
  assert record["conversations"][1]["value"] == "<box>(0,0),(500,500)</box>"
  with pytest.raises(ValueError):
    tfds_sources.TfdsRefExpSource(examples, box_format="cxcywh")

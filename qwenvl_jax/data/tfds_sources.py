"""TFDS sources: the shapes dataset as a TFDS builder, and adapters for captioning / referring-expression datasets.

Everything here works without TensorFlow: builders write `array_record` files and are read back with
`tfds.data_source` / `builder.as_data_source`, which decode with NumPy and PIL. What keeps TF out: the file format
is array_record (TFDS defaults to tfrecord, written through TF); Image features are fed PIL images or encoded bytes
(NumPy images are encoded through TF); `_info` builds `tfds.core.DatasetInfo` directly (`dataset_info_from_configs`
looks for metadata files next to the module); and a builder inside a package overrides `code_path` (see
`ShapesDataset.code_path`), or TFDS needs the `importlib_resources` backport to look for download checksums.

Every source here returns records in the project's common format:
`{"id", "task", "images": {"img0": PIL RGB, ...}, "conversations": [{"from", "value"}, ...], "objects": [[...]]}`;
records with videos (the shapes "video_motion" task) add `"videos": {"vid0": video file bytes}`, which the Qwen2-VL
processor decodes (`data.video.read_video`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from qwenvl_jax.data import shapes
from qwenvl_jax.data.boxes import box_text, normalize_box
from qwenvl_jax.data.video import DEFAULT_FPS, read_video, write_video

SHAPES_DATASET_NAME = "qwenvl_shapes"
BOX_FORMATS = ("xyxy_pixels", "yxyx_normalized", "xyxy_normalized", "xywh_pixels")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Sizes and rendering of one build of the shapes dataset (the records are `shapes.generate(split, i, ...)`)."""
  num_train: int = shapes.TRAIN_SIZE
  num_validation: int = shapes.VALIDATION_SIZE
  num_test: int = shapes.TEST_SIZE
  seed: int = 0
  image_size: int = shapes.DEFAULT_IMAGE_SIZE
  # (task, weight) pairs rather than a dict: configs should stay immutable.
  mix: tuple[tuple[str, float], ...] | None = None

  def split_sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


class ShapesDataset(tfds.core.GeneratorBasedBuilder):
  """The embedded synthetic "shapes" dataset (see `qwenvl_jax.data.shapes`) as an array_record TFDS dataset.

  Configs: "default" (20000/500/500 at 112 px), "tiny" (20/5/5 at 112 px), "res448" (default sizes at 448 px);
  pass `config=ShapesConfig(name=..., ...)` for any other build. Record i of a split is `shapes.generate(split, i)`
  (shuffling is disabled so the order is kept). Videos are stored as video files (lossless FFV1 in Matroska at
  DEFAULT_FPS frames per second, so sampling them at that rate gives back every frame, pixel for pixel).
  """

  name = SHAPES_DATASET_NAME
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release.",
                                             "1.1.0": "Videos (video file bytes) for the video_motion task."}
  BUILDER_CONFIGS: ClassVar[list[ShapesConfig]] = [
    ShapesConfig(name="default", description="20000/500/500 records at 112 px."),
    ShapesConfig(name="tiny", num_train=20, num_validation=5, num_test=5, description="20/5/5 records, for tests."),
    ShapesConfig(name="res448", image_size=448, description="20000/500/500 records at 448 px."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS only uses the code path to find download checksums (there are no downloads here), and finding it for a
    # class inside a package needs the optional `importlib_resources` backport, which TFDS does not install.
    return None

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    # TFDS defaults to tfrecord, whose writer needs TensorFlow; array_record is also what data sources read.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Synthetic coloured shapes and rendered words with Qwen-VL style multi-task conversations.",
      features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "task": tfds.features.Text(),
        "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="png")),
        "image_names": tfds.features.Sequence(tfds.features.Text()),
        "videos": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),  # encoded files
        "video_names": tfds.features.Sequence(tfds.features.Text()),
        "conversations_json": tfds.features.Text(),
        "objects_json": tfds.features.Text(),
      }),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # everything is generated
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes().items()
            if n > 0}

  def _generate_examples(self, split: str, num_records: int):
    config = self.builder_config
    source = shapes.ShapesSource(split, num_records, seed=config.seed, image_size=config.image_size,
                                 mix=dict(config.mix) if config.mix is not None else None)
    for index in range(num_records):
      yield index, record_to_example(source[index])


def record_to_example(record: Mapping[str, Any]) -> dict[str, Any]:
  """Common-format record -> a `ShapesDataset` example (PIL images, videos as video file bytes, JSON text for the
  nested fields). A video given as frames is encoded here; one given as a file's bytes is kept as it is."""
  names = list(record["images"])
  videos = record.get("videos") or {}
  return {
    "id": record["id"],
    "task": record["task"],
    "images": [record["images"][name].convert("RGB") for name in names],
    "image_names": names,
    "videos": [_video_bytes(videos[name]) for name in videos],
    "video_names": list(videos),
    "conversations_json": json.dumps(record["conversations"]),
    "objects_json": json.dumps(record.get("objects", [])),
  }


def example_to_record(example: Mapping[str, Any]) -> dict[str, Any]:
  """A decoded `ShapesDataset` example (as a data source returns it) -> common-format record."""
  names = [_to_text(name) for name in example["image_names"]]
  record = {
    "id": _to_text(example["id"]),
    "task": _to_text(example["task"]),
    "images": {name: _to_pil(image) for name, image in zip(names, example["images"])},
    "conversations": json.loads(_to_text(example["conversations_json"])),
    "objects": json.loads(_to_text(example["objects_json"])),
  }
  video_names = [_to_text(name) for name in example.get("video_names", ())]
  if video_names:  # as shapes.generate: only records with videos have the key
    record["videos"] = {name: bytes(data) for name, data in zip(video_names, example["videos"])}
  return record


def _video_bytes(video) -> bytes:
  """A video file's bytes as given, or frames encoded at DEFAULT_FPS (read back at that rate: the same frames)."""
  if isinstance(video, (bytes, bytearray, memoryview, np.bytes_)):
    return bytes(video)
  data = write_video(video, fps=DEFAULT_FPS)
  if len(read_video(data, fps=DEFAULT_FPS)) != len(video):  # cheap (tiny clips), and a wrong rate would be silent
    raise ValueError(f"a {len(video)}-frame clip does not read back frame for frame at {DEFAULT_FPS} fps")
  return data


def prepare_shapes(data_dir: str | os.PathLike, config: str | ShapesConfig = "default") -> ShapesDataset:
  """Build (once) the shapes dataset under data_dir; returns the builder."""
  builder = ShapesDataset(data_dir=os.fspath(data_dir), config=config)
  builder.download_and_prepare()
  return builder


class ShapesTfdsSource:
  """Random-access source over a prepared `ShapesDataset` split, yielding common-format records."""

  def __init__(self, data_dir: str | os.PathLike, split: str, config: str | ShapesConfig = "default"):
    self.data_dir = os.fspath(data_dir)
    self.split = split
    self.config_name = config if isinstance(config, str) else config.name
    if isinstance(config, str) and config not in ShapesDataset.builder_configs:
      # A build made with a custom ShapesConfig: read it back from its files, no config object needed.
      path = os.path.join(self.data_dir, SHAPES_DATASET_NAME, config, str(ShapesDataset.VERSION))
      if not os.path.isdir(path):
        raise FileNotFoundError(f"no {SHAPES_DATASET_NAME} build named {config!r} in {self.data_dir}")
      builder = tfds.builder_from_directory(path)
    else:
      builder = ShapesDataset(data_dir=self.data_dir, config=config)
    if not builder.is_prepared():
      raise FileNotFoundError(f"{SHAPES_DATASET_NAME}/{self.config_name} is not prepared in {self.data_dir}; "
                              "run qwenvl_jax.data.tfds_sources.prepare_shapes(data_dir, config) first")
    self._source = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return example_to_record(self._source[_check_index(index, len(self))])

  def __repr__(self) -> str:
    return (f"ShapesTfdsSource(data_dir={self.data_dir!r}, split={self.split!r}, config={self.config_name!r}, "
            f"num_records={len(self)})")


# Adapters for TFDS datasets prepared by the user (any random-access source of decoded example dicts).

def _check_index(index: int, length: int) -> int:
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"index {index} out of range for {length} records")
  return index


def _to_text(value: Any) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def _to_pil(value: Any) -> Image.Image:
  """A decoded image (HxWxC uint8 array), encoded bytes or a PIL image -> PIL RGB."""
  if isinstance(value, Image.Image):
    image = value
  elif isinstance(value, (bytes, np.bytes_)):
    image = Image.open(io.BytesIO(bytes(value)))
  else:
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]  # PIL wants grayscale as HxW
    if array.dtype != np.uint8:
      raise ValueError(f"expected a uint8 image, got {array.dtype} {array.shape}")
    image = Image.fromarray(array)
  return image if image.mode == "RGB" else image.convert("RGB")


def _get(example: Mapping[str, Any], key: str) -> Any:
  """example[key]; "a/b" reads nested feature dicts (e.g. "captions/text", "objects/bbox")."""
  value: Any = example
  for part in key.split("/"):
    value = value[part]
  return value


def _is_many(value: Any) -> bool:
  """A list of alternatives (texts or per-object items) rather than a single text."""
  return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0)


def _pick(count: int, index: int, seed: int, choice: str) -> int:
  """Which of `count` alternatives record `index` uses: the first, or a choice fixed by (seed, index)."""
  if count == 0:
    raise ValueError(f"record {index} has nothing to choose from")
  if choice == "first":
    return 0
  return int(np.random.default_rng([seed, index]).integers(count))


class _TfdsAdapter:
  """Shared plumbing: random access, image conversion, ids."""

  task = ""

  def __init__(self, data_source: Sequence[Mapping[str, Any]], image_key: str, id_key: str | None, name: str,
               choice: str, seed: int):
    if choice not in ("first", "random"):
      raise ValueError(f"choice must be 'first' or 'random', got {choice!r}")
    self.data_source = data_source
    self.image_key = image_key
    self.id_key = id_key
    self.name = name
    self.choice = choice
    self.seed = int(seed)

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    example = self.data_source[index]
    image = _to_pil(_get(example, self.image_key))
    turns, objects = self._turns(example, index, image.size)
    conversations = []
    for k, (question, answer) in enumerate(turns):
      conversations.append({"from": "user", "value": (shapes.picture_prefix(1) if k == 0 else "") + question})
      conversations.append({"from": "assistant", "value": answer})
    record_id = _to_text(_get(example, self.id_key)) if self.id_key else f"{self.name}-{index:07d}"
    return {"id": record_id, "task": self.task, "images": {"img0": image}, "conversations": conversations,
            "objects": [objects]}

  def _turns(self, example: Mapping[str, Any], index: int, size: tuple[int, int]) -> tuple[list, list]:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, num_records={len(self)}, image_key={self.image_key!r})"


class TfdsCaptionSource(_TfdsAdapter):
  """Captioning examples (an image and one caption or a list of them) -> "caption" records.

  `caption_key` may be nested ("captions/text"); with several captions `choice` takes the first, or ("random") one
  fixed by (seed, index) so the record stays deterministic.
  """

  task = "caption"

  def __init__(self, data_source: Sequence[Mapping[str, Any]], image_key: str = "image",
               caption_key: str = "captions", *, prompt: str = shapes.CAPTION_PROMPT, id_key: str | None = None,
               name: str = "tfds", choice: str = "first", seed: int = 0):
    super().__init__(data_source, image_key, id_key, name, choice, seed)
    self.caption_key = caption_key
    self.prompt = prompt

  def _turns(self, example: Mapping[str, Any], index: int, size: tuple[int, int]) -> tuple[list, list]:
    captions = _get(example, self.caption_key)
    if _is_many(captions):
      captions = captions[_pick(len(captions), index, self.seed, self.choice)]
    return [(self.prompt, _to_text(captions))], []


class TfdsRefExpSource(_TfdsAdapter):
  """Referring-expression examples (image, phrase, box) -> "grounding" records: `<ref>phrase</ref>` -> `<box>`.

  box_format: "xyxy_pixels", "yxyx_normalized" (TFDS BBoxFeature), "xyxy_normalized" or "xywh_pixels" (COCO).
  The box may also be an (N, 4) array of N objects with N phrases (each a text or a list of alternative texts);
  then one object is used per record, chosen like a phrase (`choice`). Boxes are clipped to the image when
  `clip` (annotations often overshoot by a pixel).
  """

  task = "grounding"

  def __init__(self, data_source: Sequence[Mapping[str, Any]], image_key: str = "image", phrase_key: str = "phrase",
               box_key: str = "bbox", box_format: str = "xyxy_pixels", *, id_key: str | None = None,
               name: str = "tfds", choice: str = "first", seed: int = 0, clip: bool = True):
    super().__init__(data_source, image_key, id_key, name, choice, seed)
    if box_format not in BOX_FORMATS:
      raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    self.phrase_key = phrase_key
    self.box_key = box_key
    self.box_format = box_format
    self.clip = clip

  def pixel_box(self, box: Any, width: int, height: int) -> list[float]:
    """One box in `box_format` -> pixel [x1, y1, x2, y2]."""
    values = np.asarray(box, dtype=np.float64).reshape(4)
    if self.box_format.endswith("_normalized"):
      # Undo float32 storage error (0.7 is stored as 0.69999999) so it cannot floor to the integer below.
      values = np.round(values, 6)
    a, b, c, d = (float(v) for v in values)
    if self.box_format == "xyxy_pixels":
      return [a, b, c, d]
    if self.box_format == "yxyx_normalized":
      return [b * width, a * height, d * width, c * height]
    if self.box_format == "xyxy_normalized":
      return [a * width, b * height, c * width, d * height]
    return [a, b, a + c, b + d]  # xywh_pixels

  def _turns(self, example: Mapping[str, Any], index: int, size: tuple[int, int]) -> tuple[list, list]:
    width, height = size
    boxes = np.asarray(_get(example, self.box_key), dtype=np.float64)
    phrases = _get(example, self.phrase_key)
    if boxes.ndim == 2:
      obj = _pick(len(boxes), index, self.seed, self.choice)
      if not _is_many(phrases) or len(phrases) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes need as many phrases under {self.phrase_key!r}")
      boxes, phrases = boxes[obj], phrases[obj]
    if _is_many(phrases):
      phrases = phrases[_pick(len(phrases), index, self.seed, self.choice)]
    phrase = _to_text(phrases)
    box = self.pixel_box(boxes, width, height)
    answer = box_text(normalize_box(box, width, height, clip=self.clip))
    return [(f"<ref>{phrase}</ref>", answer)], [{"phrase": phrase, "box": box}]

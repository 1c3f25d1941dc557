"""A prepared TFDS image-classification dataset opened from its metadata alone, without TFDS."""

import dataclasses
import json
import os

# Importing TFDS takes about 0.3 s after TensorFlow (bench/README.md), and a run on data already
# prepared needs only its metadata. TFDS writes a prepared dataset as data_dir/NAME/VERSION/:
# dataset_info.json (its DatasetInfo proto as JSON), features.json (the feature spec),
# LABEL.labels.txt when the classes have names, and one record file per shard named by the
# split's template (tensorflow_datasets/core/naming.py: ShardedFileTemplate, shard numbers of at
# least 5 digits; core/features/class_label_feature.py: the names file). Only that layout, with
# TFRecord files, an Image and a ClassLabel, is read here: for anything else open_prepared
# returns None and the caller opens the dataset with TFDS itself.
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_FEATURES = "tensorflow_datasets.core.features.features_dict.FeaturesDict"
_IMAGE = "tensorflow_datasets.core.features.image_feature.Image"
_LABEL = "tensorflow_datasets.core.features.class_label_feature.ClassLabel"


def open_read_only(version_dir: str):
  """The dataset prepared in version_dir: read here when its layout is the plain one, else by
  TFDS's builder_from_directory (which imports TFDS)."""
  prepared = open_prepared(version_dir)
  if prepared is not None:
    return prepared
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.builder_from_directory(version_dir)


def open_prepared(version_dir: str):
  """A PreparedDataset for the TFDS dataset prepared in version_dir, or None when its metadata
  is not the plain layout described above (or cannot be read)."""
  try:
    with open(os.path.join(version_dir, "dataset_info.json")) as f:
      info = json.load(f)
    with open(os.path.join(version_dir, "features.json")) as f:
      features = json.load(f)
    return _prepared(version_dir, info, features)
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  filepaths: list  # absolute paths in shard order (lists, as TFDS gives them)
  shard_lengths: list

  @property
  def num_examples(self) -> int:
    return sum(self.shard_lengths)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  shape: tuple  # None for a dimension that varies


@dataclasses.dataclass(frozen=True)
class LabelInfo:
  num_classes: int
  names: list


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  splits: dict  # split name -> SplitInfo
  features: dict  # "image" -> ImageInfo, "label" -> LabelInfo


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """What the trainer reads of a TFDS builder: name, data_dir, info.splits, info.features."""
  name: str
  data_dir: str
  info: DatasetInfo

  def is_prepared(self) -> bool:
    return True

  def as_dataset(self, **kwargs):
    """Reading the records themselves is TFDS' job (only when no decoded copy exists)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    return tfds.builder_from_directory(self.data_dir).as_dataset(**kwargs)


def _prepared(version_dir: str, info: dict, features: dict):
  if info.get("fileFormat", "tfrecord") != "tfrecord" or features["pythonClassName"] != _FEATURES:
    return None
  spec = features["featuresDict"]["features"]
  if set(spec) != {"image", "label"}:
    return None
  image, label = spec["image"], spec["label"]
  if image["pythonClassName"] != _IMAGE or label["pythonClassName"] != _LABEL:
    return None
  if image["image"].get("dtype", "uint8") != "uint8":
    return None
  shape = tuple(None if int(d) < 0 else int(d) for d in image["image"]["shape"]["dimensions"])
  num_classes = int(label["classLabel"]["numClasses"])
  splits = {}
  for split in info["splits"]:
    if split.get("filepathTemplate", _TEMPLATE) != _TEMPLATE:
      return None
    lengths = [int(n) for n in split["shardLengths"]]
    splits[split["name"]] = SplitInfo(
        [os.path.join(version_dir, _shard_name(info["name"], split["name"], i, len(lengths)))
         for i in range(len(lengths))], lengths)
  return PreparedDataset(
      name=info["name"], data_dir=version_dir,
      info=DatasetInfo(splits=splits, features={
          "image": ImageInfo(shape),
          "label": LabelInfo(num_classes, _label_names(version_dir, num_classes))}))


def _shard_name(dataset: str, split: str, index: int, count: int) -> str:
  digits = max(5, len(str(count)))
  return f"{dataset}-{split}.tfrecord-{index:0{digits}d}-of-{count:0{digits}d}"


def _label_names(version_dir: str, num_classes: int) -> list:
  """The names TFDS saved next to the metadata, else "0", "1", ... as TFDS gives them."""
  try:
    with open(os.path.join(version_dir, "label.labels.txt")) as f:
      names = [line.strip() for line in f.read().split("\n") if line.strip()]
  except OSError:
    return [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"label.labels.txt names {len(names)} classes, not {num_classes}")
  return names

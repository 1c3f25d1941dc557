"""trainer.data.tfds_metadata reads what TFDS itself reads from a prepared dataset, or declines."""

import json
import os
import shutil

import pytest
import tensorflow_datasets as tfds

from image_folder_test import make_folder
from trainer import data
from trainer.data import cache
from trainer.data import tfds_metadata


def _version_dir(data_dir, name):
  folder = os.path.join(data_dir, name)
  (version,) = [v for v in os.listdir(folder) if v[0].isdigit()]
  return os.path.join(folder, version)


def _assert_same_as_tfds(version_dir):
  ours = tfds_metadata.open_prepared(version_dir)
  theirs = tfds.builder_from_directory(version_dir)
  assert ours is not None
  assert (ours.name, ours.data_dir) == (theirs.name, str(theirs.data_dir))
  assert set(ours.info.splits) == set(theirs.info.splits)
  for split, info in theirs.info.splits.items():
    mine = ours.info.splits[split]
    assert list(mine.filepaths) == [str(p) for p in info.filepaths]
    assert all(os.path.isfile(p) for p in mine.filepaths)
    assert list(mine.shard_lengths) == list(info.shard_lengths)
    assert mine.num_examples == info.num_examples
  assert tuple(ours.info.features["image"].shape) == tuple(theirs.info.features["image"].shape)
  label = theirs.info.features["label"]
  assert ours.info.features["label"].num_classes == label.num_classes
  assert list(ours.info.features["label"].names) == list(label.names)
  return ours


@pytest.mark.slow  # real MNIST is prepared once per process; the fast tier has synthetic data
def test_mnist_as_tfds_reads_it(tfds_dir):
  ours = _assert_same_as_tfds(_version_dir(tfds_dir, "mnist"))
  assert ours.info.splits["train"].num_examples == 60000


def test_four_shards_as_tfds_reads_them(synthetic_tfds_dir):
  ours = _assert_same_as_tfds(_version_dir(synthetic_tfds_dir, "mnist"))
  assert len(ours.info.splits["train"].filepaths) == 4


def test_an_image_folder_with_class_names_as_tfds_reads_it(tmp_path):
  folder = make_folder(tmp_path / "images", per_class=6)
  builder = data.prepare(f"image_folder:{folder}", str(tmp_path / "tfds"), eval_fraction=0.3)
  assert isinstance(builder, tfds_metadata.PreparedDataset)  # the trainer's path, too
  ours = _assert_same_as_tfds(builder.data_dir)
  assert len(ours.info.features["label"].names) == ours.info.features["label"].num_classes > 1
  # Decoding (a cache miss) is TFDS's job, through the same object.
  images, labels = cache.decode_split(ours, "test")
  assert len(images) == len(labels) == ours.info.splits["test"].num_examples


@pytest.mark.parametrize("change", [
    lambda info, features: info.update(fileFormat="array_record"),
    lambda info, features: info["splits"][0].update(filepathTemplate="{SPLIT}-{SHARD_INDEX}"),
    lambda info, features: features["featuresDict"]["features"].update(extra={"x": 1}),
    lambda info, features: features["featuresDict"]["features"]["image"]["image"].update(
        dtype="uint16"),
])
def test_another_layout_is_left_to_tfds(synthetic_tfds_dir, tmp_path, change):
  version_dir = str(tmp_path / "mnist" / "3.0.1")
  shutil.copytree(_version_dir(synthetic_tfds_dir, "mnist"), version_dir,
                  ignore=shutil.ignore_patterns("*.npy"))
  with open(os.path.join(version_dir, "dataset_info.json")) as f:
    info = json.load(f)
  with open(os.path.join(version_dir, "features.json")) as f:
    features = json.load(f)
  change(info, features)
  with open(os.path.join(version_dir, "dataset_info.json"), "w") as f:
    json.dump(info, f)
  with open(os.path.join(version_dir, "features.json"), "w") as f:
    json.dump(features, f)
  assert tfds_metadata.open_prepared(version_dir) is None


@pytest.mark.parametrize("damage", ["truncated", "missing", "label_names"])
def test_damaged_metadata_is_left_to_tfds(synthetic_tfds_dir, tmp_path, damage):
  version_dir = str(tmp_path / "mnist" / "3.0.1")
  shutil.copytree(_version_dir(synthetic_tfds_dir, "mnist"), version_dir,
                  ignore=shutil.ignore_patterns("*.npy"))
  info_path = os.path.join(version_dir, "dataset_info.json")
  if damage == "truncated":
    with open(info_path, "r+") as f:
      f.truncate(os.path.getsize(info_path) // 2)
  elif damage == "missing":
    os.remove(os.path.join(version_dir, "features.json"))
  else:  # a names file that does not match the class count
    with open(os.path.join(version_dir, "label.labels.txt"), "w") as f:
      f.write("a\nb\n")
  assert tfds_metadata.open_prepared(version_dir) is None

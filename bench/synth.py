"""Synthetic MNIST-shaped TFDS datasets (28x28x1 uint8 PNG images, 10 classes) of any size.

`write(data_dir, "synth_mnist30x", 30 * 60_000)` writes data_dir/synth_mnist30x/1.0.0/ with
`shards` train record files, a 10,000-example test split and TFDS metadata, so the trainer reads
it with `--dataset=synth_mnist30x --data_dir=data_dir` (tfds.builder falls back to the files
when no builder class has that name). The first MNIST_TRAIN images are distinct; larger sizes
repeat them (with the same labels): enough to measure memory and throughput, not accuracy.
"""

import os

import numpy as np

MNIST_TRAIN = 60_000
TEST_EXAMPLES = 10_000
VERSION = "1.0.0"


def name_for(multiple) -> str:
  return f"synth_mnist{multiple}x"


def images(count: int, seed: int) -> tuple:
  """(uint8 [count, 28, 28, 1] images, int labels): random 7x7 blobs scaled up 4x, so the PNGs
  compress about as well as MNIST's."""
  rng = np.random.default_rng(seed)
  blobs = (rng.random((count, 7, 7)) > 0.7).astype(np.uint8) * 255
  pixels = blobs.repeat(4, axis=1).repeat(4, axis=2)[..., None]
  return pixels, rng.integers(0, 10, count)


def _features():
  import tensorflow_datasets as tfds
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(28, 28, 1)),
      "label": tfds.features.ClassLabel(num_classes=10)})


def _serialized(features, count: int, seed: int) -> list:
  pixels, labels = images(count, seed)
  return [features.serialize_example({"image": p, "label": int(l)})
          for p, l in zip(pixels, labels)]


def _write_split(directory: str, name: str, split: str, records: list, total: int,
                 shards: int) -> list:
  """Writes `total` records (cycling through `records`) into `shards` files; returns counts."""
  import tensorflow as tf
  counts = [total // shards + (i < total % shards) for i in range(shards)]
  index = 0
  for shard, count in enumerate(counts):
    path = os.path.join(directory, f"{name}-{split}.tfrecord-{shard:05d}-of-{shards:05d}")
    with tf.io.TFRecordWriter(path) as writer:
      for _ in range(count):
        writer.write(records[index % len(records)])
        index += 1
  return counts


def write(data_dir: str, name: str, train_examples: int, shards: int = 8,
          distinct: int = MNIST_TRAIN, test_examples: int = TEST_EXAMPLES) -> str:
  """Writes the dataset unless it is complete already (its dataset_info.json is written last);
  returns its version directory."""
  import tensorflow_datasets as tfds
  directory = os.path.join(data_dir, name, VERSION)
  if os.path.exists(os.path.join(directory, "dataset_info.json")):
    return directory
  os.makedirs(directory, exist_ok=True)
  for stale in os.listdir(directory):  # an interrupted earlier attempt
    os.remove(os.path.join(directory, stale))
  features = _features()
  train = _serialized(features, min(distinct, train_examples), seed=1)
  test = _serialized(features, test_examples, seed=2)
  split_infos = []
  for split, records, total, count in (("train", train, train_examples, shards),
                                       ("test", test, test_examples, 1)):
    lengths = _write_split(directory, name, split, records, total, count)
    num_bytes = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                    if f.startswith(f"{name}-{split}."))
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                           num_bytes=num_bytes, filename_template=None))
  tfds.folder_dataset.write_metadata(data_dir=directory, features=features,
                                     split_infos=split_infos, check_data=False,
                                     description="Synthetic MNIST-shaped data (bench/synth.py).")
  return directory

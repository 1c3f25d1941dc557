"""MNIST's four IDX files written as TFDS's own `mnist` dataset (its name, version, features,
metadata, record files and record order), without TFDS's per-example Python.

TFDS's builder encodes each image with its own eager call and then encodes, serializes,
hashes and shuffles each example in Python: about 7 s of a first run, and decoding the written
PNGs back for the in-memory cache another 4 s. Here the images are encoded in one parallel
tf.data pass, each split is written in the order TFDS's builder writes it, with TFDS's public
metadata types (tfds.core.DatasetInfo, SplitInfo), and the decoded arrays the cache keeps come
from the IDX files themselves (PNG is lossless). tests/data_test.py compares the result with
what TFDS's own builder writes, example by example and field by field of dataset_info.json, so
a TFDS upgrade that changes either fails there, loudly. bench/README.md says what it saves.
"""

import hashlib
import os
import secrets
import shutil

import numpy as np

from trainer.data import mnist

# The four files' names in TFDS's MNIST builder, by split (it reads the same canonical files).
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def write(builder, source: str, num_shards: int = 0) -> dict:
  """Writes TFDS's mnist `builder` (tfds.builder("mnist", data_dir=...), not prepared) from
  the IDX files in source; returns {split: (uint8 images
  (N, 28, 28, 1), int32 labels)} in the order the split's records hold them.

  The version folder appears whole, in one rename, as TFDS's builder makes it: it writes into
  an incomplete.XXXXXX_VERSION folder first (trainer/data/sources.py removes one a killed
  preparation left). num_shards (0: one file per split, the count TFDS chooses for MNIST's
  19 MB) is the number of record files per split; the arrays are the files' records one file
  after the other. The caller holds the dataset's lock.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  info = builder.info
  version_dir = str(builder.data_dir)
  parent = os.path.dirname(version_dir)
  os.makedirs(parent, exist_ok=True)
  # TFDS's own name for a version being written (tensorflow_datasets/core/utils/file_utils.py,
  # incomplete_dir): sources.py removes the ones killed preparations leave, TFDS's or these.
  staged = os.path.join(parent, f"incomplete.{secrets.token_hex(3).upper()}_{info.version}")
  os.mkdir(staged)
  try:
    arrays, split_infos = {}, []
    for split, (images_file, labels_file) in FILES.items():
      images = mnist.read_idx(os.path.join(source, images_file))[..., np.newaxis]
      labels = mnist.read_idx(os.path.join(source, labels_file)).astype(np.int32)
      order = record_order(split, len(labels))
      images, labels = images[order], labels[order]
      template = tfds.core.ShardedFileTemplate(
          data_dir=staged, dataset_name=info.name, split=split,
          filetype_suffix=info.file_format.file_suffix)
      lengths, num_bytes = _write_records(template, images, labels, num_shards or 1)
      split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                             num_bytes=num_bytes, filename_template=template))
      arrays[split] = images, labels
    info.set_splits(tfds.core.SplitDict(split_infos))
    info.download_size = sum(os.path.getsize(os.path.join(source, name))
                             for pair in FILES.values() for name in pair)
    info.write_to_directory(staged)
    os.rename(staged, version_dir)
  finally:
    shutil.rmtree(staged, ignore_errors=True)  # only after a failure: the rename moved it
  return arrays


def record_order(split: str, count: int) -> np.ndarray:
  """The indices of a split's examples in the order TFDS's builder writes them.

  TFDS keys MNIST's examples by their index in the IDX file and writes a split sorted by the
  MD5 of the split's name followed by the key's decimal digits (tensorflow_datasets/core/
  hashing.py and shuffle.py; hashing.py's contract: changing this changes every dataset's order
  and needs a major version).
  """
  salt = hashlib.md5(split.encode())
  def key(index):
    md5 = salt.copy()
    md5.update(str(index).encode())
    return md5.digest()  # big-endian bytes sort as TFDS's 128-bit integers do
  return np.array(sorted(range(count), key=key), dtype=np.int64)


def _write_records(template, images: np.ndarray, labels: np.ndarray, num_shards: int):
  """The split's examples as tf.train.Example records in num_shards files, shard i holding
  examples [round(N*i/k), round(N*(i+1)/k)) as TFDS shards them; returns (lengths, bytes of the
  serialized examples), which TFDS's SplitInfo records."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  pngs = _encode_png(images)
  bounds = [0] + [round(len(labels) * i / num_shards) for i in range(1, num_shards + 1)]
  # One Example, its two values replaced per record: a fresh message per record cost more
  # than the rest of the writing.
  example = tf.train.Example(features=tf.train.Features(feature={
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""])),
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[0]))}))
  image = example.features.feature["image"].bytes_list.value
  label = example.features.feature["label"].int64_list.value
  lengths, num_bytes = [], 0
  for shard in range(num_shards):
    path = template.sharded_filepath(shard_index=shard, num_shards=num_shards)
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
      for i in range(bounds[shard], bounds[shard + 1]):
        image[0], label[0] = pngs[i], labels[i]
        record = example.SerializeToString(deterministic=True)  # features by name, as TFDS's
        writer.write(record)
        num_bytes += len(record)
    lengths.append(bounds[shard + 1] - bounds[shard])
  return lengths, num_bytes


def _encode_png(images: np.ndarray) -> list:
  """Each image PNG-encoded by tf.io.encode_png (the op TFDS's Image feature runs), in batches
  of 1,000 side by side: one tf.data element per image cost more than its encoding."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  encoded = tf.data.Dataset.from_tensor_slices(images).batch(1000).map(
      lambda batch: tf.map_fn(tf.io.encode_png, batch, fn_output_signature=tf.string),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return [png for batch in encoded.as_numpy_iterator() for png in batch]

"""A split's decoded arrays, kept beside the prepared data: decoded once (PNG for MNIST costs
seconds every run), named by a hash of the record files, checksummed, rebuilt on any mismatch.

On disk, beside the builder's record files: decoded-SPLIT-KEY-images.npy and -labels.npy (KEY
hashes the record files' names and bytes, so a changed dataset is decoded again, never read
stale) and decoded-SPLIT-KEY-crc32.json, the arrays' CRC-32s, written after both arrays: arrays
without it are never used.
"""

import hashlib
import json
import logging
import os
import zlib

import numpy as np
import tensorflow as tf

from trainer import errors
from trainer import storage
from trainer.data import files


def load_split(builder, split: str, limit: int):
  """(uint8 images, int32 labels) of the split's first `limit` examples (0: all).

  The kept arrays when they are sound, else the split decoded and kept for the next run. The
  CRC-32 of each array, recorded when it is written, is checked when it is read (about 12 ms for
  MNIST's 47 MB train split): a damaged array is decoded again, with one warning, never trained
  or evaluated on.
  """
  images, labels = read_cached(builder, split)
  if images is None:
    try:
      images, labels = decode_split(builder, split)
    except tf.errors.DataLossError as e:
      raise errors.DataError(
          f"A record file of the prepared {builder.name} {split} split in {builder.data_dir} "
          f"is damaged ({str(e).strip().splitlines()[0][:300]}): prepare the dataset again (a "
          "new --data_dir, or delete the dataset's folder in it); of a gs:// --data_dir, whose "
          "local copies were checked against the bucket, upload a good copy.") from None
    save(builder, split, images, labels)
  if limit:
    images, labels = images[:limit], labels[:limit]
  return np.asarray(images), np.asarray(labels)


def decode_split(builder, split: str):
  """(uint8 images, int32 labels) of the whole split, decoded by TFDS; nothing is kept."""
  import tensorflow_datasets as tfds
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32)


def read_cached(builder, split: str) -> tuple:
  """The kept arrays when they are there and match the checksums recorded with them, else
  (None, None) (a mismatch is logged: the split is decoded again and the arrays rewritten)."""
  images_path, labels_path = decoded_paths(builder, split)
  try:
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(labels_path, mmap_mode="r")
  except (OSError, ValueError):
    return None, None
  if len(images) != len(labels) or images.dtype != np.uint8 or labels.dtype != np.int32:
    logging.warning("The decoded %s split in %s has damaged headers: decoding it again.", split,
                    images_path)
    return None, None
  sums_path = checksums_path(images_path)
  try:
    with open(sums_path) as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    # Written by an older version (no checksums) or interrupted before its last file.
    logging.info("No checksums for the decoded %s split (%s): decoding it again.", split,
                 sums_path)
    return None, None
  for name, array, path in (("images", images, images_path), ("labels", labels, labels_path)):
    actual = _crc32(array)
    if not isinstance(recorded, dict) or recorded.get(name) != actual:
      logging.warning("The decoded %s split's %s (%s) do not match the checksum recorded when "
                      "they were written (CRC-32 %08x, recorded %s): damaged since; decoding "
                      "the split again.", split, name, path, actual,
                      recorded.get(name) if isinstance(recorded, dict) else recorded)
      return None, None
  return images, labels


def decoded_paths(builder, split: str) -> tuple:
  """(images .npy, labels .npy) named by the hash of the split's record files."""
  digest = hashlib.sha256()
  for path in builder.info.splits[split].filepaths:
    digest.update(os.path.basename(str(path)).encode())
    digest.update(files.sha256(str(path)).encode())
  key = digest.hexdigest()[:16]
  base = os.path.join(str(builder.data_dir), f"decoded-{split}-{key}")
  return base + "-images.npy", base + "-labels.npy"


def checksums_path(images_path: str) -> str:
  """The JSON beside a decoded split's arrays: their CRC-32s, written after both arrays."""
  return images_path[:-len("-images.npy")] + "-crc32.json"


def save(builder, split: str, images, labels) -> None:
  """Keeps a split's whole decoded arrays for the next runs. Best effort (a read-only data_dir just decodes every run); each file lands whole, and the
  checksums go last, so arrays without them are never used."""
  images_path, labels_path = decoded_paths(builder, split)
  sums = json.dumps({"images": _crc32(images), "labels": _crc32(labels)})
  writes = ((images_path, lambda f: np.save(f, images)),
            (labels_path, lambda f: np.save(f, labels)),
            (checksums_path(images_path), lambda f: f.write(sums.encode())))
  for path, write in writes:
    try:
      storage.atomic_write_local(path, write)
    except OSError as e:  # a full disk keeps no half-written array
      logging.info("Not caching the decoded %s split (%s); it is decoded every run.", split, e)
      return


def _crc32(array: np.ndarray) -> int:
  """CRC-32 of the array's bytes (zlib's, about 4 GB/s here: the cheapest check in stdlib)."""
  return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))

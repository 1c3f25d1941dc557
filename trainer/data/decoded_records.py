"""Stream mode's decoded copies: each record file of a worker decoded once into fixed-length raw records.

Decoding PNG/JPEG records costs more CPU per image than the training step leaves free on a small
machine, and stream mode would pay it every epoch. When a run reads every record of its files at
least once anyway (so decoding them up front is never extra work), each file this worker reads is
decoded once into a file of fixed-length records (label int32, then the image's uint8 pixels),
beside the record file, and read back with tf.data's FixedLengthRecordDataset: the same records,
in the same order and count, so the epoch plan, sharding and resume are unchanged. Memory stays
bounded (a batch at a time); the copy is skipped (decoded while training, as before) when the
images have no fixed shape, the disk is short of room, or the folder is not writable.

Each copy ends in a footer holding the CRC-32 of its records, computed while they are written
and checked before the copy is used (zlib.crc32 runs at about 4 GB/s here: ~12 ms for the
47 MB copy of MNIST's train split, split between the workers that read it). A copy that does
not match is made again, with one warning: a damaged copy is never trained on.
"""

import functools
import hashlib
import logging
import os
import re
import shutil
import struct
import time
import zlib

import numpy as np
import tensorflow as tf

from trainer import errors
from trainer import storage
from trainer.data import stream

LABEL_BYTES = 4  # int32, in the machine's byte order (written and read on the same machine)
SUFFIX = ".decoded"
# After the records: this marker, then the CRC-32 of every record byte (little-endian uint32).
# FixedLengthRecordDataset skips it (footer_bytes). Part of each copy's name (_decoded_path), so
# copies of an older layout are never read as this one, and are removed when remade.
FOOTER_MAGIC = b"trainer-decoded-crc32"
FOOTER = struct.Struct(f"<{len(FOOTER_MAGIC)}sI")
_READ_CHUNK = 1 << 22
# Decoded copies may take at most this share of the free space on their disk.
MAX_DISK_SHARE = 0.5
# A partial copy untouched this long was left by a killed process (one being written is
# written to continuously); it is removed.
STALE_PARTIAL_S = 600.0


def decoded_source(source: stream.RecordSource, mine, examples_read: int) -> stream.RecordSource:
  """`source` reading decoded copies of the files with indices `mine`, made here when missing;
  `source` itself when a copy would not pay (the reason is logged)."""
  reason = _why_not(source, mine, examples_read)
  # A folder that is not writable may still hold every copy, made before: they are read (each
  # checked first), as the record files would be.
  if reason and not (reason.endswith(_NOT_WRITABLE) and _all_sound(source, mine)):
    logging.info("Stream mode decodes records while training: %s.", reason)
    return source
  record_bytes = _record_bytes(source.image_shape)
  paths = tuple(_decoded_path(path, source.image_shape) for path in source.files)
  if reason:
    logging.info("Stream mode reads the decoded copies already beside its record files (%s).",
                 reason)
    return _reading(source, paths, record_bytes)
  _remove_stale_partials(os.path.dirname(paths[mine[0]]), paths)
  made = []
  for i in mine:
    problem = _damage(paths[i], source.counts[i] * record_bytes)
    if not problem:
      continue
    if problem != _MISSING:
      logging.warning("Decoded copy %s %s: decoding %s again.", paths[i], problem,
                      source.files[i])
    try:
      _write(source, i, paths[i], record_bytes)
    except OSError as e:
      # e.g. the disk filled up meanwhile: the copies made now go too, so the room is left
      # to the checkpoints; nothing is lost but time.
      logging.warning("Stream mode decodes records while training: could not write a decoded "
                      "copy of %s (%s).", source.files[i], e)
      for path in made:
        os.remove(path)
      return source
    made.append(paths[i])
  logging.info("Stream mode reads decoded copies of %d record file(s) (%d made now).",
               len(mine), len(made))
  return _reading(source, paths, record_bytes)


def _reading(source: stream.RecordSource, paths, record_bytes: int) -> stream.RecordSource:
  """`source`, reading the decoded copies `paths` instead of its record files."""
  return stream.RecordSource(
      files=paths, counts=source.counts, image_shape=source.image_shape,
      decode=functools.partial(_decode_raw, image_shape=source.image_shape),
      reader=functools.partial(tf.data.FixedLengthRecordDataset, record_bytes=record_bytes,
                               footer_bytes=FOOTER.size, buffer_size=1 << 20), decoded=True)


_MISSING = "is missing"
_NOT_WRITABLE = "is not writable"


def _all_sound(source: stream.RecordSource, mine) -> bool:
  record_bytes = _record_bytes(source.image_shape)
  return all(_damage(_decoded_path(source.files[i], source.image_shape),
                     source.counts[i] * record_bytes) == "" for i in mine)


def _why_not(source: stream.RecordSource, mine, examples_read: int) -> str:
  """Why decoded copies would not pay for this run ("" when they would)."""
  if any(d is None for d in source.image_shape):
    return "the images have no fixed shape"
  examples = sum(source.counts[i] for i in mine)
  if examples_read < examples:
    return (f"this run reads {examples_read} examples, fewer than the {examples} in its record "
            "files, so decoding them all first would cost more")
  needed = examples * _record_bytes(source.image_shape)
  folder = os.path.dirname(source.files[mine[0]])
  if not os.access(folder, os.W_OK):
    return f"{folder} {_NOT_WRITABLE}"
  free = shutil.disk_usage(folder).free
  if needed > MAX_DISK_SHARE * free:
    return (f"the decoded copies would take {needed / 2**20:.0f} MB, more than "
            f"{MAX_DISK_SHARE:.0%} of the {free / 2**20:.0f} MB free in {folder}")
  return ""


def _record_bytes(image_shape) -> int:
  """One decoded record: the label, then the image's pixels."""
  return LABEL_BYTES + int(np.prod(image_shape))


def _decoded_path(path: str, image_shape) -> str:
  """Named by what it was made from: a record file replaced (size or time) gets a new copy."""
  st = os.stat(path) if os.path.exists(path) else None
  stamp = f"{st.st_size}-{st.st_mtime_ns}" if st else "absent"
  key = hashlib.sha256(
      f"{stamp}-{tuple(image_shape)}-{FOOTER_MAGIC!r}".encode()).hexdigest()[:12]
  return f"{path}.{key}{SUFFIX}"


def _damage(path: str, records_size: int) -> str:
  """"" when the copy at path holds records_size bytes of records whose CRC-32 its footer
  records; else what is wrong (_MISSING when there is no copy). A copy lands whole by rename,
  so a wrong size or checksum is damage done since it was written (a disk, a person)."""
  try:
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      if size != records_size + FOOTER.size:
        return f"has {size} bytes where {records_size + FOOTER.size} were written"
      crc, left = 0, records_size
      buffer = bytearray(min(_READ_CHUNK, max(left, 1)))
      view = memoryview(buffer)
      while left:
        n = f.readinto(view[:min(left, len(buffer))])
        if not n:
          return "ends early"
        crc = zlib.crc32(view[:n], crc)
        left -= n
      magic, recorded = FOOTER.unpack(f.read(FOOTER.size))
  except FileNotFoundError:
    return _MISSING
  except OSError as e:
    return f"cannot be read ({e.strerror})"
  except struct.error:
    return "ends early"
  if magic != FOOTER_MAGIC or recorded != crc:
    return ("does not match the checksum recorded when it was written (damaged since: "
            f"CRC-32 {crc:08x}, recorded {recorded:08x})")
  return ""


def _write(source: stream.RecordSource, index: int, path: str, record_bytes: int) -> None:
  """Decodes record file `index` a batch at a time into `path` (whole, by rename, through the
  storage boundary), checks the count and removes copies of older versions of the file."""
  record_path, count = source.files[index], source.counts[index]
  ds = tf.data.TFRecordDataset(record_path).batch(256).map(
      source.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)

  def write(f):
    written = crc = 0
    for images, labels in ds:
      images, labels = images.numpy(), labels.numpy().astype(np.int32)
      rows = np.empty((len(labels), record_bytes), np.uint8)
      rows[:, :LABEL_BYTES] = labels.view(np.uint8).reshape(len(labels), LABEL_BYTES)
      rows[:, LABEL_BYTES:] = images.reshape(len(labels), -1)
      f.write(rows.data)
      crc = zlib.crc32(rows.data, crc)
      written += len(labels)
    f.write(FOOTER.pack(FOOTER_MAGIC, crc))
    if written != count:
      raise errors.DataError(
          f"Record file {record_path} holds {written} examples where the dataset's metadata "
          f"says {count}: prepare the dataset again (a new --data_dir, or delete the dataset's "
          "folder in it).")

  try:
    storage.atomic_write_local(path, write)
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
    # TensorFlow's words alone, without the function and op names around them.
    detail = re.sub(r"\{\{.*?\}\}|\s*\[Op:.*$", "", str(e).splitlines()[0]).strip()[:200]
    if source.origins:
      raise errors.DataError(
          f"Record file {source.origins[index]} is damaged in the bucket ({detail}; its local "
          f"copy {record_path} was checked against the object this run and matches it): upload "
          "a good copy of the prepared dataset folder (`gcloud storage cp -r`), or point "
          "--data_dir at another copy.") from None
    raise errors.DataError(
        f"Record file {record_path} is damaged ({detail}): prepare the dataset again (a new "
        "--data_dir, or delete the dataset's folder in it).") from None
  _remove_older_copies(record_path, keep=path)


def _remove_stale_partials(folder: str, copies) -> None:
  now = time.time()
  names = {os.path.basename(copy) for copy in copies}
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    try:
      if (any(storage.is_partial_of(name, copy) for copy in names)
          and now - os.path.getmtime(path) > STALE_PARTIAL_S):
        os.remove(path)
    except OSError:
      pass  # another worker removed it first


def _remove_older_copies(record_path: str, keep: str) -> None:
  folder, name = os.path.split(record_path)
  for other in os.listdir(folder):
    full = os.path.join(folder, other)
    if other.startswith(name + ".") and other.endswith(SUFFIX) and full != keep:
      try:
        os.remove(full)
      except OSError:
        pass  # another worker removed it first


def _decode_raw(records, image_shape):
  """Fixed-length records [B] -> (uint8 images [B, *image_shape], int32 labels [B])."""
  raw = tf.io.decode_raw(records, tf.uint8)
  labels = tf.bitcast(raw[:, :LABEL_BYTES], tf.int32)
  images = tf.reshape(raw[:, LABEL_BYTES:], [-1, *image_shape])
  return images, labels

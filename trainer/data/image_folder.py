"""--dataset=image_folder:DIR: JPEG/PNG images, one folder per class, prepared as TFDS records."""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

from trainer import config
from trainer import errors
from trainer.data import files as files_lib
from trainer.data import image_scan

PREFIX = "image_folder:"
# The prepared dataset's TFDS name and version; the folder, not the version, tells datasets apart.
NAME = "image_folder"
VERSION = "1.0.0"
# Part of the preparation key: a change in how folders are prepared re-prepares every folder.
FORMAT = 1
# Written last into a prepared dataset's directory; holds the source DIR.
PREPARED_MARKER = ".prepared-from"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"
# PNG colour type -> channels as stored (gray, RGB, palette -> RGB, gray+alpha, RGBA).
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def prepare(dataset: str, data_dir: str, image_size: int = 0, eval_fraction: float = 0.1,
            num_shards: int = 0):
  """A read-only TFDS builder of the folder `dataset` names, prepared first when needed.

  The prepared copy lives in data_dir/image_folder/KEY, KEY a hash of the folder's path, its
  files' names, sizes and modification stamps, image_size and eval_fraction: a changed folder
  gets a new KEY, so it is prepared again, never read stale. It is written under a lock into a
  temporary directory, marked last and renamed into place, so an interrupted preparation is
  never used. Bad data raises DataError naming the file or folder, before any training.
  """
  source = source_dir(dataset)
  files = _fingerprint(source)
  key = _key(source, files, image_size, eval_fraction)
  root = os.path.join(data_dir, NAME)
  target = os.path.join(root, key)
  if files_lib.has_marker(target, PREPARED_MARKER, source):
    # Complete (the marker is written last and the folder renamed into place, never replaced
    # once marked): read it without the lock, so a read-only data_dir works.
    return _read_builder(target)
  files_lib.check_writable(data_dir)
  os.makedirs(root, exist_ok=True)
  with files_lib.lock(root, key):
    if not files_lib.has_marker(target, PREPARED_MARKER, source):
      _prepare_into(source, files, target, image_size, eval_fraction, num_shards)
  return _read_builder(target)


def is_image_folder(dataset: str) -> bool:
  return dataset.startswith(PREFIX)


def source_dir(dataset: str) -> str:
  """DIR of image_folder:DIR (local, ~ expanded, or gs://)."""
  from trainer import storage
  path = dataset[len(PREFIX):].strip()
  if not path:
    raise errors.ConfigError(
        f"--dataset={dataset!r} names no folder: use --dataset=image_folder:DIR with DIR a local "
        "or gs:// folder holding one sub-folder of images per class.")
  if storage.is_gcs(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------- preparation key


def _fingerprint(source: str) -> tuple:
  """((relative path, size, stamp), ...) of every file under source, sorted; stamp is the
  modification time (local) or generation and CRC32C (gs://). DataError when there is none."""
  from trainer import storage
  files = _gcs_files(source) if storage.is_gcs(source) else _local_files(source)
  if not files:
    raise errors.DataError(
        f"--dataset=image_folder:{source} is empty: put one sub-folder of JPEG/PNG images per "
        "class in it (e.g. DIR/cat/1.jpg, DIR/dog/2.jpg).")
  return tuple(sorted(files))


def _local_files(source: str) -> list:
  if not os.path.isdir(source):
    what = "is not a folder" if os.path.exists(source) else "does not exist"
    raise errors.DataError(
        f"--dataset=image_folder:{source}: {source} {what}. Give the folder holding one "
        "sub-folder of images per class (local or gs://).")
  files = []
  for parent, folders, names in os.walk(source, followlinks=True, onerror=_unlistable):
    for name in folders:
      _check_not_a_loop(source, os.path.join(parent, name))
    for name in names:
      path = os.path.join(parent, name)
      try:
        stat = os.stat(path)
      except OSError as e:
        raise _unreadable(path, e) from None
      rel = os.path.relpath(path, source).replace(os.sep, "/")
      files.append((rel, stat.st_size, str(stat.st_mtime_ns)))
  return files


def _check_not_a_loop(source: str, folder: str) -> None:
  """DataError when folder (a symbolic link, followed) leads back to a folder that contains it:
  walking it would never end. Two links to one folder elsewhere are no loop."""
  if not os.path.islink(folder):
    return
  real = os.path.realpath(folder)
  rel = os.path.relpath(os.path.dirname(folder), source)
  parts = [] if rel == os.curdir else rel.split(os.sep)
  ancestors = [os.path.join(source, *parts[:i]) for i in range(len(parts) + 1)]
  if any(os.path.realpath(a) == real for a in ancestors):
    raise errors.DataError(
        f"{folder} is a symbolic link loop: it leads back to {real}, which contains it. Remove "
        f"the link, or point it at a folder outside --dataset=image_folder:{source}.")


def _unreadable(path: str, error: OSError) -> errors.DataError:
  """The DataError for a file of the folder that cannot be looked at (os.stat failed)."""
  if os.path.islink(path):
    target = os.readlink(path)
    if error.errno == errno.ELOOP:
      return errors.DataError(
          f"{path} is a symbolic link loop (it points to {target}, which leads back to itself): "
          "remove the link, or point it at an image.")
    if error.errno == errno.ENOENT:
      return errors.DataError(
          f"{path} is a broken symbolic link: it points to {target}, which does not exist. "
          "Restore the file it points to, or remove the link.")
  return errors.DataError(f"Cannot read {path} ({error.strerror}): fix its permissions or "
                          "remove it.")


def _unlistable(error: OSError) -> None:
  """os.walk's onerror: a folder that cannot be listed is an error, never silently skipped."""
  raise errors.DataError(f"Cannot list the folder {error.filename} ({error.strerror}): fix its "
                         "permissions or remove it.")


def _gcs_files(source: str) -> list:
  from trainer.storage import gcs
  from trainer import storage
  bucket, name = storage.split_gcs(source)
  prefix = gcs.dir_prefix(name)
  with storage.for_flag("--dataset"), gcs.errors_of(source):
    blobs, _ = gcs.list_objects(bucket, prefix)
  # Names ending in "/" are folder placeholders that consoles create, not files.
  return [(b.name[len(prefix):], int(b.size), f"{b.generation}-{b.crc32c}")
          for b in blobs if not b.name.endswith("/")]


def _key(source: str, files: tuple, image_size: int, eval_fraction: float) -> str:
  blob = json.dumps({"format": FORMAT, "source": source, "files": files,
                     "image_size": image_size, "eval_fraction": eval_fraction})
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_builder(target: str):
  from trainer.data import tfds_metadata
  return tfds_metadata.open_read_only(os.path.join(target, NAME, VERSION))


# ---------------------------------------------------------------- preparation


def _prepare_into(source: str, files: tuple, target: str, image_size: int,
                  eval_fraction: float, num_shards: int) -> None:
  """Writes the prepared dataset to target; the caller holds the lock on it."""
  parent, key = os.path.split(target)
  partial_prefix = f".{key}.partial-"
  files_lib.remove_partials(parent, partial_prefix)
  partial = tempfile.mkdtemp(dir=parent, prefix=partial_prefix)
  try:
    local = _local_copy(source, files, partial)
    try:
      class_names, images = image_scan.scan(local, eval_fraction)
      shape = _common_shape(local, images, image_size)
      logging.info("Preparing %s: %d images of %d classes as %dx%dx%d into %s", source,
                   len(images), len(class_names), *shape, target)
      _write(local, class_names, images, shape, partial, num_shards)
    except errors.DataError as e:
      # Name the files where the user keeps them, not in the temporary copy of a gs:// folder.
      raise errors.DataError(str(e).replace(local, source)) from None
    if local == source and tuple(sorted(_local_files(source))) != files:
      raise errors.DataError(
          f"--dataset=image_folder:{source} changed while it was being prepared: run again "
          "once nothing writes to it.")
    for leftover in ("copy", "downloads"):  # the gs:// copy and TFDS's empty download dir
      shutil.rmtree(os.path.join(partial, leftover), ignore_errors=True)
    files_lib.replace_dir(partial, target, partial_prefix, PREPARED_MARKER, source)
  finally:
    shutil.rmtree(partial, ignore_errors=True)  # only after a failure: the rename moved it
  logging.info("Prepared %s into %s", source, target)


def _local_copy(source: str, files: tuple, partial: str) -> str:
  """source itself when local; a gs:// folder is downloaded into partial/copy first."""
  from trainer import storage
  if not storage.is_gcs(source):
    return source
  local = os.path.join(partial, "copy")
  with storage.for_flag("--dataset"):
    storage.download_dir(source, local)
  copied = {(rel, os.path.getsize(os.path.join(local, *rel.split("/")))) for rel, _, _ in files}
  if copied != {(rel, size) for rel, size, _ in files}:
    raise errors.DataError(
        f"--dataset=image_folder:{source} changed while it was being copied: run again once "
        "nothing writes to it.")
  return local


def _common_shape(root: str, images: list, image_size: int) -> tuple:
  """(height, width, channels) every image is stored with, from the file headers alone.

  Channels are 1 when every image is grayscale, else 3 (RGB; alpha is dropped). Without
  image_size every image must already have the same height and width.
  """
  first = None
  gray = True
  for image in images:
    path = os.path.join(root, *image.rel.split("/"))
    height, width, channels = header_shape(path)
    gray = gray and channels in (1, 2)
    if image_size:
      continue
    if first is None:
      first = (path, height, width)
    elif (height, width) != first[1:]:
      raise errors.DataError(
          f"Images differ in size: {first[0]} is {first[1]}x{first[2]}, {path} is "
          f"{height}x{width}. Pass --image_size=N to resize every image to NxN.")
  if image_size:
    return image_size, image_size, 1 if gray else 3
  if max(first[1:]) > config.MAX_IMAGE_SIZE:
    raise errors.DataError(
        f"The images are {first[1]}x{first[2]} (e.g. {first[0]}), larger than the "
        f"{config.MAX_IMAGE_SIZE}x{config.MAX_IMAGE_SIZE} a training batch holds in memory: pass "
        f"--image_size=N (N <= {config.MAX_IMAGE_SIZE}) to resize them.")
  return first[1], first[2], 1 if gray else 3


def header_shape(path: str) -> tuple:
  """(height, width, channels) from a PNG or JPEG header; DataError for anything else."""
  import tensorflow as tf
  try:
    with open(path, "rb") as f:
      contents = f.read()
  except OSError as e:
    raise errors.DataError(f"Cannot read image {path} ({e.strerror}): fix its permissions or "
                           "remove it.") from None
  if contents.startswith(PNG_SIGNATURE) and contents[12:16] == b"IHDR" and len(contents) > 25:
    width = int.from_bytes(contents[16:20], "big")
    height = int.from_bytes(contents[20:24], "big")
    if contents[25] in PNG_CHANNELS and height and width:
      return height, width, PNG_CHANNELS[contents[25]]
  elif contents.startswith(JPEG_SIGNATURE):
    try:
      return tuple(int(d) for d in tf.image.extract_jpeg_shape(contents).numpy())
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
      pass
  raise errors.DataError(f"Image {path} is corrupt or not a JPEG/PNG (unreadable header): "
                         "replace it with a valid image or remove it.")


def _write(root: str, class_names: list, images: list, shape: tuple, out_dir: str,
           num_shards: int) -> None:
  """Stores the images as a TFDS dataset (record files and metadata) under out_dir."""
  import tensorflow_datasets as tfds
  from trainer import logs
  if not logs.verbose():
    tfds.disable_progress_bar()  # one log line per phase, not a progress bar per split
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=shape),
      "label": tfds.features.ClassLabel(names=class_names),
  })
  splits = {split: _examples(root, [i for i in images if i.split == split], shape)
            for split in ("train", "test")}
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
        name=NAME, version=VERSION, features=features, split_datasets=splits,
        data_dir=out_dir, disable_shuffling=False,
        download_config=tfds.download.DownloadConfig(num_shards=num_shards or None))
  except errors.TrainerError:
    raise
  except Exception as e:  # TFDS raises many types; all mean the folder cannot be prepared.
    raise errors.DataError(f"Could not prepare {root} into {out_dir}: {e}") from e


def _op_message(error) -> str:
  """A TensorFlow op error's own words, without the function and op names around them."""
  text = re.sub(r"\{\{.*?\}\}", "", error.message)
  return re.sub(r"\s*\[Op:.*$", "", text, flags=re.S).strip()


def _examples(root: str, images: list, shape: tuple):
  """(key, example) per image; TFDS orders the examples by a hash of the key."""
  for image in images:
    path = os.path.join(root, *image.rel.split("/"))
    yield image.rel, {"image": decode(path, shape), "label": image.label}


def decode(path: str, shape: tuple):
  """The image at path as a uint8 array of shape (resized when its size differs)."""
  import numpy as np
  import tensorflow as tf
  height, width, channels = shape
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError,
          tf.errors.DataLossError) as e:
    raise errors.DataError(f"Image {path} is corrupt ({_op_message(e)}): replace it with a "
                           "valid JPEG/PNG or remove it.") from None
  if tuple(image.shape[:2]) != (height, width):
    image = tf.image.resize(image, (height, width), antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return np.asarray(image)

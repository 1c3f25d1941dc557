"""Stream mode's RecordSource of a prepared TFDS split: its record files (of gs:// data, those
this worker reads, fetched), the examples each holds, and how to decode them."""

import logging
import os

import tensorflow as tf

from trainer import errors
from trainer import storage
from trainer.data import decoded_records
from trainer.data import pipeline
from trainer.data import staging
from trainer.data import stream


def record_source(builder, split: str = "train", data_dir: str = "", num_pipelines: int = 1,
                  pipeline_ids=(0,), examples_read: int = 0) -> stream.RecordSource:
  """The split's record files, examples per file and decoder, for stream mode.

  Only the files that the input pipelines `pipeline_ids` (of num_pipelines) read need be here:
  of a gs:// data_dir, just those are fetched (every file when there are fewer files than
  pipelines, since then every pipeline reads every file). When these pipelines read at least
  all the examples of those files (examples_read), the files are decoded once, up front, into
  fixed-length records (trainer/data/decoded_records.py) instead of at every epoch.
  """
  info = builder.info.splits[split]
  features = builder.info.features

  image_shape = tuple(features["image"].shape)

  @pipeline.no_autograph
  def decode(records):
    # TFDS stores the image encoded (PNG or JPEG) under "image" and the class under "label".
    parsed = tf.io.parse_example(records, {"image": tf.io.FixedLenFeature([], tf.string),
                                           "label": tf.io.FixedLenFeature([], tf.int64)})
    images = tf.map_fn(
        lambda encoded: tf.io.decode_image(encoded, channels=image_shape[-1],
                                           expand_animations=False),
        parsed["image"], fn_output_signature=tf.TensorSpec(image_shape, tf.uint8))
    return images, parsed["label"]

  mine = stream.files_read_by(len(info.filepaths), num_pipelines, pipeline_ids)
  if storage.is_gcs(data_dir) and len(info.filepaths) < num_pipelines:
    logging.info("Stream mode: %d %s record file(s) for %d input pipelines, so every pipeline "
                 "reads every file and this worker fetches them all.", len(info.filepaths),
                 split, num_pipelines)
  staging.fetch_records(builder, data_dir, split, mine)
  for path in (info.filepaths[i] for i in mine):
    if not os.path.isfile(str(path)):
      raise errors.DataError(
          f"Record file {path} of the prepared {builder.name} {split} split is missing: prepare "
          "the dataset again (a new --data_dir, or delete the dataset's folder in it).")
  origins = ()
  if storage.is_gcs(data_dir):  # the files are local copies: messages name the objects
    origins = tuple(staging.remote_of(data_dir, str(p)) for p in info.filepaths)
  source = stream.RecordSource(files=tuple(str(p) for p in info.filepaths),
                               counts=shard_lengths(builder, split),
                               image_shape=image_shape, decode=decode, origins=origins)
  return decoded_records.decoded_source(source, mine, examples_read)


def shard_lengths(builder, split: str = "train") -> tuple:
  """Examples per record file of the split, from the TFDS metadata."""
  return tuple(int(n) for n in builder.info.splits[split].shard_lengths)

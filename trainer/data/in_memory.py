"""Splits held in memory as arrays (the test split in both modes, the train split in in_memory
mode) and the in-memory training pipeline: each epoch a global permutation drawn from (seed,
epoch), cut into global batches, each pipeline taking its contiguous slice of every batch."""

import dataclasses

import numpy as np
import tensorflow as tf

from trainer import errors
from trainer.data import cache
from trainer.data import pipeline
from trainer.data import sources
from trainer.data import staging


@dataclasses.dataclass(frozen=True)
class Splits:
  """The test split (and in in_memory mode the train split) as uint8 images and int32 labels."""

  train_images: np.ndarray | None  # None in stream mode: the train split stays in its files
  train_labels: np.ndarray | None
  test_images: np.ndarray | None  # None on workers that do not evaluate
  test_labels: np.ndarray | None
  num_classes: int
  image_shape: tuple
  class_names: tuple = ()  # label i's name (exported next to the SavedModel)


def load(data, builder=None, with_train: bool = True, with_test: bool = True) -> Splits:
  """Loads the splits of the DataConfig `data` into memory (MNIST is 55 MB decoded; decoded
  once, not every epoch); builder: the dataset already prepared.

  with_train=False (stream mode) leaves the train split in its files; with_test=False (a worker
  that does not evaluate) leaves the test split unread, and of gs:// data unfetched.
  """
  if builder is None:
    builder = sources.prepare_data(data)
  train_images = train_labels = None
  if with_train:
    staging.fetch_records(builder, data.data_dir, "train")  # gs:// data: every file
    train_images, train_labels = cache.load_split(builder, "train", data.train_examples)
  test_images = test_labels = None
  if with_test:
    staging.fetch_records(builder, data.data_dir, "test")
    test_images, test_labels = cache.load_split(builder, "test", data.eval_examples)
  loaded = test_images if test_images is not None else train_images
  image_shape = tuple(loaded.shape[1:]) if loaded is not None else _fixed_image_shape(builder)
  label = builder.info.features["label"]
  return Splits(train_images, train_labels, test_images, test_labels,
                num_classes=label.num_classes, image_shape=image_shape,
                class_names=tuple(label.names))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Every example once per epoch: the last global batch is padded (weight 0), never dropped."""
  return -(-num_examples // global_batch_size)


def check_divisible(global_batch_size: int, num_replicas: int) -> None:
  if global_batch_size % num_replicas:
    raise errors.ConfigError(
        f"--global_batch_size={global_batch_size} is not divisible by the {num_replicas} "
        f"replicas in sync: use a multiple of {num_replicas}, e.g. "
        f"{(global_batch_size // num_replicas + 1) * num_replicas}.")


def train_dataset_fn(images: np.ndarray, labels: np.ndarray, global_batch_size: int, seed: int,
                     start_step: int = 0, total_steps: int = 0):
  """Returns the input function (InputContext -> dataset) for distribute.input_iterator.

  Batches of indices are built first and examples gathered per batch (batching before
  mapping). The order depends only on (seed, step), so a resumed run continues exactly where
  an uninterrupted one would be, without saving iterator state.
  """
  num_examples = len(images)
  steps = steps_per_epoch(num_examples, global_batch_size)
  start_epoch, offset = divmod(start_step, steps)
  end_epoch = max(start_epoch + 1, -(-max(total_steps, 1) // steps))

  # One host copy that every local pipeline reads: a copy per pipeline (each tf.constant
  # copies its array, and again onto a replica's own CPU device) took about a third of a second
  # of every run's start-up on full MNIST (bench/README.md). In host memory, where tf.data runs.
  with tf.device("CPU:0"):
    images_t = tf.constant(images)
    labels_t = tf.constant(labels)

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines

    @pipeline.no_autograph
    def epoch_rows(epoch):
      return tf.data.Dataset.from_tensor_slices(shard_indices(
          num_examples, global_batch_size, seed, epoch, ctx.num_input_pipelines,
          ctx.input_pipeline_id, per_replica))

    @pipeline.no_autograph
    def gather(index_row):
      valid = index_row >= 0
      safe = tf.maximum(index_row, 0)
      x = tf.cast(tf.gather(images_t, safe), tf.float32) / 255.0
      return x, tf.gather(labels_t, safe), tf.cast(valid, tf.float32)

    ds = tf.data.Dataset.range(start_epoch, end_epoch + 1).flat_map(epoch_rows)
    ds = ds.skip(offset * local_replicas)
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pipeline.without_autotune_thread(ds.prefetch(tf.data.AUTOTUNE))

  return dataset_fn


def shard_indices(num_examples: int, global_batch_size: int, seed: int, epoch,
                  num_pipelines: int, pipeline_id: int, per_replica_batch: int) -> tf.Tensor:
  """[steps * local_replicas, per_replica_batch] example indices of one pipeline; -1 = padding.

  Global batch b is examples perm[b*G:(b+1)*G]; pipeline p takes its contiguous slice of it, so
  pipelines are disjoint, together complete, and all have the same number of steps.
  """
  steps = steps_per_epoch(num_examples, global_batch_size)
  local_replicas = global_batch_size // (num_pipelines * per_replica_batch)
  perm = epoch_permutation(num_examples, seed, epoch)
  padding = -tf.ones([steps * global_batch_size - num_examples], tf.int32)
  indices = tf.reshape(tf.concat([perm, padding], 0),
                       [steps, num_pipelines, local_replicas, per_replica_batch])
  return tf.reshape(indices[:, pipeline_id], [steps * local_replicas, per_replica_batch])


def epoch_permutation(num_examples: int, seed: int, epoch) -> tf.Tensor:
  """The global example order of one epoch; every worker computes the same one."""
  keys = tf.random.stateless_uniform([num_examples], seed=tf.stack(
      [tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]), dtype=tf.float32)
  return tf.argsort(keys, stable=True)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int = 1000):
  """Test examples in fixed order, normalized like training."""
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
  ds = ds.map(pipeline.no_autograph(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y)),
              num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
  return pipeline.without_autotune_thread(ds)


def _fixed_image_shape(builder) -> tuple:
  """The one image shape of the dataset, from its metadata (nothing of it loaded here)."""
  shape = tuple(builder.info.features["image"].shape)
  if any(d is None for d in shape):
    raise errors.DataError(
        f"The {builder.name} images vary in size ({shape}); the model needs one size. For your "
        "own images, --dataset=image_folder:DIR with --image_size resizes them.")
  return tuple(int(d) for d in shape)

"""Input data: verifies and prepares MNIST offline with TFDS, loads splits, builds sharded tf.data pipelines."""

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import pathlib
import tempfile

import numpy as np
import tensorflow as tf

from trainer import errors

# SHA-256 of the four vendored .gz files (data/mnist/SHA256SUMS holds the same).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz":
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz":
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz":
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}


@dataclasses.dataclass(frozen=True)
class Splits:
  """Train and test splits held in memory as uint8 images and int32 labels."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple:
    return tuple(self.train_images.shape[1:])


def vendored_mnist_dir() -> str:
  """The repository's copy of MNIST (absent in an installed package, which downloads instead)."""
  return str(pathlib.Path(__file__).resolve().parent.parent / "data" / "mnist")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_mnist_files(source_dir: str) -> None:
  """Raises DataError naming the file when one is missing or its SHA-256 does not match."""
  for name, expected in MNIST_SHA256.items():
    path = os.path.join(source_dir, name)
    if not os.path.isfile(path):
      raise errors.DataError(
          f"MNIST file {path} is missing: restore it (git checkout data/mnist) or point "
          "--mnist_source_dir at a directory with the four canonical .gz files.")
    actual = _sha256(path)
    if actual != expected:
      raise errors.DataError(
          f"MNIST file {path} is corrupt: SHA-256 {actual} != expected {expected}. "
          "Restore it (git checkout data/mnist) or fix --mnist_source_dir.")


def check_writable(data_dir: str) -> None:
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise errors.DataError(f"--data_dir={data_dir} is not writable ({e.strerror}): choose a "
                           "directory you can write to.") from None


@contextlib.contextmanager
def _lock(data_dir: str, name: str):
  """Serializes preparation between processes sharing one data_dir (local cluster workers)."""
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _builder(dataset: str, data_dir: str):
  import tensorflow_datasets as tfds  # Heavy import; keep it off module import paths.
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.ConfigError(f"--dataset={dataset!r} is not a TensorFlow Datasets name: use "
                             "mnist, fashion_mnist, kmnist, cifar10, ...") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise errors.ConfigError(f"--dataset={dataset!r} is not an image classification dataset "
                             "(needs 'image' and 'label' features).")
  return builder


def stage(path: str, what: str) -> str:
  """A local copy of a gs:// directory (data inputs are read locally); local paths pass through."""
  from trainer import storage
  if not storage.is_gcs(path):
    return os.path.expanduser(path)
  cache = os.environ.get("TRAINER_CACHE_DIR") or os.path.expanduser("~/.cache/mnist-trainer")
  local = os.path.join(cache, "staged", hashlib.sha256(path.encode()).hexdigest()[:16])
  if not os.path.isdir(local) or not os.listdir(local):
    try:
      storage.download_dir(path, local)
    except FileNotFoundError:
      raise errors.DataError(f"{what}={path} holds no files: upload the data there first.") from None
    logging.info("Staged %s into %s", path, local)
  return local


def prepare(dataset: str, data_dir: str, mnist_source_dir: str = ""):
  """Returns a prepared TFDS builder; MNIST is built from local files, never downloaded.

  gs:// inputs are staged to local disk first: a prepared TFDS directory in a bucket, or the
  four MNIST files.
  """
  data_dir = stage(data_dir, "--data_dir")
  if mnist_source_dir:
    mnist_source_dir = stage(mnist_source_dir, "--mnist_source_dir")
  check_writable(data_dir)
  builder = _builder(dataset, data_dir)
  with _lock(data_dir, dataset):
    if builder.is_prepared():
      return builder
    if dataset == "mnist":
      source = mnist_source_dir or vendored_mnist_dir()
      if os.path.isdir(source) or mnist_source_dir:
        verify_mnist_files(source)
        builder.URL = source.rstrip("/") + "/"
        logging.info("Preparing TFDS mnist in %s from %s", data_dir, source)
    try:
      builder.download_and_prepare()
    except Exception as e:  # TFDS raises many types; all mean the data cannot be had.
      raise errors.DataError(f"Could not prepare --dataset={dataset} in --data_dir={data_dir}: "
                             f"{e}") from e
  return builder


def _load_split(builder, split: str, limit: int):
  import tensorflow_datasets as tfds
  if limit:
    split = f"{split}[:{limit}]"
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32)


def load(config, builder=None) -> Splits:
  """Loads both splits into memory (MNIST is 55 MB decoded; decode once, not every epoch)."""
  if builder is None:
    builder = prepare(config.dataset, config.data_dir, config.mnist_source_dir)
  train_images, train_labels = _load_split(builder, "train", config.train_examples)
  test_images, test_labels = _load_split(builder, "test", config.eval_examples)
  return Splits(train_images, train_labels, test_images, test_labels,
                num_classes=builder.info.features["label"].num_classes)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Every example once per epoch: the last global batch is padded (weight 0), never dropped."""
  return -(-num_examples // global_batch_size)


def check_divisible(global_batch_size: int, num_replicas: int) -> None:
  if global_batch_size % num_replicas:
    raise errors.ConfigError(
        f"--global_batch_size={global_batch_size} is not divisible by the {num_replicas} "
        f"replicas in sync: use a multiple of {num_replicas}, e.g. "
        f"{(global_batch_size // num_replicas + 1) * num_replicas}.")


def epoch_permutation(num_examples: int, seed: int, epoch) -> tf.Tensor:
  """The global example order of one epoch; every worker computes the same one."""
  keys = tf.random.stateless_uniform([num_examples], seed=tf.stack(
      [tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]), dtype=tf.float32)
  return tf.argsort(keys, stable=True)


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


def _without_autotune_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Turns off tf.data's autotuning thread; AUTOTUNE sizes then stay at tf.data's defaults.

  Deleting an iterator waits out that thread's current sleep, which doubles up to 60 s (see
  distribute.input_iterator). Tuning buys nothing here: the pipeline runs ~150x faster than
  training needs.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


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

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    images_t = tf.constant(images)
    labels_t = tf.constant(labels)

    def epoch_rows(epoch):
      return tf.data.Dataset.from_tensor_slices(shard_indices(
          num_examples, global_batch_size, seed, epoch, ctx.num_input_pipelines,
          ctx.input_pipeline_id, per_replica))

    def gather(index_row):
      valid = index_row >= 0
      safe = tf.maximum(index_row, 0)
      x = tf.cast(tf.gather(images_t, safe), tf.float32) / 255.0
      return x, tf.gather(labels_t, safe), tf.cast(valid, tf.float32)

    ds = tf.data.Dataset.range(start_epoch, end_epoch + 1).flat_map(epoch_rows)
    ds = ds.skip(offset * local_replicas)
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _without_autotune_thread(ds.prefetch(tf.data.AUTOTUNE))

  return dataset_fn


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int = 1000):
  """Test examples in fixed order, normalized like training."""
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
  ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y),
              num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
  return _without_autotune_thread(ds)


def read_idx(path: str) -> np.ndarray:
  """Reads a gzip IDX file (the canonical MNIST format) into a numpy array."""
  import gzip
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def num_train_examples(builder, limit: int = 0) -> int:
  """Size of the train split from the TFDS metadata, without decoding anything."""
  total = builder.info.splits["train"].num_examples
  return min(total, limit) if limit else total


def check_batch_fits(global_batch_size: int, num_examples: int) -> None:
  """A global batch larger than the train split is a config error, found before any allocation."""
  if global_batch_size > num_examples:
    raise errors.ConfigError(
        f"--global_batch_size={global_batch_size} is larger than the {num_examples} training "
        f"examples: use at most {num_examples} (or more --train_examples).")

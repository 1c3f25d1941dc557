"""Tests for trainer.data on the real vendored MNIST: verification, loading, sharding, resume order."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from trainer import data
from trainer import errors


def test_vendored_files_verify():
  data.verify_mnist_files(data.vendored_mnist_dir())


def test_corrupt_file_is_named(tmp_path):
  src = tmp_path / "mnist"
  shutil.copytree(data.vendored_mnist_dir(), src)
  target = src / "t10k-labels-idx1-ubyte.gz"
  os.chmod(target, 0o644)
  blob = bytearray(target.read_bytes())
  blob[100] ^= 0xFF
  target.write_bytes(bytes(blob))
  with pytest.raises(errors.DataError, match="t10k-labels-idx1-ubyte.gz is corrupt"):
    data.verify_mnist_files(str(src))


def test_missing_file_is_named(tmp_path):
  src = tmp_path / "mnist"
  shutil.copytree(data.vendored_mnist_dir(), src)
  os.remove(src / "train-images-idx3-ubyte.gz")
  with pytest.raises(errors.DataError, match="train-images-idx3-ubyte.gz is missing"):
    data.prepare("mnist", str(tmp_path / "tfds"), mnist_source_dir=str(src))


def test_unwritable_data_dir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(errors.DataError, match="--data_dir=.*a_file/sub is not writable"):
    data.prepare("mnist", str(blocker / "sub"))


def test_unknown_dataset(tmp_path):
  with pytest.raises(errors.ConfigError, match="--dataset='no_such_set'"):
    data.prepare("no_such_set", str(tmp_path))


def test_not_image_classification(tmp_path):
  with pytest.raises(errors.ConfigError, match="not an image classification"):
    data.prepare("imdb_reviews", str(tmp_path))


def test_real_mnist_splits(tfds_dir):
  from trainer import config as config_lib
  splits = data.load(config_lib.Config(epochs=1, data_dir=tfds_dir))
  assert splits.train_images.shape == (60000, 28, 28, 1)
  assert splits.test_images.shape == (10000, 28, 28, 1)
  assert splits.train_images.dtype == np.uint8 and splits.train_labels.dtype == np.int32
  assert splits.train_images.max() == 255 and splits.train_images.min() == 0
  assert set(np.unique(splits.train_labels)) == set(range(10))
  assert set(np.unique(splits.test_labels)) == set(range(10))
  assert splits.num_classes == 10
  # The TFDS copy holds exactly the canonical files' test labels, in order.
  raw = data.read_idx(os.path.join(data.vendored_mnist_dir(), "t10k-labels-idx1-ubyte.gz"))
  np.testing.assert_array_equal(np.sort(raw), np.sort(splits.test_labels))


def _epoch_ids(num_examples, global_batch, pipelines, replicas_per_pipeline, epoch=0, seed=7):
  """Example ids each pipeline reads in one epoch, through the real input function."""
  images = np.arange(num_examples, dtype=np.uint8).reshape(-1, 1, 1, 1) * 0  # payload unused
  labels = np.arange(num_examples, dtype=np.int32)  # the label is the example's identity
  steps = data.steps_per_epoch(num_examples, global_batch)
  fn = data.train_dataset_fn(images, labels, global_batch, seed, start_step=epoch * steps,
                             total_steps=(epoch + 1) * steps)
  per_pipeline = []
  for pid in range(pipelines):
    ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pid,
                                     num_replicas_in_sync=pipelines * replicas_per_pipeline)
    ids, rows = [], 0
    for _, y, w in fn(ctx).take(steps * replicas_per_pipeline):
      ids.extend(y.numpy()[w.numpy() > 0].tolist())
      rows += 1
    assert rows == steps * replicas_per_pipeline, "every pipeline has the same step count"
    per_pipeline.append(ids)
  return per_pipeline


@pytest.mark.parametrize("workers, n, batch", [(2, 1000, 64), (3, 1000, 48), (3, 999, 96),
                                               (2, 60000, 128)])
def test_sharding_disjoint_and_complete(workers, n, batch):
  shards = _epoch_ids(n, batch, workers, 1)
  sets = [set(s) for s in shards]
  assert all(len(s) == len(ids) for s, ids in zip(sets, shards)), "no example twice in a shard"
  for i in range(workers):
    for j in range(i + 1, workers):
      assert not sets[i] & sets[j], f"workers {i} and {j} overlap"
  assert set().union(*sets) == set(range(n)), "together the workers read every example"


def test_sharding_with_local_replicas():
  shards = _epoch_ids(500, 40, 2, 2)
  assert sorted(shards[0] + shards[1]) == list(range(500))


def test_epochs_have_different_orders():
  first = _epoch_ids(300, 30, 1, 1, epoch=0)[0]
  second = _epoch_ids(300, 30, 1, 1, epoch=1)[0]
  assert sorted(first) == sorted(second) and first != second


def test_resume_continues_the_same_order():
  n, batch, seed = 200, 16, 3
  labels = np.arange(n, dtype=np.int32)
  images = np.zeros((n, 1, 1, 1), np.uint8)
  ctx = tf.distribute.InputContext()
  full = [y.numpy().tolist() for _, y, _ in
          data.train_dataset_fn(images, labels, batch, seed, 0, 40)(ctx).take(40)]
  resumed = [y.numpy().tolist() for _, y, _ in
             data.train_dataset_fn(images, labels, batch, seed, 17, 40)(ctx).take(23)]
  assert resumed == full[17:]


def test_batches_are_normalized_and_padded():
  images = np.full((10, 28, 28, 1), 255, np.uint8)
  labels = np.arange(10, dtype=np.int32)
  batches = list(data.train_dataset_fn(images, labels, 4, 0, 0, 3)(
      tf.distribute.InputContext()).take(3))
  x, _, w = batches[0]
  assert x.dtype == tf.float32 and x.shape == (4, 28, 28, 1) and float(tf.reduce_max(x)) == 1.0
  assert [float(tf.reduce_sum(b[2])) for b in batches] == [4.0, 4.0, 2.0]


def test_pipelines_run_without_the_autotune_thread():
  """Deleting an iterator waits for tf.data's autotune thread to wake (up to 60 s): keep it off."""
  images = np.zeros((10, 2, 2, 1), np.uint8)
  labels = np.arange(10, dtype=np.int32)
  train = data.train_dataset_fn(images, labels, 4, 0, 0, 3)(tf.distribute.InputContext())
  assert train.options().autotune.enabled is False
  assert data.eval_batches(images, labels, 4).options().autotune.enabled is False
  default = tf.data.Dataset.range(3).prefetch(tf.data.AUTOTUNE)
  assert default.options().autotune.enabled is not False  # what the helper exists to change


def test_divisibility_error_prints_the_numbers():
  data.check_divisible(128, 2)
  with pytest.raises(errors.ConfigError, match=r"--global_batch_size=130 .* 4 replicas"):
    data.check_divisible(130, 4)

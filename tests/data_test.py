"""trainer.data on real MNIST: verification, download, staging, loading, sharding, resume order."""

import functools
import hashlib
import http.server
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from trainer import data
from trainer import errors
from trainer.data import cache
from trainer.data import files
from trainer.data import mnist
from trainer.data import sources


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


@pytest.mark.slow
def test_real_mnist_splits(tfds_dir):
  from trainer import config as config_lib
  splits = data.load(config_lib.Config(epochs=1, data_dir=tfds_dir).data)
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


def test_input_functions_are_not_converted_by_autograph(tmp_path, monkeypatch):
  """tf.data runs AutoGraph on the functions it traces; AutoGraph writes each converted function
  to a module in the temporary directory. Ours are marked not to be converted (start-up time)."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  generated = lambda: [f for f in os.listdir(tmp_path) if f.startswith("__autograph_generated")]
  images = np.zeros((10, 2, 2, 1), np.uint8)
  labels = np.arange(10, dtype=np.int32)
  next(iter(data.train_dataset_fn(images, labels, 4, 0, 0, 3)(tf.distribute.InputContext())))
  next(iter(data.eval_batches(images, labels, 4)))
  assert generated() == []

  def converted(x):  # a function AutoGraph must convert: Python control flow on a tensor
    if x > 1:
      return x
    return -x

  next(iter(tf.data.Dataset.range(3).map(converted)))
  assert generated(), "the check can fail: a converted function leaves its module there"


def test_divisibility_error_prints_the_numbers():
  data.check_divisible(128, 2)
  with pytest.raises(errors.ConfigError, match=r"--global_batch_size=130 .* 4 replicas"):
    data.check_divisible(130, 4)


# ---- MNIST without a vendored copy (an installed package): bounded download, exit 3 offline ----


def test_offline_install_without_vendored_mnist_fails_fast(tmp_path, monkeypatch):
  """The real download from the CVDF mirror, on this machine without internet: DataError (exit 3)
  within a bound, naming the flags that avoid the download. TFDS's own took 200 s to forever."""
  monkeypatch.setattr(mnist, "vendored_mnist_dir", lambda: str(tmp_path / "no_vendored_copy"))
  # No network, whatever the machine has: every request goes to a proxy port nobody serves.
  for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
    monkeypatch.setenv(name, "http://127.0.0.1:9")
  # urlopen keeps the proxies of its first call in a module-wide opener: start and end clean.
  monkeypatch.setattr(urllib.request, "_opener", None)
  start = time.monotonic()
  with pytest.raises(errors.DataError) as raised:
    data.prepare("mnist", str(tmp_path / "tfds"))
  assert time.monotonic() - start < 60
  message = str(raised.value)
  assert f"Could not download MNIST from {data.MNIST_URL}" in message
  assert "--mnist_source_dir=DIR" in message
  assert "--data_dir=gs://BUCKET/tensorflow_datasets" in message
  assert raised.value.exit_code == errors.EXIT_DATA
  assert os.listdir(tmp_path / "tfds" / "downloads") == [], "no partial download left behind"


# Each bound far below the other limit (60 s of deadline, 30 s a read), and short waits: the
# first case takes 3 x 0.5 s of reads and the 1 + 2 s between attempts.
@pytest.mark.parametrize("timeout_s, deadline_s, bound_s", [(0.5, 60, 15), (30, 1, 10)])
def test_mnist_download_from_a_stalled_server_is_bounded(tmp_path, timeout_s, deadline_s,
                                                         bound_s):
  """A server that accepts connections and never answers (a firewall or dead proxy): each read
  waits at most timeout_s, each file gets 3 attempts, and the whole download deadline_s."""
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # the kernel completes handshakes; nothing ever reads or answers
    start = time.monotonic()
    with pytest.raises(errors.DataError, match="Could not download MNIST .*TimeoutError"):
      data.download_mnist(str(tmp_path / "mnist-raw"),
                          f"http://127.0.0.1:{server.getsockname()[1]}/", timeout_s, deadline_s)
    assert time.monotonic() - start < bound_s
  assert os.listdir(tmp_path) == [], "no partial download left behind"


@pytest.fixture
def mnist_server(tmp_path):
  """An HTTP server with a copy of the vendored MNIST files: (base URL, served directory)."""
  served = tmp_path / "served"
  shutil.copytree(data.vendored_mnist_dir(), served)
  handler = functools.partial(QuietHandler, directory=str(served))
  with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    httpd.shutdown()
    thread.join(timeout=5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass


def test_mnist_download_verifies_and_is_reused(tmp_path, mnist_server):
  url, served = mnist_server
  target = str(tmp_path / "tfds" / "downloads" / "mnist-raw")
  assert data.download_mnist(target, url) == target
  data.verify_mnist_files(target)
  for name in data.MNIST_SHA256:
    os.remove(served / name)  # a second call that downloaded would now fail
  assert data.download_mnist(target, url) == target


def test_mnist_download_rejects_altered_files(tmp_path, mnist_server):
  url, served = mnist_server
  target = served / "t10k-labels-idx1-ubyte.gz"
  os.chmod(target, 0o644)
  target.write_bytes(b"<html>captive portal</html>")
  with pytest.raises(errors.DataError, match="t10k-labels-idx1-ubyte.gz sent a file with SHA-256"):
    data.download_mnist(str(tmp_path / "mnist-raw"), url)
  assert not (tmp_path / "mnist-raw").exists()


def test_offline_tfds_download_fails_fast(tmp_path):
  """Datasets TFDS downloads itself: an unreachable host is a DataError in seconds, not after
  TFDS's 10 retries per file (200 s offline here; no bound on a stalled connection)."""
  start = time.monotonic()
  with pytest.raises(errors.DataError, match="--dataset=fashion_mnist is downloaded from "
                     r"fashion-mnist\..*, which cannot be reached") as raised:
    data.prepare("fashion_mnist", str(tmp_path))
  assert time.monotonic() - start < 60
  assert "--data_dir=gs://BUCKET/tensorflow_datasets" in str(raised.value)


def test_download_probe():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/a.gz"
    data.check_download_hosts("x", [url])
  with pytest.raises(errors.DataError, match=r"--dataset=x is downloaded from 127.0.0.1:\d+, "
                     "which cannot be reached"):
    data.check_download_hosts("x", [url])  # nothing listens there any more


# ---- data.stage: a gs:// directory is used only once it is completely copied ----


EMULATOR_BUCKETS = ("data",)  # for conftest's emulator


@pytest.fixture
def gcs_source(emulator, tmp_path, monkeypatch):
  """(gs:// directory with two files, {relative path: bytes}, where stage() must copy it)."""
  from trainer import storage
  for name, value in {**emulator.env(), "TRAINER_CACHE_DIR": str(tmp_path / "cache"),
                      "TRAINER_STORAGE_RETRY_DEADLINE_S": "30"}.items():
    monkeypatch.setenv(name, value)
  uri = f"gs://data/{tmp_path.name}"
  files = {"a.bin": os.urandom(5000), "sub/b.bin": os.urandom(3000)}
  for rel, body in files.items():
    storage.write_bytes(f"{uri}/{rel}", body)
  # The cache layout of stage(): one directory per source URI.
  local = os.path.join(tmp_path, "cache", "staged", hashlib.sha256(uri.encode()).hexdigest()[:16])
  return uri, files, local


def _assert_copy(local, files):
  for rel, body in files.items():
    with open(os.path.join(local, rel), "rb") as f:
      assert f.read() == body, rel


@pytest.mark.slow
def test_stage_redoes_an_interrupted_copy(gcs_source):
  uri, files, local = gcs_source
  os.makedirs(local)
  with open(os.path.join(local, "a.bin"), "wb") as f:
    f.write(files["a.bin"][:100])  # an interrupted download: one truncated file, no marker
  key = os.path.basename(local)
  leftover = os.path.join(os.path.dirname(local), f".{key}.partial-dead")
  os.makedirs(leftover)  # the temporary directory of a killed process
  assert data.stage(uri, "--data_dir") == local
  _assert_copy(local, files)
  with open(os.path.join(local, data.STAGED_MARKER)) as f:
    assert f.read() == uri
  assert sorted(os.listdir(os.path.dirname(local))) == [f".{key}.lock", key]


@pytest.mark.slow
def test_stage_reuses_a_complete_copy_without_downloading(gcs_source):
  from trainer import storage
  uri, files, local = gcs_source
  assert data.stage(uri, "--mnist_source_dir") == local
  _assert_copy(local, files)
  assert os.path.isfile(os.path.join(local, data.STAGED_MARKER))
  storage.rmtree(uri)  # a second stage() that downloaded would now fail: "holds no files"
  assert data.stage(uri, "--mnist_source_dir") == local
  _assert_copy(local, files)


@pytest.mark.slow
def test_stage_of_an_empty_source_names_the_flag(gcs_source):
  uri, _, local = gcs_source
  with pytest.raises(errors.DataError, match=f"--data_dir={uri}/none holds no files"):
    data.stage(f"{uri}/none", "--data_dir")
  assert os.listdir(os.path.dirname(local)) == [
      f".{os.path.basename(data.staged_dir(uri + '/none'))}.lock"]


def test_lock_wait_is_bounded(tmp_path):
  """A live process holding the data lock too long is an error naming the lock, not a hang."""
  with files.lock(str(tmp_path), "mnist"):
    start = time.monotonic()
    with pytest.raises(errors.DataError, match=r"has held .*\.mnist\.lock for 1 s"):
      with files.lock(str(tmp_path), "mnist", timeout_s=1):
        pass
    assert time.monotonic() - start < 5
  with files.lock(str(tmp_path), "mnist", timeout_s=1):
    pass  # released: taken at once


def test_decoded_splits_are_cached_by_the_record_files_hash(synthetic_tfds_dir, tmp_path):
  """A second load reads the kept arrays (same values); changed record bytes miss the cache."""
  copy = str(tmp_path / "tfds")
  shutil.copytree(synthetic_tfds_dir, copy, ignore=shutil.ignore_patterns("decoded-*"))
  builder = data.prepare("mnist", copy)
  assert cache.read_cached(builder, "test") == (None, None)
  first = cache.load_split(builder, "test", 0)
  cached = cache.read_cached(builder, "test")
  assert cached[0] is not None
  np.testing.assert_array_equal(cached[0], first[0])
  np.testing.assert_array_equal(cached[1], first[1])
  again = cache.load_split(builder, "test", 100)
  np.testing.assert_array_equal(again[0], first[0][:100])
  before = cache.decoded_paths(builder, "test")
  record = str(builder.info.splits["test"].filepaths[0])
  modes = {os.stat(p).st_mode & 0o777 for p in (record, *before)}
  assert len(modes) == 1, "the arrays are as readable as the records they come from"
  with open(record, "ab") as f:
    f.write(b"\0")  # any change to the records
  assert cache.decoded_paths(builder, "test") != before
  assert cache.read_cached(builder, "test") == (None, None)


def test_synthetic_dataset_loads_in_both_modes(synthetic_tfds_dir):
  """The fast tier's dataset goes through the real loaders: arrays in memory, record files to
  stream, and the size auto mode decides on from the metadata alone."""
  from conftest import SYNTHETIC_SIZES
  from trainer import config as config_lib
  config = config_lib.Config(epochs=1, data_dir=synthetic_tfds_dir)
  builder = data.prepare("mnist", synthetic_tfds_dir)
  splits = data.load(config.data, builder)
  assert splits.train_images.shape == (SYNTHETIC_SIZES["train"], 28, 28, 1)
  assert splits.test_images.shape == (SYNTHETIC_SIZES["test"], 28, 28, 1)
  assert splits.num_classes == 10 and set(np.unique(splits.train_labels)) == set(range(10))
  assert data.choose_input_mode(config.data, builder)[0] == "in_memory"
  expected_mb = SYNTHETIC_SIZES["train"] * (28 * 28 + 4) / 2 ** 20  # image bytes + int32 label
  assert data.decoded_train_mb(builder) == pytest.approx(expected_mb)
  source = data.record_source(builder)
  assert len(source.files) == 4 and sum(source.counts) == SYNTHETIC_SIZES["train"]
  images, labels = source.decode(next(iter(tf.data.TFRecordDataset(source.files[0]).batch(5))))
  assert images.shape == (5, 28, 28, 1) and images.dtype == tf.uint8
  assert all(0 <= int(label) < 10 for label in labels)


def test_the_input_plan_is_decided_once_and_read_by_the_pipelines(synthetic_tfds_dir, tmp_path):
  """Issue 34: the input mode, the steps and who reads which files are decided in one place
  (data.plan); the run shape and the input functions read the plan, and stream mode's pipelines
  run the epoch plan its step count came from (a pipeline built for another one is refused)."""
  from trainer import config as config_lib
  from trainer.data import stream
  from trainer.runtime import cluster, distribute
  copy = str(tmp_path / "tfds")  # stream mode writes decoded copies beside the records
  shutil.copytree(synthetic_tfds_dir, copy, ignore=shutil.ignore_patterns("decoded-*"))
  runtime = distribute.Runtime(tf.distribute.OneDeviceStrategy("/cpu:0"), cluster.ClusterInfo(),
                               "one_device")
  config = config_lib.Config(epochs=2, data_dir=copy, global_batch_size=100)
  memory = data.plan(config.data, config.training, runtime)
  assert memory.mode == "in_memory" and "within --in_memory_limit_mb=2048" in memory.reason
  assert (memory.steps_per_epoch, memory.total_steps, memory.num_train) == (12, 24, 1200)
  assert (memory.pipelines, memory.local_pipeline_ids, memory.source, memory.record_files,
          memory.epoch) == (0, (), None, 0, None), "in memory the order depends on none"
  splits = data.load(config.data, memory.builder, with_test=False)
  x, _, w = next(iter(data.train_input(memory, splits, config.data, config.training, 0)(tf.distribute.InputContext())))
  assert x.shape == (100, 28, 28, 1) and float(tf.reduce_sum(w)) == 100

  config = config_lib.Config(epochs=2, data_dir=copy, global_batch_size=100, input_mode="stream",
                             shuffle_buffer=8)
  streamed = data.plan(config.data, config.training, runtime)
  assert (streamed.mode, streamed.reason) == ("stream", "--input_mode")
  assert (streamed.pipelines, streamed.local_pipeline_ids, streamed.record_files) == (1, (0,), 4)
  assert streamed.epoch == stream.plan_epoch(streamed.source.counts, 1, 100)
  assert (streamed.steps_per_epoch, streamed.total_steps) == (streamed.epoch.steps, 24)
  assert streamed.source.decoded, "the run reads its files whole: decoded once, up front"
  ctx = tf.distribute.InputContext()
  batches = list(data.train_input(streamed, None, config.data, config.training, 0)(ctx).take(12))
  assert sum(float(tf.reduce_sum(w)) for _, _, w in batches) == 1200, "each example once"
  other = stream.plan_epoch(streamed.source.counts, 2, 50)
  fn = stream.train_dataset_fn(streamed.source, 100, 1, 8, total_steps=24, epoch_plan=other)
  with pytest.raises(RuntimeError, match="planned 2 input pipelines of 50 examples a step, but "
                     "tf.distribute builds 1 of 100"):
    fn(ctx)


def test_a_prepared_dataset_opens_from_its_metadata(synthetic_tfds_dir):
  """No TFDS import at all (a quarter of a second every run) once the data is prepared: its
  metadata is read by trainer/data/tfds_metadata.py."""
  import subprocess
  import sys
  from conftest import child_env
  # As trainer.task starts (no matplotlib under Keras: 0.9 s of this child's CPU).
  code = ("import sys; from trainer import startup; startup.skip_plotting_imports(); "
          "from trainer import data; "
          f"b = data.prepare('mnist', {synthetic_tfds_dir!r}); "
          "print(type(b).__name__, b.info.splits['train'].num_examples, "
          "'tensorflow_datasets' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["PreparedDataset", "1200", "False"], out.stdout


def test_several_versions_or_one_being_prepared_take_the_full_path(synthetic_tfds_dir,
                                                                      tmp_path):
  copy = tmp_path / "tfds"
  shutil.copytree(synthetic_tfds_dir, copy)
  assert sources.prepared_builder("mnist", str(copy)).name == "mnist"
  version = copy / "mnist" / "3.0.1"
  shutil.copytree(version, copy / "mnist" / "3.0.1.incomplete12AB")  # TFDS at work: ignored
  assert sources.prepared_builder("mnist", str(copy)) is not None
  shutil.copytree(version, copy / "mnist" / "2.0.0")
  assert sources.prepared_builder("mnist", str(copy)) is None, "which one TFDS picks is its call"
  assert sources.prepared_builder("fashion_mnist", str(copy)) is None
  assert sources.prepared_builder("mnist", str(tmp_path / "absent")) is None


def test_damaged_decoded_labels_are_decoded_again_with_one_warning(synthetic_tfds_dir,
                                                                    tmp_path, caplog):
  """Issue 33: labels overwritten in the kept decoded-*-labels.npy (same size) were trained
  and evaluated on: rc 0 with another model, or a traceback after training. The CRC-32s kept
  beside the arrays no longer match: the split is decoded again, with one warning."""
  copy = str(tmp_path / "tfds")
  shutil.copytree(synthetic_tfds_dir, copy, ignore=shutil.ignore_patterns("decoded-*"))
  builder = data.prepare("mnist", copy)
  images, labels = cache.load_split(builder, "test", 0)
  images_path, labels_path = cache.decoded_paths(builder, "test")
  size = os.path.getsize(labels_path)
  damaged = np.load(labels_path)
  damaged[: len(damaged) // 3] = 200  # no such class
  with open(labels_path, "r+b") as f:
    f.seek(size - damaged.nbytes)
    f.write(damaged.tobytes())
  assert os.path.getsize(labels_path) == size
  with caplog.at_level("INFO"):
    again_images, again_labels = cache.load_split(builder, "test", 0)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and labels_path in warnings[0], warnings
  assert "do not match the checksum recorded" in warnings[0]
  np.testing.assert_array_equal(again_labels, labels)
  np.testing.assert_array_equal(again_images, images)
  np.testing.assert_array_equal(np.load(labels_path), labels)  # rewritten whole
  caplog.clear()
  with caplog.at_level("INFO"):
    cache.load_split(builder, "test", 0)
  assert not [r for r in caplog.records if r.levelname == "WARNING"], "sound again: no word"
  assert cache.read_cached(builder, "test")[0] is not None


def test_decoded_arrays_without_checksums_are_decoded_again(synthetic_tfds_dir, tmp_path):
  """Arrays kept by an older version have no checksums: they are never trusted."""
  copy = str(tmp_path / "tfds")
  shutil.copytree(synthetic_tfds_dir, copy, ignore=shutil.ignore_patterns("decoded-*"))
  builder = data.prepare("mnist", copy)
  cache.load_split(builder, "test", 0)
  sums = cache.checksums_path(cache.decoded_paths(builder, "test")[0])
  os.remove(sums)
  assert cache.read_cached(builder, "test") == (None, None)
  cache.load_split(builder, "test", 0)
  assert os.path.isfile(sums)


def test_num_shards_other_than_the_prepared_count_is_refused(synthetic_tfds_dir):
  """Issue 33: --num_shards=8 on data prepared with 4 files was ignored without a word."""
  with pytest.raises(errors.ConfigError) as raised:
    data.prepare("mnist", synthetic_tfds_dir, num_shards=8)
  assert raised.value.exit_code == errors.EXIT_CONFIG
  message = str(raised.value)
  assert "--num_shards=8" in message and "prepared with 4 train record file(s)" in message
  assert f"--data_dir={synthetic_tfds_dir}" in message and "a new --data_dir" in message
  assert len(data.prepare("mnist", synthetic_tfds_dir, num_shards=4).info.splits[
      "train"].filepaths) == 4
  assert data.prepare("mnist", synthetic_tfds_dir).name == "mnist"  # 0: whatever is there


def test_leftovers_of_a_killed_preparation_are_removed(synthetic_tfds_dir, tmp_path):
  """Issue 33: a killed preparation left TFDS's downloads (64 MB for MNIST) and its unfinished
  incomplete.* version folder behind for good. The next run on that data_dir removes them."""
  copy = tmp_path / "tfds"
  shutil.copytree(synthetic_tfds_dir, copy)
  # As a kill leaves them (tensorflow_datasets/core/utils/file_utils.py: incomplete_dir).
  unfinished = copy / "mnist" / "incomplete.K1LL3D_3.0.1"
  unfinished.mkdir()
  (unfinished / "mnist-train.tfrecord-00000-of-00004").write_bytes(b"\0" * 1000)
  downloads = copy / "downloads" / ".preparing-mnist"  # sources.download_dir(copy, "mnist")
  (downloads / "extracted").mkdir(parents=True)
  (downloads / "extracted" / "GZIP.train-images-idx3-ubyte.gz").write_bytes(b"\0" * 1000)
  other = copy / "mnist" / "incomplete.OTHER1_4.0.0"  # another version's: not this one's
  other.mkdir()
  builder = data.prepare("mnist", str(copy))
  assert builder.info.splits["train"].num_examples == 1200
  assert not unfinished.exists() and not downloads.exists()
  assert other.exists()
  assert str(downloads) == sources.download_dir(str(copy), "mnist")


@pytest.mark.slow
def test_a_preparation_keeps_no_downloads(tfds_dir):
  """TFDS's copies of the MNIST files and their extraction (64 MB) go once it is prepared."""
  downloads = os.path.join(tfds_dir, "downloads")
  assert not os.path.exists(downloads) or os.listdir(downloads) == [], os.listdir(downloads)
  assert os.listdir(os.path.join(tfds_dir, "mnist")) == ["3.0.1"]


@pytest.mark.parametrize("num_shards", [0, 3])
def test_mnist_written_from_idx_equals_what_tfds_own_builder_writes(tmp_path, num_shards):
  """First contact's lever (trainer/data/mnist_tfds.py): MNIST written without TFDS's builder.
  Its record files hold the examples TFDS's own builder writes from the same IDX files (same
  PNG bytes, order, sharding, sizes; only the order of an Example's two features, which
  protobuf leaves open, may differ), and dataset_info.json and features.json are the same bytes;
  the arrays it returns are the records' examples decoded. A TFDS upgrade that changes any of it
  fails here. Small IDX files: TFDS's builder takes its split sizes from module constants,
  patched here as nowhere else."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist as tfds_mnist
  from conftest import _write_idx
  from trainer.data import mnist_tfds
  rng = np.random.default_rng(1)
  source = tmp_path / "idx"
  source.mkdir()
  for prefix, count in (("train", 61), ("t10k", 20)):
    _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", 0x0803,
               rng.integers(0, 256, size=(count, 28, 28), dtype="uint8"))
    _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 0x0801,
               rng.integers(0, 10, size=count, dtype="uint8"))
  canonical = tfds_mnist._TRAIN_EXAMPLES, tfds_mnist._TEST_EXAMPLES
  tfds_mnist._TRAIN_EXAMPLES, tfds_mnist._TEST_EXAMPLES = 61, 20
  try:
    theirs = data.tfds_builder("mnist", str(tmp_path / "tfds"))
    theirs.URL = str(source) + "/"
    theirs.download_and_prepare(download_config=tfds.download.DownloadConfig(
        num_shards=num_shards or None))
  finally:
    tfds_mnist._TRAIN_EXAMPLES, tfds_mnist._TEST_EXAMPLES = canonical
  arrays = mnist_tfds.write(data.tfds_builder("mnist", str(tmp_path / "ours")), str(source),
                            num_shards)
  dirs = {k: os.path.join(str(tmp_path / k), "mnist", "3.0.1") for k in ("tfds", "ours")}
  names = sorted(os.listdir(dirs["tfds"]))
  assert sorted(os.listdir(dirs["ours"])) == names
  assert len([n for n in names if ".tfrecord-" in n]) == 2 * (num_shards or 1)
  def examples(path):
    out = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      feature = tf.train.Example.FromString(record).features.feature
      out.append((set(feature), feature["image"].bytes_list.value, feature["label"].int64_list.value))
    return out

  for name in names:
    paths = [os.path.join(dirs[k], name) for k in ("tfds", "ours")]
    if ".tfrecord-" in name:
      assert os.path.getsize(paths[0]) == os.path.getsize(paths[1]), name
      assert examples(paths[0]) == examples(paths[1]), name
    else:
      with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read(), name
  ours = tfds.builder_from_directory(dirs["ours"])
  for split, count in (("train", 61), ("test", 20)):
    assert ours.info.splits[split].num_examples == count
    records = [e for path in ours.info.splits[split].filepaths for e in examples(str(path))]
    images = np.stack([tf.io.decode_png(image[0]).numpy() for _, image, _ in records])
    np.testing.assert_array_equal(arrays[split][0], images)
    np.testing.assert_array_equal(arrays[split][1], [label[0] for _, _, label in records])


@pytest.mark.slow  # real MNIST written twice (the canonical files' hashes are checked)
def test_the_first_preparation_keeps_the_decoded_arrays_of_its_records(tfds_dir, tmp_path):
  """The decoded cache of a fresh MNIST preparation comes from the IDX arrays, not from the
  records: it equals the split as TFDS reads it, and is found (by its key) as any cache is.
  Several record files TFDS reads interleaved: that split is decoded at its first load."""
  builder = data.prepare("mnist", tfds_dir)
  cached = cache.read_cached(builder, "test")
  assert cached[0] is not None
  images, labels = cache.decode_split(builder, "test")
  np.testing.assert_array_equal(cached[0], images)
  np.testing.assert_array_equal(cached[1], labels)
  sharded = data.prepare("mnist", str(tmp_path), num_shards=3)
  assert cache.read_cached(sharded, "test") == (None, None)
  np.testing.assert_array_equal(cache.load_split(sharded, "test", 0)[1],
                                cache.decode_split(sharded, "test")[1])


def test_a_failed_mnist_preparation_leaves_nothing(tmp_path):
  """A source that breaks mid-preparation (a truncated IDX file: the test split's images end
  early) leaves no version folder and no incomplete.* folder; TFDS sees nothing prepared."""
  from conftest import _write_idx
  from trainer.data import mnist_tfds
  source = tmp_path / "idx"
  source.mkdir()
  rng = np.random.default_rng(2)
  for prefix, count in (("train", 30), ("t10k", 10)):
    _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", 0x0803,
               rng.integers(0, 256, size=(count, 28, 28), dtype="uint8"))
    _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 0x0801,
               rng.integers(0, 10, size=count, dtype="uint8"))
  with open(source / "t10k-images-idx3-ubyte.gz", "rb") as f:
    whole = f.read()
  (source / "t10k-images-idx3-ubyte.gz").write_bytes(whole[:len(whole) // 2])
  builder = data.tfds_builder("mnist", str(tmp_path / "tfds"))
  with pytest.raises(Exception):
    mnist_tfds.write(builder, str(source))
  assert os.listdir(tmp_path / "tfds" / "mnist") == []
  assert not data.tfds_builder("mnist", str(tmp_path / "tfds")).is_prepared()


@pytest.mark.slow
def test_a_preparation_killed_mid_write_is_cleaned_up_and_redone(tmp_path):
  """kill -9 while MNIST's records are being written: the next run removes the half-written
  incomplete.* folder, prepares MNIST whole and trains on the same arrays as ever."""
  import signal
  import subprocess
  import sys
  from conftest import child_env
  target = tmp_path / "tfds"
  code = f"from trainer import data\ndata.prepare('mnist', {str(target)!r})\n"
  proc = subprocess.Popen([sys.executable, "-c", code], env=child_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  folder = target / "mnist"
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      if folder.is_dir() and any(n.startswith("incomplete.") for n in os.listdir(folder)):
        break
      time.sleep(0.01)
    assert proc.poll() is None, "the preparation ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(30)
  assert [n for n in os.listdir(folder) if n.startswith("incomplete.")]
  assert not (folder / "3.0.1").exists()
  builder = data.prepare("mnist", str(target))
  assert os.listdir(folder) == ["3.0.1"]
  images, labels = cache.load_split(builder, "test", 0)
  decoded_images, decoded_labels = cache.decode_split(builder, "test")
  np.testing.assert_array_equal(images, decoded_images)
  np.testing.assert_array_equal(labels, decoded_labels)
  assert len(labels) == 10000


@pytest.mark.slow  # real MNIST encoded until the disk is full
@pytest.mark.parametrize("small_disk", ["12m"], indirect=True)
def test_mnist_preparation_on_a_full_disk_is_a_data_error_that_leaves_nothing(small_disk):
  """MNIST's records (23 MB) do not fit a 12 MiB disk: DataError (exit 3) naming --data_dir
  and the cause, and no incomplete.* or version folder left to fill the disk further."""
  with pytest.raises(errors.DataError, match=r"--data_dir=.*small_disk.*(No space|space left)"):
    data.prepare("mnist", str(small_disk))
  assert [n for n in os.listdir(small_disk / "mnist") if not n.startswith(".")] == []

"""Local copies and caches of the data (issue 33): the bucket decides, a full or read-only cache
is named, a read-only prepared data_dir trains."""

import os
import shutil
import socket
import subprocess

import pytest

from conftest import child_env, run_module, tiny_flags
from trainer import data
from trainer import errors
from trainer import storage

BUCKET = "data"
EMULATOR_BUCKETS = (BUCKET,)  # for conftest's emulator
TRAIN = [f"mnist/3.0.1/mnist-train.tfrecord-{i:05d}-of-00004" for i in range(4)]


@pytest.fixture
def read_only(tmp_path):
  """mount(folder) -> a read-only view of folder (a read-only bind mount: root, as these tests
  run, writes through permission bits, not through a read-only mount)."""
  mounted = []

  def mount(folder) -> str:
    target = tmp_path / f"read-only-{len(mounted)}"
    target.mkdir()
    result = subprocess.run(["mount", "--bind", str(folder), str(target)], capture_output=True,
                            text=True)
    if result.returncode:
      pytest.skip(f"cannot bind-mount here: {result.stderr.strip()}")
    mounted.append(target)
    result = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)],
                            capture_output=True, text=True)
    if result.returncode:
      pytest.skip(f"cannot make a bind mount read-only here: {result.stderr.strip()}")
    assert not os.access(target, os.W_OK)
    return str(target)

  yield mount
  for target in reversed(mounted):
    subprocess.run(["umount", "-l", str(target)], check=False)


def _dead_endpoint() -> str:
  """A loopback address nothing listens on: a test that must not reach storage cannot."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------- a read-only prepared data_dir


def test_read_only_prepared_data_dir_loads_in_memory_and_streams(synthetic_tfds_dir, tmp_path,
                                                                  read_only):
  """Issue 33: a read-only, fully prepared --data_dir exited 3 "not writable". It is read;
  decoded copies made before are used (each checked), none are made."""
  from trainer import config as config_lib
  copy = tmp_path / "tfds"
  shutil.copytree(synthetic_tfds_dir, copy)
  made = data.record_source(data.prepare("mnist", str(copy)), examples_read=10 ** 9)
  assert made.decoded
  frozen = read_only(copy)
  before = sorted(os.listdir(os.path.join(frozen, "mnist", "3.0.1")))
  builder = data.prepare("mnist", frozen)
  splits = data.load(config_lib.Config(epochs=1, data_dir=frozen).data, builder)
  assert splits.train_images.shape == (1200, 28, 28, 1)
  source = data.record_source(builder, examples_read=10 ** 9)
  assert source.decoded and [os.path.basename(f) for f in source.files] == [
      os.path.basename(f) for f in made.files]
  assert sorted(os.listdir(os.path.join(frozen, "mnist", "3.0.1"))) == before


def test_read_only_prepared_image_folder(tmp_path, read_only):
  import image_folder_test
  folder = image_folder_test.make_folder(tmp_path / "images", per_class=6)
  data.prepare(f"image_folder:{folder}", str(tmp_path / "tfds"), eval_fraction=0.3)
  builder = data.prepare(f"image_folder:{folder}", read_only(tmp_path / "tfds"),
                         eval_fraction=0.3)
  assert builder.info.features["label"].names == ["blue", "green", "red"]
  with pytest.raises(errors.DataError, match="is not writable"):  # not prepared: must write
    data.prepare(f"image_folder:{folder}", read_only(tmp_path / "tfds"), eval_fraction=0.2)


@pytest.mark.slow
def test_read_only_prepared_data_dir_trains(synthetic_tfds_dir, tmp_path, read_only, caplog):
  from trainer import config as config_lib
  from trainer import train
  copy = tmp_path / "tfds"
  shutil.copytree(synthetic_tfds_dir, copy, ignore=shutil.ignore_patterns("*.decoded"))
  caplog.set_level("INFO")
  metrics = train.train_and_evaluate(config_lib.Config(
      model_dir=str(tmp_path / "run"), data_dir=read_only(copy), input_mode="stream",
      train_steps=40, global_batch_size=32, steps_per_loop=10, checkpoint_every_steps=40,
      model_widths=(8, 16), eval_examples=100, export=False))
  assert metrics["global_step"] == 40  # an epoch: decoded copies would pay, if writable
  assert "is not writable" in caplog.text  # why no decoded copies were made


# ---------------------------------------------------------------- a read-only TRAINER_CACHE_DIR


def test_read_only_cache_with_a_bucket_data_dir_is_a_config_error(tmp_path, read_only,
                                                                   monkeypatch):
  """Issue 33: exit 1 with a traceback. Now exit 2 naming the cache, what needs it, the fix."""
  (tmp_path / "cache").mkdir()
  cache = read_only(tmp_path / "cache")
  monkeypatch.setenv(storage.CACHE_DIR_ENV, cache)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", _dead_endpoint())
  with pytest.raises(errors.ConfigError) as raised:
    data.prepare("mnist", "gs://bucket/tfds")
  assert raised.value.exit_code == errors.EXIT_CONFIG
  message = str(raised.value)
  assert f"The local cache {cache}" in message and "not writable" in message
  assert "--data_dir=gs://bucket/tfds" in message and f"set {storage.CACHE_DIR_ENV}" in message
  with pytest.raises(errors.ConfigError, match=f"{cache}.*--model_dir=gs://bucket/run"):
    with storage.for_flag("--model_dir"):
      storage.preflight("gs://bucket/run")


@pytest.mark.slow
def test_read_only_cache_with_a_bucket_model_dir_exits_2(synthetic_tfds_dir, tmp_path,
                                                         read_only):
  (tmp_path / "cache").mkdir()
  cache = read_only(tmp_path / "cache")
  result = run_module("trainer.task", *tiny_flags("gs://bucket/run", synthetic_tfds_dir),
                      env=child_env(TRAINER_CACHE_DIR=cache, STORAGE_EMULATOR_HOST=_dead_endpoint(),
                                    GOOGLE_CLOUD_PROJECT="test"), timeout=120)
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-3000:]
  assert "Traceback" not in result.stdout, result.stdout[-3000:]
  assert f"The local cache {cache}" in result.stdout
  assert "the local mirror of --model_dir=gs://bucket/run" in result.stdout


# ---------------------------------------------------------------- gs:// data: the bucket decides


@pytest.fixture
def env(emulator, monkeypatch, tmp_path):
  for name, value in {**emulator.env(), "TRAINER_STORAGE_RETRY_DEADLINE_S": "10",
                      storage.CACHE_DIR_ENV: str(tmp_path / "cache")}.items():
    monkeypatch.setenv(name, value)
  return monkeypatch


def _upload(synthetic_tfds_dir, uri, damage=None) -> None:
  """The synthetic dataset's metadata and record files to uri/mnist/3.0.1 (not the caches
  other tests keep beside them); damage(rel, bytes) -> bytes alters a file on the way."""
  version = os.path.join(synthetic_tfds_dir, "mnist", "3.0.1")
  for name in sorted(os.listdir(version)):
    if name in ("dataset_info.json", "features.json") or (
        data.is_record_file(name) and not name.endswith(".decoded") and not name.startswith(".")):
      with open(os.path.join(version, name), "rb") as f:
        body = f.read()
      rel = f"mnist/3.0.1/{name}"
      storage.write_bytes(f"{uri}/{rel}", damage(rel, body) if damage else body)


@pytest.fixture(scope="module")
def synthetic_uri(emulator, synthetic_tfds_dir):
  with pytest.MonkeyPatch.context() as patch:
    for name, value in emulator.env().items():
      patch.setenv(name, value)
    _upload(synthetic_tfds_dir, f"gs://{BUCKET}/synthetic")
  return f"gs://{BUCKET}/synthetic"


def _flip_a_third(body: bytes) -> bytes:
  third = len(body) // 3
  return body[:third] + bytes(255 - b for b in body[third:2 * third]) + body[2 * third:]


@pytest.mark.slow
def test_damaged_local_copy_of_a_bucket_file_is_fetched_again(env, emulator, synthetic_uri,
                                                              caplog):
  """Issue 33: a damaged local copy of a gs:// record file made every rerun exit 3, advising to
  prepare the dataset again, though the bucket's copy was fine. The bucket decides: the copy
  is fetched again (one warning), and the run goes on."""
  from trainer.storage import gcs
  builder = data.prepare("mnist", synthetic_uri)
  first = data.record_source(builder, "train", synthetic_uri, examples_read=10 ** 9)
  assert first.decoded
  local = str(builder.info.splits["train"].filepaths[2])
  with open(local, "rb") as f:
    good = f.read()
  with open(local, "r+b") as f:  # the same size: only the bytes differ
    f.write(_flip_a_third(good))
  before = emulator.downloads(BUCKET)
  caplog.set_level("INFO")
  again = data.record_source(builder, "train", synthetic_uri, examples_read=10 ** 9)
  fetched = emulator.downloads(BUCKET) - before
  assert fetched == {f"synthetic/{TRAIN[2]}": 1}, fetched
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and local in warnings[0], warnings
  assert f"{synthetic_uri}/{TRAIN[2]}" in warnings[0] and "fetching it again" in warnings[0]
  with open(local, "rb") as f:
    assert f.read() == good
  assert gcs.crc32c_file(local) == emulator.object(BUCKET, f"synthetic/{TRAIN[2]}")["crc32c"]
  assert again.decoded and len(again.files) == len(first.files)
  before = emulator.downloads(BUCKET)
  data.record_source(builder, "train", synthetic_uri, examples_read=10 ** 9)
  assert not emulator.downloads(BUCKET) - before, "sound copies are not fetched again"


@pytest.mark.slow
def test_damaged_bucket_copy_exits_3_naming_the_object(env, emulator, synthetic_tfds_dir):
  """When the bucket's own copy is damaged, fetching again cannot help: exit 3 names the object
  and says to upload a good copy."""
  uri = f"gs://{BUCKET}/damaged"
  _upload(synthetic_tfds_dir, uri,
          damage=lambda rel, body: _flip_a_third(body) if rel == TRAIN[1] else body)
  builder = data.prepare("mnist", uri)
  with pytest.raises(errors.DataError) as raised:
    data.record_source(builder, "train", uri, examples_read=10 ** 9)
  assert raised.value.exit_code == errors.EXIT_DATA
  message = str(raised.value)
  assert f"{uri}/{TRAIN[1]} is damaged in the bucket" in message
  assert "matches it" in message and "upload a good copy" in message


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["512k"], indirect=True)
def test_full_cache_disk_names_the_cache(env, emulator, synthetic_uri, small_disk):
  """Issue 33: with TRAINER_CACHE_DIR on a small tmpfs, fetching gs:// data exited 6 naming the
  model_dir (67 GB free). The folder that filled up is named, with the fix."""
  env.setenv(storage.CACHE_DIR_ENV, str(small_disk))
  builder = data.prepare("mnist", synthetic_uri)  # the metadata fits
  with pytest.raises(errors.StorageError) as raised:
    data.record_source(builder, "train", synthetic_uri)  # ~1 MB of record files do not
  assert raised.value.exit_code == errors.EXIT_STORAGE
  message = str(raised.value)
  assert f"No space left on the device of the local cache {small_disk}" in message
  assert f"set {storage.CACHE_DIR_ENV}" in message and "--model_dir" not in message
  leftovers = [n for n in os.listdir(os.path.dirname(str(
      builder.info.splits["train"].filepaths[0]))) if n.endswith(".tmp")]
  assert not leftovers, "no partial file is left to fill the disk"

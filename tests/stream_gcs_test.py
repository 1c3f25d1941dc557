"""Stream mode on a gs:// --data_dir (a real GCS emulator): each worker fetches only its files."""

import collections
import json
import os
import re

import pytest

from gcs_emulator import FaultProxy
from trainer import data
from trainer import errors
from trainer import storage

pytestmark = pytest.mark.slow
BUCKET = "data"
EMULATOR_BUCKETS = (BUCKET,)  # for conftest's emulator
TRAIN = [f"mnist/3.0.1/mnist-train.tfrecord-{i:05d}-of-00004" for i in range(4)]
TEST = [f"mnist/3.0.1/mnist-test.tfrecord-{i:05d}-of-00004" for i in range(4)]


@pytest.fixture(scope="module")
def uri(emulator, tmp_path_factory):
  """gs://data/mnist4: TFDS mnist prepared here as 4 train and 4 test files, then uploaded."""
  local = str(tmp_path_factory.mktemp("mnist4"))
  data.prepare("mnist", local, num_shards=4)
  with pytest.MonkeyPatch.context() as patch:
    for name, value in emulator.env().items():
      patch.setenv(name, value)
    # The prepared folder alone, as a user would upload it (not TFDS's downloads/).
    storage.upload_dir(os.path.join(local, "mnist"), f"gs://{BUCKET}/mnist4/mnist")
  return f"gs://{BUCKET}/mnist4"


@pytest.fixture
def env(emulator, monkeypatch):
  for name, value in {**emulator.env(), "TRAINER_STORAGE_RETRY_DEADLINE_S": "30"}.items():
    monkeypatch.setenv(name, value)
  return monkeypatch


def _worker(env, emulator, cache, uri, pipeline_id, num_pipelines=2):
  """What one worker's _load_data fetches in stream mode: ({object: downloads}, RecordSource)."""
  env.setenv("TRAINER_CACHE_DIR", str(cache))
  before = emulator.downloads(BUCKET)
  builder = data.prepare("mnist", uri)
  source = data.record_source(builder, "train", uri, num_pipelines, (pipeline_id,))
  fetched = emulator.downloads(BUCKET) - before
  return {name[len("mnist4/"):]: n for name, n in fetched.items()}, source


def _split(fetched):
  records = {n: c for n, c in fetched.items() if data.is_record_file(n)}
  return records, {n: c for n, c in fetched.items() if n not in records}


def test_two_workers_fetch_disjoint_halves_then_nothing(env, emulator, uri, tmp_path):
  seen = {}
  for worker in (0, 1):  # two machines: a cache each
    fetched, source = _worker(env, emulator, tmp_path / f"cache{worker}", uri, worker)
    records, metadata = _split(fetched)
    assert records == {TRAIN[i]: 1 for i in (worker, worker + 2)}, fetched
    assert metadata and set(metadata.values()) == {1}, metadata  # dataset_info.json, ...
    assert "mnist/3.0.1/dataset_info.json" in metadata
    assert [os.path.isfile(f) for f in source.files] == [i % 2 == worker for i in range(4)]
    assert len(source.files) == 4 and source.counts == (15000,) * 4
    seen[worker] = set(records)
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(TRAIN)
  again, _ = _worker(env, emulator, tmp_path / "cache0", uri, 0)
  assert again == {}, "a second run fetches nothing"


def test_interrupted_fetch_is_never_read_and_is_replaced(env, emulator, uri, tmp_path):
  env.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
  builder = data.prepare("mnist", uri)  # stages the metadata only
  target = str(builder.info.splits["train"].filepaths[0])
  assert not os.path.exists(target)
  partial = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.dead1234.tmp")
  with open(partial, "wb") as f:
    f.write(b"\0" * 1000)  # a killed process's half download
  fetched, source = _worker(env, emulator, tmp_path / "cache", uri, 0)
  assert _split(fetched)[0] == {TRAIN[0]: 1, TRAIN[2]: 1}
  assert not os.path.exists(partial)
  meta = emulator.object(BUCKET, "mnist4/" + TRAIN[0])
  assert os.path.getsize(target) == int(meta["size"])
  from trainer.storage import gcs
  assert gcs.crc32c_file(target) == meta["crc32c"]
  assert source.files[0] == target
  assert not [n for n in os.listdir(os.path.dirname(target)) if n.endswith(".tmp")]


def test_record_sharding_fetches_every_file(env, emulator, uri, tmp_path, caplog):
  caplog.set_level("INFO")
  fetched, source = _worker(env, emulator, tmp_path / "cache", uri, 5, num_pipelines=8)
  assert _split(fetched)[0] == {name: 1 for name in TRAIN}
  assert all(os.path.isfile(f) for f in source.files)
  assert "every pipeline reads every file and this worker fetches them all" in caplog.text


def test_load_fetches_what_it_decodes(env, emulator, uri, tmp_path):
  """Stream mode's test split on the chief alone; in_memory mode every file, as before."""
  from trainer import config as config_lib
  env.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
  builder = data.prepare("mnist", uri)
  config = config_lib.Config(model_dir=str(tmp_path / "run"), data_dir=uri, epochs=1,
                             train_examples=100, eval_examples=100)
  before = emulator.downloads(BUCKET)
  splits = data.load(config.data, builder, with_train=False, with_test=False)  # not the chief
  assert splits.test_images is None and splits.image_shape == (28, 28, 1)
  assert not emulator.downloads(BUCKET) - before, "a worker that does not evaluate fetches none"
  splits = data.load(config.data, builder, with_train=False)
  assert splits.test_images.shape == (100, 28, 28, 1)
  assert {n[len("mnist4/"):] for n in emulator.downloads(BUCKET) - before} == set(TEST)
  before = emulator.downloads(BUCKET)
  splits = data.load(config.data, builder, with_train=True)
  assert splits.train_images.shape == (100, 28, 28, 1)
  assert {n[len("mnist4/"):] for n in emulator.downloads(BUCKET) - before} == set(TRAIN)


def test_missing_record_object_is_a_data_error_naming_it(env, emulator, uri, tmp_path):
  broken = f"gs://{BUCKET}/metadata-only"
  for name in ("dataset_info.json", "features.json"):
    storage.write_bytes(f"{broken}/mnist/3.0.1/{name}",
                        storage.read_bytes(f"{uri}/mnist/3.0.1/{name}"))
  env.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
  builder = data.prepare("mnist", broken)
  with pytest.raises(errors.DataError) as raised:
    data.record_source(builder, "train", broken, 2, (1,))
  assert raised.value.exit_code == errors.EXIT_DATA
  message = str(raised.value)
  assert f"{broken}/mnist/3.0.1/mnist-train.tfrecord-00001-of-00004 is missing" in message
  assert f"--data_dir={broken}" in message and "upload" in message


def test_storage_faults_retry_and_errors_name_data_dir(env, emulator, uri, tmp_path):
  env.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
  builder = data.prepare("mnist", uri)
  # A download cut off halfway is retried; the file lands whole.
  with FaultProxy(emulator.host, script=[("GET /download", "truncate_response")]) as proxy:
    env.setenv("STORAGE_EMULATOR_HOST", proxy.host)
    source = data.record_source(builder, "train", uri, 2, (0,))
    assert proxy.counts["truncate_response"] == 1
  meta = emulator.object(BUCKET, "mnist4/" + TRAIN[0])
  assert os.path.getsize(source.files[0]) == int(meta["size"])
  # A permanent error (403) goes through storage's mapping and names the flag to fix.
  with FaultProxy(emulator.host, forbid_bucket=BUCKET) as proxy:
    env.setenv("STORAGE_EMULATOR_HOST", proxy.host)
    with pytest.raises(errors.StorageError, match="permission denied.*or fix --data_dir"):
      data.record_source(builder, "train", uri, 2, (1,))
  assert not os.path.exists(source.files[1])


def test_two_worker_stream_run_fetches_each_file_once(emulator, uri, tmp_path):
  """A real 2-worker job: worker i fetches train files i and i + 2, and no file twice."""
  from conftest import child_env, run_module, tiny_flags
  args = tiny_flags(str(tmp_path / "run"), uri, input_mode="stream", train_examples=0,
                    train_steps=10, export="false", collective_timeout_s=60)
  before = emulator.downloads(BUCKET)
  result = run_module("trainer.launcher", "--workers=2", "--", *args, timeout=240,
                      env=child_env(**emulator.env(), TRAINER_CACHE_DIR=tmp_path / "cache",
                                    TRAINER_STORAGE_RETRY_DEADLINE_S=60))
  assert result.returncode == 0, result.stdout[-4000:]
  fetched = collections.Counter({n[len("mnist4/"):]: c
                                 for n, c in (emulator.downloads(BUCKET) - before).items()})
  records, metadata = _split(fetched)
  # The workers share this machine's cache: the metadata and test split come down once.
  assert records == {name: 1 for name in TRAIN + TEST}, fetched
  assert set(metadata.values()) == {1}, metadata
  for worker in (0, 1):
    line = re.search(rf"\[worker:{worker}\].*Fetched 2 train record file\(s\) from {uri} "
                     r"\(([^)]*)\)", result.stdout)
    assert line, result.stdout[-4000:]
    assert line.group(1) == ", ".join(os.path.basename(TRAIN[i]) for i in (worker, worker + 2))
  assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 10


def test_fetch_file_keeps_nothing_that_does_not_match_the_object(env, tmp_path):
  """A download whose bytes differ from the object's metadata is never renamed into place."""
  import types
  from trainer.storage import gcs
  src = f"gs://{BUCKET}/single/a.tfrecord-00000-of-00001"
  body = os.urandom(10_000)
  storage.write_bytes(src, body)
  dst = str(tmp_path / "a.tfrecord-00000-of-00001")
  assert storage.fetch_file(src, dst) == len(body)
  with open(dst, "rb") as f:
    assert f.read() == body
  os.remove(dst)
  with pytest.raises(FileNotFoundError):
    storage.fetch_file(src + "-missing", dst)
  real = gcs.get_blob(*gcs.split_gcs(src))
  stale = types.SimpleNamespace(size=real.size, crc32c=gcs.crc32c_bytes(b"other bytes"),
                                md5_hash=real.md5_hash)
  env.setattr(gcs, "get_blob", lambda bucket, name: stale)
  with pytest.raises(errors.StorageError, match="changed while it was downloaded"):
    storage.fetch_file(src, dst)
  assert os.listdir(tmp_path) == [], "no file under dst's name, no temporary file"

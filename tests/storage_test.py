"""Tests for trainer.storage against a real gcp-storage-emulator process and local directories."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid

import gcs_emulator
import pytest
from conftest import ROOT
from google.cloud import storage as gcs_client
from google.oauth2 import credentials as oauth2_credentials

from trainer import errors
from trainer.storage import gcs
from trainer.storage import retries
from trainer import storage

BUCKET = "storage-test"
EMULATOR_BUCKETS = (BUCKET,)  # for conftest's emulator
MARKER = "_COMPLETE"
BIG = 11 << 20  # above google-cloud-storage's 8 MiB multipart limit: a resumable upload


@pytest.fixture
def gcs_env(emulator, monkeypatch):
  for key, value in emulator.env().items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv(gcs.RETRY_DEADLINE_ENV, "20")
  return emulator


@pytest.fixture
def gcs_root(gcs_env):
  return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  """A fresh directory, local or under the emulator's bucket."""
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_root")


@pytest.fixture
def proxy(gcs_env, monkeypatch):
  """Starts a FaultProxy in front of the emulator and points the client at it."""
  with contextlib.ExitStack() as stack:

    def start(**kwargs):
      started = stack.enter_context(gcs_emulator.FaultProxy(gcs_env.host, **kwargs))
      monkeypatch.setenv("STORAGE_EMULATOR_HOST", started.host)
      return started

    yield start


def make_tree(path, big=False):
  """A small nested tree of distinct binary files (one empty); returns {relative path: bytes}."""
  files = {"a.bin": os.urandom(1000), "empty": b"", "sub/b.txt": b"hello\n",
           "sub/deeper/c.bin": os.urandom(70_000), "variables/variables.index": os.urandom(33)}
  if big:
    files["variables/variables.data-00000-of-00001"] = os.urandom(BIG)
  for rel, data in files.items():
    full = os.path.join(path, *rel.split("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
      f.write(data)
  return files


def read_tree(path):
  found = {}
  for dirpath, _, names in os.walk(path):
    for name in names:
      full = os.path.join(dirpath, name)
      with open(full, "rb") as f:
        found[os.path.relpath(full, path).replace(os.sep, "/")] = f.read()
  return found


def object_names(emulator, uri):
  bucket, name = storage.split_gcs(uri)
  return sorted(n[len(name) + 1:] for n in emulator.object_names(bucket, name + "/"))


# --------------------------------------------------------------------------- paths


def test_path_helpers():
  assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/x")
  assert storage.join("gs://b/run/", "ckpt", "/a.index") == "gs://b/run/ckpt/a.index"
  assert storage.join("gs://b", "x") == "gs://b/x"
  assert storage.join("/tmp/run", "ckpt", "a") == os.path.join("/tmp/run", "ckpt", "a")
  assert storage.split_gcs("gs://b/run/ckpt/a") == ("b", "run/ckpt/a")
  assert storage.split_gcs("gs://b") == ("b", "")


@pytest.mark.parametrize("bad", ["/tmp/x", "gs://", "gs:///x"])
def test_split_gcs_rejects_non_gcs(bad):
  with pytest.raises(errors.ConfigError):
    storage.split_gcs(bad)


# --------------------------------------------------------------------------- files


def test_write_read_round_trip(root):
  data = os.urandom(5000)
  storage.write_bytes(storage.join(root, "d", "x.bin"), data)
  storage.write_text(storage.join(root, "t.json"), '{"ünïcode": 1}')
  assert storage.read_bytes(storage.join(root, "d", "x.bin")) == data
  assert storage.read_text(storage.join(root, "t.json")) == '{"ünïcode": 1}'


def test_overwrite_replaces_content(root):
  path = storage.join(root, "x")
  storage.write_text(path, "first")
  storage.write_text(path, "second, longer")
  assert storage.read_text(path) == "second, longer"


def test_read_missing_raises_file_not_found(root):
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(storage.join(root, "missing"))


def test_exists_and_isdir(root):
  storage.write_text(storage.join(root, "d", "e", "f.txt"), "x")
  assert storage.exists(storage.join(root, "d", "e", "f.txt"))
  assert storage.exists(storage.join(root, "d")) and storage.isdir(storage.join(root, "d"))
  assert not storage.isdir(storage.join(root, "d", "e", "f.txt"))
  assert not storage.exists(storage.join(root, "nope"))
  assert not storage.exists(storage.join(root, "d", "e", "f"))  # a name prefix is not a child


def test_exists_in_missing_bucket_is_false(gcs_env):
  assert not storage.exists("gs://no-such-bucket-4711/x")


def test_listdir_lists_immediate_children(root):
  for rel in ("a", "b/c", "b/d/e", "bee"):
    storage.write_text(storage.join(root, *rel.split("/")), rel)
  assert storage.listdir(root) == ["a", "b", "bee"]
  assert storage.listdir(storage.join(root, "b")) == ["c", "d"]
  assert storage.listdir(storage.join(root, "missing")) == []


def test_remove(root):
  path = storage.join(root, "x")
  storage.write_text(path, "x")
  storage.remove(path)
  assert not storage.exists(path)
  with pytest.raises(FileNotFoundError):
    storage.remove(path)


def test_rmtree_spares_siblings_sharing_a_prefix(root):
  for rel in ("run/a", "run/sub/b", "run2/c"):
    storage.write_text(storage.join(root, *rel.split("/")), rel)
  storage.rmtree(storage.join(root, "run"))
  assert not storage.exists(storage.join(root, "run"))
  assert storage.read_text(storage.join(root, "run2", "c")) == "run2/c"
  storage.rmtree(storage.join(root, "run"))  # already gone: fine


def test_rmtree_refuses_a_bucket_root():
  with pytest.raises(errors.ConfigError):
    storage.rmtree("gs://some-bucket/")


def test_makedirs(root):
  storage.makedirs(storage.join(root, "x", "y"))
  storage.makedirs(storage.join(root, "x", "y"))
  if not storage.is_gcs(root):
    assert os.path.isdir(os.path.join(root, "x", "y"))


def test_failed_local_write_keeps_old_content_and_no_temp_file(tmp_path):
  path = str(tmp_path / "x")
  storage.write_text(path, "old")
  with pytest.raises(TypeError):
    storage.write_bytes(path, None)  # fails inside the temp-file write
  assert storage.read_text(path) == "old"
  assert os.listdir(tmp_path) == ["x"]


def test_local_write_creates_parents_and_readable_files(tmp_path):
  path = str(tmp_path / "a" / "b" / "c.txt")
  storage.write_text(path, "x")
  assert os.stat(path).st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- directories


def test_upload_download_dir_round_trip(root, tmp_path):
  files = make_tree(tmp_path / "src")
  remote = storage.join(root, "export")
  assert storage.upload_dir(str(tmp_path / "src"), remote, marker=MARKER) == sorted(files)
  assert storage.is_complete(remote, MARKER)
  assert storage.is_complete(remote, MARKER, verify_files=True)
  manifest = json.loads(storage.read_text(storage.join(remote, MARKER)))
  assert {f["path"]: f["size"] for f in manifest["files"]} == {k: len(v) for k, v in files.items()}
  downloaded = storage.download_dir(remote, str(tmp_path / "dst"), marker=MARKER)
  assert downloaded == sorted(files) + [MARKER]  # the marker comes last
  got = read_tree(tmp_path / "dst")
  assert got.pop(MARKER) == storage.read_bytes(storage.join(remote, MARKER))
  assert got == files


def test_marker_is_written_last(gcs_root, emulator, tmp_path):
  make_tree(tmp_path / "src")
  storage.upload_dir(str(tmp_path / "src"), gcs_root, marker=MARKER)
  bucket, prefix = storage.split_gcs(gcs_root)
  generation = {name: int(emulator.object(bucket, f"{prefix}/{name}")["generation"])
                for name in object_names(emulator, gcs_root)}
  marker_generation = generation.pop(MARKER)
  assert marker_generation > max(generation.values())


def test_half_uploaded_dir_is_not_complete(root, tmp_path):
  make_tree(tmp_path / "src")
  remote = storage.join(root, "ckpt")
  storage.upload_dir(str(tmp_path / "src"), remote)  # no marker: an interrupted upload
  assert not storage.is_complete(remote, MARKER)
  with pytest.raises(FileNotFoundError, match=MARKER):
    storage.download_dir(remote, str(tmp_path / "dst"), marker=MARKER)
  storage.upload_dir(str(tmp_path / "src"), remote, marker=MARKER)
  storage.remove(storage.join(remote, "sub", "b.txt"))
  assert storage.is_complete(remote, MARKER)
  assert not storage.is_complete(remote, MARKER, verify_files=True)


def test_failed_reupload_removes_the_old_marker_first(root, tmp_path):
  src = tmp_path / "src"
  make_tree(src)
  remote = storage.join(root, "ckpt")
  storage.upload_dir(str(src), remote, marker=MARKER)
  os.symlink(str(tmp_path / "gone"), str(src / "zzz-dangling"))  # fails after the other files
  with pytest.raises(FileNotFoundError):
    storage.upload_dir(str(src), remote, marker=MARKER)
  assert not storage.is_complete(remote, MARKER)


def test_download_dir_of_missing_dir_raises(root, tmp_path):
  with pytest.raises(FileNotFoundError):
    storage.download_dir(storage.join(root, "missing"), str(tmp_path / "dst"))


# --------------------------------------------------------------------------- preflight


def test_preflight_ok_leaves_nothing_behind(root):
  storage.preflight(root)
  assert storage.listdir(root) == []


def test_preflight_local_unwritable_names_the_path(tmp_path):
  (tmp_path / "file").write_text("x")
  bad = str(tmp_path / "file" / "run")
  with pytest.raises(errors.StorageError, match=bad):
    storage.preflight(bad)


def test_preflight_missing_bucket_fails_fast(gcs_env, monkeypatch):
  monkeypatch.setenv(gcs.RETRY_DEADLINE_ENV, "30")
  start = time.monotonic()
  with pytest.raises(errors.StorageError) as raised:
    storage.preflight("gs://no-such-bucket-4711/run")
  assert time.monotonic() - start < 5
  assert "gs://no-such-bucket-4711 does not exist" in str(raised.value)
  assert "gcloud storage buckets create gs://no-such-bucket-4711" in str(raised.value)
  assert raised.value.exit_code == errors.EXIT_STORAGE


def test_preflight_forbidden_fails_fast(proxy, monkeypatch):
  monkeypatch.setenv(gcs.RETRY_DEADLINE_ENV, "30")
  fault_proxy = proxy(forbid_bucket=BUCKET)
  start = time.monotonic()
  with pytest.raises(errors.StorageError) as raised:
    storage.preflight(f"gs://{BUCKET}/run")
  assert time.monotonic() - start < 5
  assert f"gs://{BUCKET}" in str(raised.value)
  assert "roles/storage.objectAdmin" in str(raised.value)
  assert fault_proxy.counts["forbidden"] >= 1


# --------------------------------------------------------------------------- faults


def test_transfers_survive_injected_faults(proxy, emulator, gcs_root, tmp_path):
  files = make_tree(tmp_path / "src", big=True)
  fault_proxy = proxy(fail_rate=0.3, seed=20240611)
  storage.upload_dir(str(tmp_path / "src"), gcs_root, marker=MARKER)
  storage.write_text(storage.join(gcs_root, "sub", "b.txt"), "overwritten\n")
  files["sub/b.txt"] = b"overwritten\n"
  storage.download_dir(gcs_root, str(tmp_path / "dst"))
  got = read_tree(tmp_path / "dst")
  got.pop(MARKER)
  assert got == files
  assert fault_proxy.failed >= 3, fault_proxy.counts
  assert len({mode for _, _, mode in fault_proxy.history if mode}) >= 2, fault_proxy.counts
  assert object_names(emulator, gcs_root) == sorted(list(files) + [MARKER])


@pytest.mark.parametrize("size, request_prefix, fault, landed", [
    (10, "POST", "drop_response", True),
    (BIG, "PUT", "drop_response", True),
    (10, "POST", "reset_mid_body", False),
    (BIG, "PUT", "reset_mid_body", False),
], ids=["multipart-lost-response", "resumable-lost-response", "multipart-cut", "resumable-cut"])
def test_interrupted_upload_is_retried_whole(proxy, emulator, gcs_root, size, request_prefix,
                                             fault, landed):
  # A lost response means the object landed: the retry must meet it (412) and accept it.
  fault_proxy = proxy(script=[(request_prefix, fault)])
  data = os.urandom(size)
  storage.write_bytes(storage.join(gcs_root, "x"), data)
  assert fault_proxy.counts[fault] == 1
  assert fault_proxy.counts["precondition_failed"] == int(landed)
  assert storage.read_bytes(storage.join(gcs_root, "x")) == data
  assert object_names(emulator, gcs_root) == ["x"]


def test_interrupted_download_is_retried(proxy, gcs_root):
  data = os.urandom(BIG)
  storage.write_bytes(storage.join(gcs_root, "x"), data)
  fault_proxy = proxy(script=[("GET /download", "truncate_response")] * 2)
  assert storage.read_bytes(storage.join(gcs_root, "x")) == data
  assert fault_proxy.counts["truncate_response"] == 2


def test_upload_over_another_writers_object_is_an_error(proxy, gcs_root):
  proxy()  # the proxy enforces the preconditions that the emulator ignores
  path = storage.join(gcs_root, "x")
  storage.write_text(path, "theirs")
  ours = b"ours"
  with pytest.raises(errors.StorageError, match="another writer"):
    # generation 0 is what a writer that looked before "theirs" landed would hold
    gcs.upload(path, lambda: io.BytesIO(ours), len(ours), gcs.crc32c_bytes(ours),
                    generation=0)
  assert storage.read_text(path) == "theirs"


def test_retry_deadline_bounds_total_time(proxy, gcs_root, monkeypatch):
  monkeypatch.setenv(gcs.RETRY_DEADLINE_ENV, "1")  # each operation ends 1 s in, well under 6
  fault_proxy = proxy(fail_rate=1.0, modes=("503", "reset", "reset_mid_body"))
  for operation in (lambda: storage.write_bytes(storage.join(gcs_root, "x"), b"x"),
                    lambda: storage.read_bytes(storage.join(gcs_root, "x"))):
    start = time.monotonic()
    with pytest.raises(errors.RetryableError) as raised:
      operation()
    assert time.monotonic() - start < 6
    assert raised.value.exit_code == errors.EXIT_RETRYABLE
  assert fault_proxy.forwarded == 0 and fault_proxy.failed >= 4


def test_logs_never_contain_credentials(proxy, gcs_root, tmp_path, caplog, monkeypatch):
  fault_proxy = proxy(fail_rate=0.3, seed=7)
  token = "ya29.test-secret-token"
  token_client = gcs_client.Client(project=gcs_emulator.PROJECT,
                            credentials=oauth2_credentials.Credentials(token=token))
  monkeypatch.setattr(gcs, "client", lambda: token_client)
  caplog.set_level(logging.DEBUG)
  make_tree(tmp_path / "src")
  storage.preflight(gcs_root)
  storage.upload_dir(str(tmp_path / "src"), gcs_root, marker=MARKER)
  storage.download_dir(gcs_root, str(tmp_path / "dst"))
  storage.listdir(gcs_root)
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(storage.join(gcs_root, "missing"))
  assert fault_proxy.counts["with_authorization"] > 0  # the token really was on the wire
  assert fault_proxy.failed > 0 and "retry" in caplog.text  # and errors were logged
  for secret in ("Bearer", "access_token", token):
    assert secret not in caplog.text


def test_failed_preflight_leaves_no_probe_behind(proxy, gcs_root, monkeypatch, emulator):
  """The probe's upload lands but its response is lost and no retry time is left."""
  monkeypatch.setenv(gcs.RETRY_DEADLINE_ENV, "0")
  proxy(script=[("POST /upload", "drop_response")])
  with pytest.raises(errors.RetryableError):
    storage.preflight(gcs_root)
  prefix = storage.split_gcs(gcs_root)[1]
  assert not [n for n in emulator.object_names(BUCKET, prefix) if ".preflight-" in n]


def test_missing_bucket_names_the_flag_in_use(gcs_env):
  with pytest.raises(errors.StorageError, match="or fix --checkpoint_dir"):
    with storage.for_flag("--checkpoint_dir"):
      storage.preflight("gs://no-such-bucket-here/ckpt")
  with pytest.raises(errors.StorageError, match="or fix --model_dir"):
    storage.preflight("gs://no-such-bucket-here/run")


def test_retry_jitter_leaves_the_global_random_state_alone():
  import random
  random.seed(7)
  state = random.getstate()
  delays = [retries._backoff_s(attempt) for attempt in (1, 2, 3, 4)]
  assert random.getstate() == state, "a seeded run must not depend on its storage retries"
  assert all(0 < d <= 10 for d in delays) and len(set(delays)) == 4


def test_retry_listeners_hear_each_retry_until_removed(monkeypatch):
  """Storage's only tie to the collective watchdog (trainer/runtime/watchdog.py registers one):
  a callback told what is retrying and how long the retries may still take."""
  monkeypatch.setenv(gcs.RETRY_DEADLINE_ENV, "30")
  heard = []
  failures = []

  def flaky():
    if failures:
      raise failures.pop()
    return "done"

  def listener(what, remaining_s):
    heard.append((what, remaining_s))

  retries.add_listener(listener)
  try:
    failures[:] = [ConnectionResetError("reset"), TimeoutError("slow")]
    assert gcs.retry(flaky, "upload gs://b/x") == "done"
  finally:
    retries.remove_listener(listener)
  assert [what for what, _ in heard] == ["upload gs://b/x"] * 2
  assert all(0 < remaining <= 30 for _, remaining in heard)
  failures[:] = [ConnectionResetError("reset")]
  assert gcs.retry(flaky, "upload gs://b/y") == "done"
  assert len(heard) == 2, "a removed listener hears nothing more"


def test_write_if_generation_creates_once(proxy, gcs_root):
  proxy()  # the emulator ignores ifGenerationMatch; the proxy enforces it as GCS does
  path = storage.join(gcs_root, "lock")
  assert storage.write_if_generation(path, b"a", 0)
  assert not storage.write_if_generation(path, b"b", 0)
  generation = storage.generation(path)
  assert storage.write_if_generation(path, b"c", generation)
  assert storage.read_bytes(path) == b"c" and storage.generation(path) != generation


def test_read_json_missing_or_unreadable_gives_the_default(root):
  path = storage.join(root, "state.json")
  assert storage.read_json(path, {"a": 1}) == {"a": 1}
  storage.write_bytes(path, b"\xff\xfe not json")
  assert storage.read_json(path, []) == []
  storage.write_text(path, '{"starts": [1]}')
  assert storage.read_json(path, None) == {"starts": [1]}


def test_local_paths_never_load_the_bucket_libraries(tmp_path):
  """A run on local paths is spared google-cloud-storage's import (a quarter of a second); the
  first gs:// path loads it. In a fresh interpreter, as a trainer starts."""
  code = (
      "import sys\n"
      "from trainer import storage\n"
      f"root = {str(tmp_path)!r}\n"
      "storage.write_text(storage.join(root, 'a', 'b.txt'), 'x')\n"
      "storage.preflight(root)\n"
      "assert storage.exists(storage.join(root, 'a', 'b.txt')) and storage.listdir(root) == ['a']\n"
      "storage.upload_dir(storage.join(root, 'a'), storage.join(root, 'c'), marker='_DONE')\n"
      "assert storage.is_complete(storage.join(root, 'c'), '_DONE')\n"
      # (google.cloud itself is a namespace package a .pth file may create at start-up)
      "loaded = sorted(m for m in sys.modules if m.startswith(('google.cloud.', 'google.api_core',"
      " 'trainer.storage.gcs', 'trainer.storage.bucket')))\n"
      "assert not loaded, loaded\n"
      "try:\n"
      "  storage.exists('gs://no-such-bucket-here/x')\n"
      "except Exception:\n"
      "  pass\n"
      "assert 'google.cloud.storage' in sys.modules and 'trainer.storage.bucket' in sys.modules\n"
      "print('ok')\n")
  env = {**os.environ, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", gcs.RETRY_DEADLINE_ENV: "0"}
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

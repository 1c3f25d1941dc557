"""One run per model_dir: local flock locks and gs:// heartbeat locks against a real emulator."""

import json
import os
import subprocess
import sys
import time
import uuid

import gcs_emulator
import pytest

from trainer import errors
from trainer.storage import fencing
from trainer.storage import gcs
from trainer.storage import lock as run_lock
from trainer import storage

BUCKET = "lock-test"
EMULATOR_BUCKETS = (BUCKET,)  # for conftest's emulator


def test_local_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
  first = run_lock.acquire(str(tmp_path), str(tmp_path))
  child = ("import sys; from trainer.storage import lock as run_lock\n"
           "try:\n  run_lock.acquire(sys.argv[1], sys.argv[1])\n"
           "except Exception as e:\n  print(e); sys.exit(2)\n")
  held = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True,
                        text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert held.returncode == 2 and f"pid {os.getpid()}" in held.stdout, held.stdout + held.stderr
  first.release()
  freed = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert freed.returncode == 0, freed.stdout + freed.stderr


def test_local_lock_of_a_killed_owner_is_free(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from trainer.storage import lock as run_lock\n"
       "lock = run_lock.acquire(sys.argv[1], sys.argv[1]); print('held', flush=True)\n"
       "time.sleep(60)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(errors.ConfigError, match=f"pid {holder.pid}"):
    run_lock.acquire(str(tmp_path), str(tmp_path))
  holder.kill()  # kill -9: no chance to release
  holder.wait(timeout=10)
  run_lock.acquire(str(tmp_path), str(tmp_path)).release()


@pytest.fixture
def proxy(emulator, monkeypatch):
  # The emulator ignores preconditions; the proxy enforces them as GCS does.
  with gcs_emulator.FaultProxy(emulator.host) as fault_proxy:
    for key, value in fault_proxy.env().items():
      monkeypatch.setenv(key, value)
    yield fault_proxy


@pytest.fixture
def bucket_dir(proxy, monkeypatch):
  yield from _short_windows(monkeypatch, f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}")


def _short_windows(monkeypatch, path):
  # Short windows so the test sees heartbeats and staleness in seconds.
  monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.5)
  monkeypatch.setattr(run_lock, "STALE_AFTER_S", 3.0)
  monkeypatch.setattr(run_lock, "_POLL_S", 0.5)
  yield path


def test_bucket_lock_held_by_a_live_run_is_refused(bucket_dir):
  first = run_lock.acquire(bucket_dir, "/nonexistent")
  try:
    start = time.monotonic()
    with pytest.raises(errors.ConfigError, match=f"pid {os.getpid()}"):
      run_lock.acquire(bucket_dir, "/nonexistent")
    assert time.monotonic() - start < run_lock.STALE_AFTER_S + 5
  finally:
    first.release()
  assert not storage.exists(storage.join(bucket_dir, run_lock.LOCK_NAME)), "release deletes it"
  run_lock.acquire(bucket_dir, "/nonexistent").release()


def test_bucket_lock_of_a_vanished_run_is_taken_over(bucket_dir, emulator):
  path = storage.join(bucket_dir, run_lock.LOCK_NAME)
  storage.write_text(path, json.dumps({"host": "gone-vm", "pid": 1, "started": "x"}))
  start = time.monotonic()
  lock = run_lock.acquire(bucket_dir, "/nonexistent")
  waited = time.monotonic() - start
  assert run_lock.STALE_AFTER_S <= waited < run_lock.STALE_AFTER_S + 5
  name = path[len(f"gs://{BUCKET}/"):]
  assert emulator.object(BUCKET, name)["metadata"]["pid"] == str(os.getpid())
  lock.release()


def test_release_after_the_lock_file_was_deleted_is_quiet(tmp_path):
  lock = run_lock.acquire(str(tmp_path), str(tmp_path))
  os.remove(tmp_path / run_lock.LOCK_NAME)  # an operator "cleans up" during the run
  lock.release()
  run_lock.acquire(str(tmp_path), str(tmp_path)).release()


# ---- A lost lock stops every later write (issue 33 #1 and #3) ----


def test_a_deleted_or_replaced_lock_file_is_lost_before_the_next_write(tmp_path):
  lock = run_lock.acquire(str(tmp_path), str(tmp_path))
  try:
    fencing.check()  # held: nothing to say
    os.remove(tmp_path / run_lock.LOCK_NAME)
    with pytest.raises(errors.ConfigError, match=(
        r"Lost the lock .*\.trainer-lock of --model_dir=.*: the lock file was deleted while "
        r"this run held it.* stopped before its next write")) as raised:
      fencing.check()
    assert raised.value.exit_code == 2
    # A newcomer now takes the path; the old holder stays refused.
    newcomer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.storage import lock as run_lock\n"
         "lock = run_lock.acquire(sys.argv[1], sys.argv[1]); print('held', flush=True)\n"
         "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
      assert newcomer.stdout.readline().strip() == "held"
      with pytest.raises(errors.ConfigError, match="was deleted"):
        fencing.check()
    finally:
      newcomer.kill()
      newcomer.wait(timeout=10)
  finally:
    lock.release()
  assert fencing.held() == []


def test_a_replaced_lock_file_names_the_new_owner(tmp_path):
  lock = run_lock.acquire(str(tmp_path), str(tmp_path))
  try:
    replacement = tmp_path / "other"
    replacement.write_text(json.dumps({"host": "other-host", "pid": 4242, "started": "x"}))
    os.replace(replacement, tmp_path / run_lock.LOCK_NAME)
    with pytest.raises(errors.ConfigError, match=r"replaced while this run held it \(it now "
                       r"names host other-host, pid 4242"):
      fencing.check()
  finally:
    lock.release()
  assert (tmp_path / run_lock.LOCK_NAME).exists(), "release leaves the other run's file alone"


def _take_over(path, owner):
  """What a newcomer does once the lock went stale: rewrite it under the generation it saw."""
  current = gcs.stat_marker(path)
  assert gcs.create_marker(path, owner, current.generation, current.metageneration)


def test_a_taken_over_bucket_lock_makes_the_bucket_refuse_the_next_upload(bucket_dir, proxy,
                                                                         emulator):
  lock = run_lock.acquire(bucket_dir, "/nonexistent")
  lock_path = storage.join(bucket_dir, run_lock.LOCK_NAME)
  try:
    before = storage.join(bucket_dir, "checkpoints", "before")
    storage.write_text(before, "ours")
    # Another run takes the lock over while this one's lease still looks fresh (its last
    # renewal is recent), so only the bucket can refuse the next write: the compose's
    # precondition on the lock object's generation.
    _take_over(lock_path, {"host": "other-host", "pid": "4242", "started": "x", "token": "t"})
    after = storage.join(bucket_dir, "checkpoints", "after")
    with pytest.raises(errors.ConfigError, match=(
        r"Lost the lock .*\.trainer-lock of --model_dir=.*another run took it over \(host "
        r"other-host, pid 4242")):
      storage.write_text(after, "late")
    assert not storage.exists(after)
    assert ("POST", after[len(f"gs://{BUCKET}/"):]) in proxy.writes(status=(412,))
    # Later writes and deletes are refused before any request.
    sent = len(proxy.responses)
    for write in (lambda: storage.write_text(after, "later"), lambda: storage.remove(before)):
      with pytest.raises(errors.ConfigError, match="Lost the lock"):
        write()
    assert len(proxy.responses) == sent
    assert storage.read_text(before) == "ours"
    prefix = bucket_dir[len(f"gs://{BUCKET}/"):]
    assert not [n for n in emulator.object_names(BUCKET, prefix) if ".staging-" in n]
  finally:
    lock.release()
  # Release leaves the new owner's lock alone.
  assert gcs.stat_marker(lock_path).metadata["host"] == "other-host"
  assert fencing.held() == []


def test_the_heartbeat_finds_a_takeover_and_a_late_takeover_loses_to_a_renewal(bucket_dir):
  lock_path = storage.join(bucket_dir, run_lock.LOCK_NAME)
  lock = run_lock.acquire(bucket_dir, "/nonexistent")
  try:
    seen = gcs.stat_marker(lock_path)
    deadline = time.monotonic() + 10
    while gcs.stat_marker(lock_path).metageneration == seen.metageneration:
      assert time.monotonic() < deadline, "the heartbeat renews the metadata"
      time.sleep(0.1)
    # A newcomer that decided on what it saw before that renewal is refused.
    assert gcs.create_marker(lock_path, {"host": "late", "token": "x"}, seen.generation,
                             seen.metageneration) is None
    fencing.check()  # still ours
    _take_over(lock_path, {"host": "other-host", "pid": "1", "started": "x", "token": "y"})
    while True:  # the next renewal is refused: lost, without any write of ours
      try:
        fencing.check()
      except errors.ConfigError as e:
        assert "another run took it over (host other-host" in str(e)
        break
      assert time.monotonic() < deadline, "the heartbeat notices the takeover"
      time.sleep(0.1)
  finally:
    lock.release()

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
from trainer import run_lock
from trainer import storage

BUCKET = "lock-test"


def test_local_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
  first = run_lock.acquire(str(tmp_path), str(tmp_path))
  child = ("import sys; from trainer import run_lock\n"
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
      [sys.executable, "-c", "import sys, time; from trainer import run_lock\n"
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


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.Emulator() as emu:
    emu.create_bucket(BUCKET)
    yield emu


@pytest.fixture
def bucket_dir(emulator, monkeypatch):
  # The emulator ignores ifGenerationMatch; the proxy enforces it as GCS does.
  with gcs_emulator.FaultProxy(emulator.host) as proxy:
    for key, value in proxy.env().items():
      monkeypatch.setenv(key, value)
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


def test_bucket_lock_of_a_vanished_run_is_taken_over(bucket_dir):
  path = storage.join(bucket_dir, run_lock.LOCK_NAME)
  storage.write_text(path, json.dumps({"host": "gone-vm", "pid": 1, "started": "x"}))
  start = time.monotonic()
  lock = run_lock.acquire(bucket_dir, "/nonexistent")
  waited = time.monotonic() - start
  assert run_lock.STALE_AFTER_S <= waited < run_lock.STALE_AFTER_S + 5
  assert json.loads(storage.read_text(path))["pid"] == os.getpid()
  lock.release()


def test_release_after_the_lock_file_was_deleted_is_quiet(tmp_path):
  lock = run_lock.acquire(str(tmp_path), str(tmp_path))
  os.remove(tmp_path / run_lock.LOCK_NAME)  # an operator "cleans up" during the run
  lock.release()
  run_lock.acquire(str(tmp_path), str(tmp_path)).release()

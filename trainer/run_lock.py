"""One run per model_dir: a lock naming its owner's host and pid; a dead owner's lock is taken over."""

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from trainer import errors
from trainer import storage

LOCK_NAME = ".trainer-lock"
# gs:// locks: the owner rewrites the lock object this often; one unchanged for STALE_AFTER_S
# belongs to a run that died without releasing it (a VM that vanished, kill -9).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
_POLL_S = 5.0


def acquire(model_dir: str, local_model_dir: str):
  """Takes the lock of model_dir for this process, or raises ConfigError naming the owner.

  Local model_dirs use flock, which the kernel releases when the owner dies, so a stale lock
  is simply a free one. A bucket has no such thing: the owner keeps rewriting the lock object,
  and one that stays unchanged for STALE_AFTER_S is taken over.
  """
  if storage.is_gcs(model_dir):
    lock = _BucketLock(storage.join(model_dir, LOCK_NAME), model_dir)
  else:
    lock = _FileLock(os.path.join(local_model_dir, LOCK_NAME), model_dir)
  lock.acquire()
  return lock


def _owner() -> dict:
  # The token makes every holder's bytes unique, so a retried create can tell its own write
  # from another holder's (trainer.storage accepts a 412 only for identical bytes).
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "token": uuid.uuid4().hex}


def _describe(owner: dict) -> str:
  return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since "
          f"{owner.get('started', '?')}")


def _in_use(model_dir: str, owner: dict, lock_path: str) -> errors.ConfigError:
  return errors.ConfigError(
      f"--model_dir={model_dir} is in use by another run ({_describe(owner)}; lock {lock_path}). "
      "Two runs writing one model_dir would overwrite each other's checkpoints: wait for that "
      "run to finish, stop it, or use another --model_dir.")


def _parse(raw: bytes) -> dict:
  try:
    owner = json.loads(raw.decode("utf-8"))
  except ValueError:
    return {}
  return owner if isinstance(owner, dict) else {}


class _FileLock:
  """flock on model_dir/.trainer-lock; the file's content names the owner for others' messages."""

  def __init__(self, path: str, model_dir: str):
    self.path = path
    self._model_dir = model_dir
    self._file = None

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while True:
      f = open(self.path, "a+b")  # pylint: disable=consider-using-with
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        f.seek(0)
        owner = _parse(f.read())
        f.close()
        raise _in_use(self._model_dir, owner, self.path) from None
      if _same_file(f, self.path):
        break
      f.close()  # the owner released and deleted it between our open and flock: start over
    f.seek(0)
    previous = _parse(f.read())
    if previous:
      logging.warning("Took over the lock of a run that did not release it (%s): it is no "
                      "longer running.", _describe(previous))
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_owner()).encode())
    f.flush()
    self._file = f

  def release(self) -> None:
    if self._file is None:
      return
    # Deleted while still locked: a newcomer that opened the old file finds, after its flock,
    # that the path no longer names that file, and tries again (see acquire).
    if _same_file(self._file, self.path):  # someone may have deleted or replaced it meanwhile
      os.remove(self.path)
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None


def _same_file(f, path: str) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
  except FileNotFoundError:
    return False


class _BucketLock:
  """A lock object created only if absent, kept fresh by a heartbeat thread."""

  def __init__(self, path: str, model_dir: str):
    self.path = path
    self._model_dir = model_dir
    self._generation = None
    self._mine = json.dumps(_owner()).encode()
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> None:
    mine = self._mine
    if storage.write_if_generation(self.path, mine, 0):
      self._hold()
      return
    seen, changed_at = storage.generation(self.path), time.monotonic()
    owner = self._read_owner()
    deadline = changed_at + STALE_AFTER_S + 2 * _POLL_S
    logging.warning("%s is held by %s; waiting up to %.0fs for it to be released or go stale.",
                    self.path, _describe(owner), STALE_AFTER_S)
    while time.monotonic() < deadline:
      time.sleep(_POLL_S)
      now = storage.generation(self.path)
      if now is None and storage.write_if_generation(self.path, mine, 0):
        self._hold()
        return
      if now != seen:
        # The owner is alive: it rewrote the lock (or another newcomer took it).
        raise _in_use(self._model_dir, self._read_owner(), self.path)
    if storage.write_if_generation(self.path, mine, seen):
      logging.warning("Took over %s: its owner (%s) stopped renewing it %.0fs ago.", self.path,
                      _describe(owner), STALE_AFTER_S)
      self._hold()
      return
    raise _in_use(self._model_dir, self._read_owner(), self.path)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=HEARTBEAT_S)
      self._thread = None
    if self._generation is not None and storage.generation(self.path) == self._generation:
      storage.remove(self.path)
    self._generation = None

  def _read_owner(self) -> dict:
    try:
      return _parse(storage.read_bytes(self.path))
    except FileNotFoundError:
      return {}

  def _hold(self) -> None:
    self._generation = storage.generation(self.path)
    self._thread = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if storage.write_if_generation(self.path, self._mine, self._generation):
          self._generation = storage.generation(self.path)
        else:
          logging.error("Lost %s to another run; this run keeps going, but check who else "
                        "writes to --model_dir=%s.", self.path, self._model_dir)
          return
      except errors.TrainerError as e:  # a storage outage: try again at the next beat
        logging.warning("Could not renew %s: %s", self.path, e)

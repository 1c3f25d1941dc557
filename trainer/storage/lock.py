"""One run per output directory: a lock naming its owner's host and pid, checked before each write.

The chief locks model_dir and the checkpoint dir (trainer/outputs.py). Holding a lock is not
enough: a lock can be lost while its run goes on (a deleted lock file, a bucket lock taken over
from a paused owner), so each lock is registered with trainer/storage/fencing.py, which every writer
asks first; a lost lock stops the run with ConfigError (exit 2) before its next write.
"""

import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
import uuid

from trainer import errors
from trainer.storage import fencing
from trainer import storage

LOCK_NAME = ".trainer-lock"
# gs:// locks: the owner renews the lock object's metadata every HEARTBEAT_S; one whose
# generation and metageneration stay unchanged for STALE_AFTER_S belongs to a run that stopped
# renewing it (a VM that vanished, kill -9, or a paused process) and is taken over.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
_POLL_S = 5.0
# Tests (and impatient operators) shorten the window: the heartbeat is a quarter of it.
STALE_ENV = "TRAINER_LOCK_STALE_S"


def acquire(directory: str, local_directory: str, flag: str = "--model_dir"):
  """Takes the lock of directory for this process, or raises ConfigError naming the owner.

  Local directories use flock, which the kernel releases when the owner dies, so a stale lock
  is simply a free one. A bucket has no such thing: the owner keeps renewing the lock object,
  and one unchanged for the stale window is taken over. Either way the lock is registered with
  trainer/storage/fencing.py until release(). `flag` names the directory in messages.
  """
  if storage.is_gcs(directory):
    lock = _BucketLock(storage.join(directory, LOCK_NAME), directory, flag)
  else:
    lock = _FileLock(os.path.join(local_directory, LOCK_NAME), directory, flag)
  lock.acquire()
  fencing.hold(lock)
  return lock


def windows() -> tuple:
  """(stale after, heartbeat, poll) in seconds: the module's, or from $TRAINER_LOCK_STALE_S."""
  raw = os.environ.get(STALE_ENV)
  if not raw:
    return STALE_AFTER_S, HEARTBEAT_S, _POLL_S
  try:
    stale = float(raw)
  except ValueError:
    stale = math.nan
  if not (math.isfinite(stale) and stale > 0):
    raise errors.ConfigError(f"{STALE_ENV}={raw!r} must be a positive number of seconds (the "
                             f"bucket lock's stale window; unset it for {STALE_AFTER_S:.0f}).")
  return stale, stale / 4, min(_POLL_S, stale / 8)


def _owner() -> dict:
  # The token makes every holder's lock unique, so a retried write can tell its own landed
  # attempt from another holder's.
  return {"host": socket.gethostname(), "pid": str(os.getpid()),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "token": uuid.uuid4().hex}


def _describe(owner: dict) -> str:
  return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since "
          f"{owner.get('started', '?')}")


def _in_use(flag: str, directory: str, owner: dict, lock_path: str) -> errors.ConfigError:
  what = "checkpoints" if flag == "--checkpoint_dir" else "checkpoints and outputs"
  return errors.ConfigError(
      f"{flag}={directory} is in use by another run ({_describe(owner)}; lock {lock_path}). "
      f"Two runs writing one {flag[2:]} would overwrite each other's {what}: wait for that run "
      f"to finish, stop it, or use another {flag}.")


def _lost(flag: str, directory: str, lock_path: str, why: str) -> errors.ConfigError:
  return errors.ConfigError(
      f"Lost the lock {lock_path} of {flag}={directory}: {why}. Another run may be writing "
      "there now, so this run stopped before its next write (its checkpoints so far are "
      f"intact). Find out who else uses {flag}={directory}; to go on with this run, stop the "
      "other one and rerun the same command, which resumes from the newest checkpoint.")


def _parse(raw: bytes) -> dict:
  try:
    owner = json.loads(raw.decode("utf-8"))
  except ValueError:
    return {}
  return owner if isinstance(owner, dict) else {}


def _clock() -> float:
  """Seconds on a clock that also runs while the system is suspended (CLOCK_BOOTTIME, see
  clock_gettime(2)); CLOCK_MONOTONIC stops then, and a lease must count that time."""
  if hasattr(time, "CLOCK_BOOTTIME"):
    return time.clock_gettime(time.CLOCK_BOOTTIME)
  return time.monotonic()


class _FileLock:
  """flock on DIR/.trainer-lock; the file's content names the owner for others' messages.

  A deleted or replaced lock file frees the path for a newcomer while this process still holds
  the flock of the old inode, so check() compares the path's inode with the one locked and
  declares the lock lost when they differ.
  """

  def __init__(self, path: str, directory: str, flag: str):
    self.path = path
    self._directory = directory
    self._flag = flag
    self._file = None
    self._lost = ""

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
        raise _in_use(self._flag, self._directory, owner, self.path) from None
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

  def check(self) -> None:
    if not self._lost and self._file is not None:
      try:
        replaced = os.stat(self.path)
      except FileNotFoundError:
        self._lose("the lock file was deleted while this run held it, which let any other run "
                   "take it")
      else:
        mine = os.fstat(self._file.fileno())
        if (replaced.st_dev, replaced.st_ino) != (mine.st_dev, mine.st_ino):
          owner = _parse(_read_quietly(self.path))
          self._lose(f"the lock file was replaced while this run held it (it now names "
                     f"{_describe(owner)})")
    if self._lost:
      raise _lost(self._flag, self._directory, self.path, self._lost)

  verify = check  # the file system answers at once: nothing more to confirm

  def _lose(self, why: str) -> None:
    self._lost = why
    logging.error("Lost %s: %s; stopping before the next write.", self.path, why)

  def release(self) -> None:
    fencing.drop(self)
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
    here = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(f.fileno())
  return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _read_quietly(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(4096)
  except OSError:
    return b""


def _gcs():
  """trainer/storage/gcs.py, imported by the first bucket lock: local runs never load the Google
  libraries."""
  from trainer.storage import gcs  # pylint: disable=import-outside-toplevel
  return gcs


class _BucketLock:
  """An empty lock object named by its owner's custom metadata, kept by metadata renewals.

  Protocol (GCS request preconditions: cloud.google.com/storage/docs/request-preconditions;
  generation and metageneration as python-storage docs/generation_metageneration.rst defines
  them: an upload makes a new generation, a metadata update a new metageneration of it):
  - create with ifGenerationMatch=0; the generation G then names this holding;
  - renew every heartbeat by a metadata update under ifGenerationMatch=G and
    ifMetagenerationMatch=M: it fails once anyone else wrote the object;
  - a newcomer that sees (generation, metageneration) unchanged for the stale window writes a
    new object under ifGenerationMatch and ifMetagenerationMatch of what it saw, so a renewal
    that lands first, however late, makes the takeover fail instead of racing it;
  - every upload of the holder is a compose that lists this object, with ifGenerationMatch=G,
    as a source (trainer/storage/gcs.py): the object is empty, so it adds no byte, and a
    takeover makes the upload fail on the storage side;
  - release deletes it under ifGenerationMatch=G.
  """

  def __init__(self, path: str, directory: str, flag: str):
    self.path = path
    self.bucket, self.object_name = storage.split_gcs(path)
    self._directory = directory
    self._flag = flag
    self._mine = _owner()
    self._beat = 0
    self._state = threading.Lock()
    self._generation = self._metageneration = None
    self._confirmed_at = 0.0  # _clock() when a request that found the lock ours was sent
    self._lost = ""
    self._stop = threading.Event()
    self._thread = None
    self._stale, self._heartbeat_s, self._poll_s = windows()

  @property
  def generation(self) -> int:
    return self._generation

  def staging_name(self) -> str:
    """A fresh object name next to the lock, for an upload that a compose then publishes."""
    return f"{self.object_name}.staging-{uuid.uuid4().hex}"

  def acquire(self) -> None:
    gcs = _gcs()
    sent = _clock()
    created = gcs.create_marker(self.path, self._metadata(), 0)
    if created:
      self._hold(created, sent)
      return
    seen = gcs.stat_marker(self.path)
    owner = self._owner_of(seen)
    changed_at = time.monotonic()
    logging.warning("%s is held by %s; waiting up to %.0fs for it to be released or go stale.",
                    self.path, _describe(owner), self._stale)
    while True:
      if seen is None:  # released meanwhile
        sent = _clock()
        created = gcs.create_marker(self.path, self._metadata(), 0)
        if created:
          self._hold(created, sent)
          return
        raise _in_use(self._flag, self._directory, self._owner_of(gcs.stat_marker(self.path)),
                      self.path)
      if time.monotonic() >= changed_at + self._stale:
        break
      time.sleep(self._poll_s)
      now = gcs.stat_marker(self.path)
      if now is not None and _version(now) != _version(seen):
        # The owner is alive: it renewed the lock (or another newcomer took it).
        raise _in_use(self._flag, self._directory, self._owner_of(now), self.path)
      seen = now
    sent = _clock()
    created = gcs.create_marker(self.path, self._metadata(), *_version(seen))
    if created:
      logging.warning("Took over %s: its owner (%s) did not renew it for %.0fs.", self.path,
                      _describe(owner), self._stale)
      self._hold(created, sent)
      return
    raise _in_use(self._flag, self._directory, self._owner_of(gcs.stat_marker(self.path)),
                  self.path)

  def check(self) -> None:
    """Raises once the lock is known lost; confirms it on storage after a missed renewal."""
    with self._state:
      lost, confirmed_at = self._lost, self._confirmed_at
    if lost:
      raise _lost(self._flag, self._directory, self.path, lost)
    # Nobody takes the lock over before the stale window has passed since our last renewal
    # was sent; when two heartbeats went by without one (a paused process, an outage), ask
    # the bucket before writing.
    if _clock() - confirmed_at > 2 * self._heartbeat_s:
      self.verify()

  def verify(self) -> None:
    """Reads the lock object's generation: ours, or ConfigError."""
    with self._state:
      lost = self._lost
    if not lost:
      sent = _clock()
      now = _gcs().stat_marker(self.path)
      why = self._taken(now) if now is None or now.generation != self._generation else ""
      with self._state:
        if why:
          self._lose(why)
        else:
          self._confirmed_at = max(self._confirmed_at, sent)
        lost = self._lost
    if lost:
      raise _lost(self._flag, self._directory, self.path, lost)

  def release(self) -> None:
    fencing.drop(self)
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=self._heartbeat_s + 5)
      self._thread = None
    if self._generation is not None and not self._lost:
      _gcs().delete_marker(self.path, self._generation)
    self._generation = None

  def _metadata(self) -> dict:
    return {**self._mine, "beat": str(self._beat)}

  def _owner_of(self, blob) -> dict:
    """The owner named by the lock object's metadata, or by its JSON content (older trainers)."""
    if blob is None:
      return {}
    if blob.metadata:
      return dict(blob.metadata)
    try:
      return _parse(storage.read_bytes(self.path))
    except FileNotFoundError:
      return {}

  def _hold(self, created, sent: float) -> None:
    self._generation, self._metageneration = created
    self._confirmed_at = sent
    _gcs().delete_staged(self.bucket, f"{self.object_name}.staging-")
    self._thread = threading.Thread(target=self._renew, name="lock-heartbeat", daemon=True)
    self._thread.start()

  def _lose(self, why: str) -> None:
    # Called with self._state held; the first reason stays.
    if not self._lost:
      self._lost = why
      logging.error("Lost %s: %s; this run stops before its next write.", self.path, why)

  def _renew(self) -> None:
    gcs = _gcs()
    while not self._stop.wait(self._heartbeat_s):
      self._beat += 1
      sent = _clock()
      try:
        renewed = gcs.patch_marker(self.path, self._metadata(), self._generation,
                                   self._metageneration)
      except errors.TrainerError as e:  # a storage outage: try again at the next beat
        logging.warning("Could not renew %s: %s", self.path, e)
        continue
      why = self._taken(self._stat_quietly()) if renewed is None else ""
      with self._state:
        if why:
          self._lose(why)
          return
        self._metageneration = renewed
        self._confirmed_at = max(self._confirmed_at, sent)

  def _taken(self, blob) -> str:
    """Why the lock object `blob` (None: gone) is no longer this run's."""
    if blob is None:
      return "the lock object was deleted while this run held it"
    if blob is False:
      return "another run wrote it (its renewal was refused)"
    return (f"another run took it over ({_describe(self._owner_of(blob))}) after this run had "
            f"not renewed it for {self._stale:.0f}s (paused, or cut off from the bucket)")

  def _stat_quietly(self):
    """The lock object, None when gone, False when the bucket cannot say now."""
    try:
      return _gcs().stat_marker(self.path)
    except errors.TrainerError:
      return False


def _version(blob) -> tuple:
  return blob.generation, blob.metageneration

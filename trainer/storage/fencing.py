"""The run locks this process holds, asked before every write to the directories they guard.

A chief holds locks (trainer/storage/lock.py) on model_dir and on the checkpoint dir. A lock can be
lost while the run goes on: its local lock file deleted or replaced, or its bucket lock object
taken over by another run after this one stopped renewing it (a paused process, a stopped VM,
a partition). From then on the run must not write another byte there. So every writer asks
here first, and a lost lock raises ConfigError (exit 2, README "Exit codes") before the write:

- check(): cheap (a stat, and what the heartbeat and the lease already know), before each
  checkpoint save and each publish, local or gs://;
- verify(): check() plus one storage round trip per bucket lock, before a gs:// delete (GCS
  has no precondition on another object for deletes) and a gs:// upload into a bucket that
  holds none of our locks;
- bucket_fences(bucket): the held locks in that bucket, which trainer/storage/gcs.py makes the
  upload's condition on the storage side (a compose whose sources include the lock objects,
  each under ifGenerationMatch), so that a lock taken over between the check and the upload
  fails the write instead of letting it land.

This module knows only the interface of a lock: check(), verify(), and for bucket locks
bucket, object_name, generation and staging_name(). It imports nothing else of the trainer's,
so the storage layer can ask it without an import circle.
"""

import threading

_held = []
_guard = threading.Lock()


def hold(lock) -> None:
  """Registers a lock this process now holds."""
  with _guard:
    _held.append(lock)


def drop(lock) -> None:
  """Forgets a released lock (a lock not held is ignored)."""
  with _guard:
    if lock in _held:
      _held.remove(lock)


def held() -> list:
  with _guard:
    return list(_held)


def check() -> None:
  """Raises ConfigError when a held lock is known to be lost; no storage request."""
  for lock in held():
    lock.check()


def verify() -> None:
  """check(), then each bucket lock confirmed on the storage side (one metadata read each)."""
  for lock in held():
    lock.verify()


def bucket_fences(bucket: str) -> list:
  """The held locks whose objects lie in gs://bucket, each checked: the conditions of an upload
  into that bucket on the storage side. Raises ConfigError when one is known to be lost."""
  found = [lock for lock in held() if getattr(lock, "bucket", None) == bucket]
  for lock in found:
    lock.check()
  return found

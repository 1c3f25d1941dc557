"""Local files that several processes may prepare at once: a lock per job, a temporary folder per
attempt, and one rename onto the target, so nothing half-made is ever read.

Every preparation here (a TFDS dataset, an MNIST download, a staged copy of a gs:// folder, an
image folder) writes into a temporary folder named PREFIX + random beside its target, under a
lock in the target's parent, and renames it into place when complete; the next preparation
removes what a killed one left (remove_partials).
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time

from trainer import errors

# A dead process's flock is released by the kernel, so a wait only outlasts a live holder.
LOCK_TIMEOUT_S = 1800.0


@contextlib.contextmanager
def lock(directory: str, name: str, timeout_s: float = LOCK_TIMEOUT_S):
  """Serializes preparation between processes sharing one directory (local cluster workers);
  DataError naming the lock file when a live holder keeps it longer than timeout_s."""
  path = os.path.join(directory, f".{name}.lock")
  with open(path, "w") as f:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          raise errors.DataError(
              f"Another process has held {path} for {timeout_s:.0f} s while preparing data: let "
              "it finish, or stop it and run again.") from None
        time.sleep(0.2)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def remove_partials(directory: str, prefix: str) -> None:
  """Deletes the temporary folders of interrupted preparations (names starting with prefix); the
  caller holds the lock, so none is live."""
  for name in os.listdir(directory):
    if name.startswith(prefix):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def replace_dir(partial: str, target: str, prefix: str, marker: str = "",
                source: str = "") -> None:
  """Renames the complete `partial` onto `target`; an incomplete old target is moved aside first
  (one atomic rename), so an interruption never leaves a half-deleted target in place. With a
  marker, the file has_marker() reads is written into partial last, naming source."""
  if marker:
    with open(os.path.join(partial, marker), "w") as f:
      f.write(source)
  if os.path.lexists(target):
    parent = os.path.dirname(target)
    old = os.path.join(parent, f"{prefix}old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(target, old)
    shutil.rmtree(old, ignore_errors=True)
  os.rename(partial, target)


def has_marker(directory: str, marker: str, source: str) -> bool:
  """Whether directory is a finished copy of source: its marker file, written last, names it."""
  try:
    with open(os.path.join(directory, marker)) as f:
      return f.read() == source
  except OSError:
    return False


def check_writable(data_dir: str) -> None:
  """DataError naming --data_dir when a preparation could not write into it."""
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise errors.DataError(f"--data_dir={data_dir} is not writable ({e.strerror}): choose a "
                           "directory you can write to.") from None


def sha256(path: str) -> str:
  """The file's SHA-256, hex, read a megabyte at a time."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()

"""The one interface storage offers over local paths and gs:// alike; trainer/storage/__init__.py
picks the backend from the path (trainer/storage/local.py or trainer/storage/bucket.py).

Paths are the caller's strings (a local path, or gs://bucket/name); directory listings use "/"
in relative paths on both backends. A bucket has no directories: an object name with "/" in it
makes every prefix a "directory", which the local backend matches where callers could tell
(a missing directory lists as empty, makedirs is needed only locally).
"""

import abc


class Backend(abc.ABC):
  """Files, directories and probes on one kind of storage; the contract both backends keep."""

  @abc.abstractmethod
  def exists(self, path: str) -> bool:
    """True for an existing file or directory (gs://: an object, or anything under path/)."""

  @abc.abstractmethod
  def isdir(self, path: str) -> bool:
    """True for a directory (gs://: anything under path/)."""

  @abc.abstractmethod
  def is_file(self, path: str) -> bool:
    """True for a file (gs://: an object of exactly that name)."""

  @abc.abstractmethod
  def read_bytes(self, path: str) -> bytes:
    """The file's contents; FileNotFoundError when it does not exist."""

  @abc.abstractmethod
  def write_bytes(self, path: str, data: bytes) -> None:
    """Replaces path with data, whole or not at all (local: one rename; gs://: an upload under
    a generation precondition)."""

  @abc.abstractmethod
  def put_file(self, local_src: str, path: str) -> None:
    """Copies the local file local_src to path, whole or not at all."""

  @abc.abstractmethod
  def get_file(self, path: str, local_dst: str) -> None:
    """Copies path to the local file local_dst, atomically."""

  @abc.abstractmethod
  def listdir(self, path: str) -> list:
    """Sorted names of path's immediate children; a missing directory lists as empty."""

  @abc.abstractmethod
  def files(self, directory: str) -> dict:
    """{relative path ("/"-separated): size} of every file under directory; {} when missing."""

  @abc.abstractmethod
  def makedirs(self, path: str) -> None:
    """Creates the directory and its parents where the storage has directories."""

  @abc.abstractmethod
  def remove(self, path: str) -> None:
    """Deletes one file; FileNotFoundError when it does not exist."""

  @abc.abstractmethod
  def rmtree(self, path: str) -> None:
    """Deletes a directory and everything in it; a missing one is fine."""

  @abc.abstractmethod
  def preflight(self, path: str) -> None:
    """Fails fast (StorageError, or ConfigError for a bad environment) with the fix in the
    message when path cannot hold the job's artifacts; leaves nothing behind."""

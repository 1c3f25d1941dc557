"""Artifacts on local paths and gs:// alike: files, directories, completion markers, preflight.

One interface (trainer/storage/backend.py), two backends: trainer/storage/local.py for local
paths and trainer/storage/bucket.py for gs://, the latter over the bucket transport
(trainer/storage/gcs.py: client, retries, error mapping; nothing else here talks HTTP). The path
picks the backend, in _backend() and nowhere else; what is written in terms of the interface
(markers, directory copies, JSON) lives here once for both.
"""

import json
import logging
import os

from trainer import errors
from trainer.storage import backend, local
# Re-exported so that callers need only this module: path strings, the local cache, atomic writes.
from trainer.storage.gspath import FLAG, for_flag, is_gcs, join, split_gcs  # noqa: F401
from trainer.storage.local import (CACHE_DIR_ENV, atomic_write_local, cache_root,  # noqa: F401
                                   check_cache_writable, is_partial_of, remove_partials)

_LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- files


def exists(path: str) -> bool:
  """True for an existing file or directory; for gs://, an object or anything under path/."""
  return _backend(path).exists(path)


def isdir(path: str) -> bool:
  return _backend(path).isdir(path)


def read_bytes(path: str) -> bytes:
  """The file's contents; FileNotFoundError when it does not exist (local and gs:// alike)."""
  return _backend(path).read_bytes(path)


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: str, default):
  """The JSON in path; `default` when it is missing, or unreadable (logged: never fatal)."""
  try:
    return json.loads(read_text(path))
  except FileNotFoundError:
    return default
  except (ValueError, UnicodeDecodeError):
    _LOG.warning("%s is unreadable; starting afresh.", path)
    return default


def write_bytes(path: str, data: bytes) -> None:
  """Replaces path with data: atomically for local paths, under a generation check for gs://."""
  _backend(path).write_bytes(path, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def listdir(path: str) -> list[str]:
  """Sorted names of path's immediate children; a missing directory lists as empty.

  GCS has no directories, so "missing" and "empty" cannot differ there; local paths follow suit
  so that callers need no branches.
  """
  return _backend(path).listdir(path)


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; GCS needs none."""
  _backend(path).makedirs(path)


def remove(path: str) -> None:
  """Deletes one file; FileNotFoundError when it does not exist."""
  _backend(path).remove(path)


def rmtree(path: str) -> None:
  """Deletes a directory and everything in it; a missing one is fine (never a bucket's root)."""
  _backend(path).rmtree(path)


# --------------------------------------------------------------------------- directories


def upload_dir(local_dir: str, remote_dir: str, marker: str | None = None,
               names=None) -> list[str]:
  """Copies every file under local_dir to remote_dir (local or gs://); returns relative paths.

  With a marker name, any old marker goes first and the new one (a JSON manifest) is written
  only after every other file succeeded, so a reader that sees it sees a complete directory.
  `names`, when given, limits the upload to those relative paths.
  """
  if not os.path.isdir(local_dir):
    raise FileNotFoundError(local_dir)
  files = [rel for rel in local.relative_files(local_dir)
           if rel != marker and (names is None or rel in names)]
  target = _backend(remote_dir)
  if marker:
    _remove_if_exists(join(remote_dir, marker))
  sizes = {}
  for rel in files:
    src = os.path.join(local_dir, *rel.split("/"))
    sizes[rel] = os.path.getsize(src)
    target.put_file(src, join(remote_dir, *rel.split("/")))
  if marker:
    manifest = {"files": [{"path": rel, "size": sizes[rel]} for rel in files]}
    write_text(join(remote_dir, marker), json.dumps(manifest, indent=1, sort_keys=True))
  _LOG.info("uploaded %d files from %s to %s", len(files), local_dir, remote_dir)
  return files


def download_dir(remote_dir: str, local_dir: str, marker: str | None = None,
                 keep=None) -> list[str]:
  """Copies every file under remote_dir (local or gs://) into local_dir; returns relative paths.

  With a marker name, a remote_dir without it is refused as incomplete, and the marker is
  fetched last so that an interrupted download never looks complete either. `keep`, when
  given, limits the download to the relative paths for which keep(path) is true.
  """
  source = _backend(remote_dir)
  files = sorted(source.files(remote_dir))
  if not files:
    raise FileNotFoundError(f"nothing to download under {remote_dir}")
  if keep is not None:
    files = [rel for rel in files if rel == marker or keep(rel)]
  if marker:
    if marker not in files:
      raise FileNotFoundError(f"{remote_dir} has no {marker}: its upload did not finish")
    files = [rel for rel in files if rel != marker] + [marker]
  os.makedirs(local_dir, exist_ok=True)
  for rel in files:
    source.get_file(join(remote_dir, *rel.split("/")), _safe_local_path(local_dir, rel))
  _LOG.info("downloaded %d files from %s to %s", len(files), remote_dir, local_dir)
  return files


def is_complete(directory: str, marker: str, verify_files: bool = False) -> bool:
  """True when directory's marker exists (and with verify_files, its listed files match sizes)."""
  marker_path = join(directory, marker)
  if not verify_files:
    return _backend(marker_path).is_file(marker_path)
  try:
    manifest = json.loads(read_text(marker_path))
  except FileNotFoundError:
    return False
  except ValueError:
    _LOG.warning("unreadable marker %s: treating %s as incomplete", marker, directory)
    return False
  actual = _backend(directory).files(directory)
  return all(actual.get(entry["path"]) == entry["size"] for entry in manifest.get("files", []))


def preflight(path: str) -> None:
  """Fails fast, with the fix in the message, when path cannot hold the job's artifacts."""
  _backend(path).preflight(path)


# --------------------------------------------------------------------------- gs:// only


def fetch_file(src: str, dst: str) -> int:
  """Copies the gs:// object src to the local file dst, whole or not at all; returns its size.

  The bytes land under a temporary name next to dst (see remove_partials) and are renamed to
  dst only once their size and CRC32C (MD5 if the object has none) match the object's, so a
  file under dst's name is always complete. FileNotFoundError when src does not exist.
  """
  return _bucket().fetch_file(src, dst)


def differing_copies(remote_dir: str, local_dir: str, rels) -> list:
  """Of the local files local_dir/REL (REL in rels, "/"-separated), those whose size or CRC32C
  differs from the object remote_dir/REL, or whose object is gone: the bucket decides. One
  listing of remote_dir, then a CRC32C pass over each local file (google-crc32c, about 6 GB/s
  here)."""
  return _bucket().differing_copies(remote_dir, local_dir, rels)


def generation(path: str):
  """The gs:// object's generation (changes on every write), or None when it does not exist."""
  return _bucket().generation(path)


def write_if_generation(path: str, data: bytes, expected) -> bool:
  """Writes the gs:// object only if its generation is `expected` (0: absent); False if not."""
  return _bucket().write_if_generation(path, data, expected)


# --------------------------------------------------------------------------- the backends


def _backend(path: str) -> backend.Backend:
  """The one place a path picks its backend."""
  return _bucket() if is_gcs(path) else local.LOCAL


def _bucket():
  """The gs:// backend, imported by the first gs:// path: its transport's google-cloud-storage
  and google-api-core take a quarter of a second to import on their own, which a run on local
  paths never needs. Python's import lock makes a first use from two threads safe."""
  from trainer.storage import bucket  # pylint: disable=import-outside-toplevel
  return bucket.BUCKET


def _remove_if_exists(path: str) -> None:
  try:
    remove(path)
  except FileNotFoundError:
    pass


def _safe_local_path(local_dir: str, rel: str) -> str:
  parts = rel.split("/")
  if any(part in ("", ".", "..") for part in parts):
    raise errors.StorageError(f"refusing to download an object named {rel!r} outside {local_dir}")
  return os.path.join(local_dir, *parts)

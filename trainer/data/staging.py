"""gs:// data inputs read from local copies: a staged copy of a folder's metadata, and the record
files fetched one by one when something is about to read them. The bucket decides: a local copy
that differs from its object is fetched again."""

import hashlib
import logging
import os
import shutil
import tempfile

from trainer import errors
from trainer import storage
from trainer.data import files

# Written last into a staged copy of a gs:// directory; holds the source URI.
STAGED_MARKER = ".staged-from"


def stage(path: str, what: str) -> str:
  """A local copy of a gs:// directory (data inputs are read locally); local paths pass through.

  Under a file lock (workers may share the cache), the copy is downloaded into a temporary
  directory next to it, marked with the source URI last and renamed into place. A directory
  without that marker (an interrupted copy) is downloaded again, never used. Record files are
  left out: fetch_records gets each when something is about to read it (a stream-mode worker
  reads only its own).
  """
  if not storage.is_gcs(path):
    return os.path.expanduser(path)
  storage.check_cache_writable(f"the local copy of {what}={path}")
  local = staged_dir(path)
  parent, key = os.path.split(local)
  os.makedirs(parent, exist_ok=True)
  with files.lock(parent, key):
    if files.has_marker(local, STAGED_MARKER, path):
      return local
    partial_prefix = f".{key}.partial-"
    files.remove_partials(parent, partial_prefix)
    partial = tempfile.mkdtemp(dir=parent, prefix=partial_prefix)
    try:
      try:
        with storage.for_flag(what):  # a missing bucket names this flag, not --model_dir
          storage.download_dir(path, partial, keep=lambda rel: not is_record_file(rel))
      except FileNotFoundError:
        raise errors.DataError(
            f"{what}={path} holds no files: upload the data there first.") from None
      except OSError as e:
        if errors.is_disk_full(e):
          raise _cache_full(path, e) from None
        raise
      files.replace_dir(partial, local, partial_prefix, STAGED_MARKER, path)
    finally:
      shutil.rmtree(partial, ignore_errors=True)  # only after a failure: the rename moved it
  logging.info("Staged %s into %s", path, local)
  return local


def fetch_records(builder, data_dir: str, split: str, indices=None) -> list:
  """Fetches the split's record files (those at `indices`; all when None) from the gs://
  data_dir into its staged copy, where the builder reads them; returns the paths fetched.

  Under a lock per staged copy, each file is downloaded to a temporary name, checked against
  the object and renamed into place (storage.fetch_file): a file under its own name was whole,
  and an interrupted fetch's temporary file is deleted, never read. A cached file is checked
  against its object again (size and CRC32C) and fetched again only when it differs, so a copy
  damaged on this disk is replaced, not reported as damaged data. A disk that fills up is a
  StorageError naming the cache. A local data_dir holds its files already: nothing to do.
  """
  if not storage.is_gcs(data_dir):
    return []
  paths = [str(p) for p in builder.info.splits[split].filepaths]
  wanted = [paths[i] for i in (range(len(paths)) if indices is None else indices)]
  root = staged_dir(data_dir)
  fetched = []
  with files.lock(root, "records"):
    _remove_damaged_copies(data_dir, [p for p in wanted if os.path.isfile(p)])
    for path in wanted:
      if os.path.isfile(path):
        continue  # cached, or fetched by another process while this one waited
      remote = remote_of(data_dir, path)
      storage.remove_partials(path)
      try:
        with storage.for_flag("--data_dir"):
          storage.fetch_file(remote, path)
      except FileNotFoundError:
        raise errors.DataError(
            f"Record file {remote} is missing, though the {builder.name} metadata in "
            f"--data_dir={data_dir} lists it: upload the whole prepared dataset folder again "
            "(`gcloud storage cp -r`), or point --data_dir at a complete copy.") from None
      except OSError as e:
        if errors.is_disk_full(e):
          raise _cache_full(remote, e) from None
        raise
      fetched.append(path)
  logging.info("Fetched %d %s record file(s) from %s (%s); %d of %d are read here.",
               len(fetched), split, data_dir,
               ", ".join(os.path.basename(p) for p in fetched) or "none: cached",
               len(wanted), len(paths))
  return fetched


def staged_dir(path: str) -> str:
  """Where stage() keeps its local copy of the gs:// directory `path`."""
  cache = storage.cache_root()
  return os.path.join(cache, "staged", hashlib.sha256(path.encode()).hexdigest()[:16])


def remote_of(data_dir: str, path: str) -> str:
  """The gs:// object of the file `path` of the gs:// data_dir's staged copy (the same relative
  path: the staged copy mirrors data_dir)."""
  return storage.join(data_dir, *os.path.relpath(path, staged_dir(data_dir)).split(os.sep))


def is_record_file(path: str) -> bool:
  """A TFDS record file (a split's examples), as opposed to the metadata next to it."""
  name = os.path.basename(path)
  return ".tfrecord" in name or ".array_record" in name


def _remove_damaged_copies(data_dir: str, cached: list) -> None:
  """Deletes the cached copies of gs:// record files that differ from their objects (a disk's
  damage, a person's edit), with a warning each, so that they are fetched again: the bucket
  decides. Costs one listing and a CRC32C pass over the cached files (fetched files were
  checked as they came). The caller holds the records lock."""
  if not cached:
    return
  folder = os.path.dirname(cached[0])  # a split's files lie in one folder
  with storage.for_flag("--data_dir"):
    differing = storage.differing_copies(remote_of(data_dir, folder), folder,
                                         [os.path.basename(p) for p in cached])
  for name in differing:
    path = os.path.join(folder, name)
    logging.warning("The local copy %s of %s differs from the bucket's object (size or CRC32C): "
                    "damaged on this disk; fetching it again.", path, remote_of(data_dir, path))
    os.remove(path)


def _cache_full(remote: str, error: OSError) -> errors.StorageError:
  return errors.StorageError(
      f"No space left on the device of the local cache {storage.cache_root()} "
      f"(${storage.CACHE_DIR_ENV}) while copying {remote} into it ({error.filename or ''}). "
      f"gs:// data is read from local copies there: free space on that disk, or set "
      f"{storage.CACHE_DIR_ENV} to a folder on a disk with room for the dataset, then rerun the "
      "same command.")

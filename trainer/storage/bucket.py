"""gs:// paths: the storage backend over the bucket transport (trainer/storage/gcs.py).

Imported by the first gs:// path only (trainer/storage/__init__.py), since the transport loads
the Google libraries. Every request goes through the transport's retries, and its permanent
errors become StorageError naming the bucket and the fix (gcs.errors_of).
"""

import contextlib
import io
import logging
import os
import uuid

from trainer import errors
from trainer.storage import backend
from trainer.storage import gcs
from trainer.storage import local
from trainer.storage.gspath import FLAG, split_gcs

_LOG = logging.getLogger(__name__)


class Bucket(backend.Backend):
  """Objects in Google Cloud Storage, seen as files and directories; see backend.Backend, plus
  the operations only a bucket has (generations, checksummed fetches)."""

  def exists(self, path: str) -> bool:
    bucket, name = split_gcs(path)
    with gcs.errors_of(path):
      if name.rstrip("/") and gcs.get_blob(bucket, name.rstrip("/")) is not None:
        return True
      return gcs.has_children(bucket, name)

  def isdir(self, path: str) -> bool:
    bucket, name = split_gcs(path)
    with gcs.errors_of(path):
      return gcs.has_children(bucket, name)

  def is_file(self, path: str) -> bool:
    with gcs.errors_of(path):
      return gcs.get_blob(*split_gcs(path)) is not None

  def read_bytes(self, path: str) -> bytes:
    with gcs.errors_of(path):
      return gcs.download_bytes(*split_gcs(path))

  def write_bytes(self, path: str, data: bytes) -> None:
    data = bytes(data)
    with gcs.errors_of(path):
      gcs.upload(path, lambda: io.BytesIO(data), len(data), gcs.crc32c_bytes(data))

  def put_file(self, local_src: str, path: str) -> None:
    with gcs.errors_of(path):
      gcs.upload(path, lambda: open(local_src, "rb"), os.path.getsize(local_src),
                 gcs.crc32c_file(local_src))

  def get_file(self, path: str, local_dst: str) -> None:
    bucket, name = split_gcs(path)
    with gcs.errors_of(path):
      local.atomic_write_local(local_dst, lambda f: gcs.download_into(bucket, name, f))

  def listdir(self, path: str) -> list:
    bucket, name = split_gcs(path)
    prefix = gcs.dir_prefix(name)
    with gcs.errors_of(path):
      blobs, prefixes = gcs.list_objects(bucket, prefix, delimiter="/")
    names = [b.name[len(prefix):] for b in blobs if b.name != prefix]
    names += [p[len(prefix):].rstrip("/") for p in prefixes]
    return sorted(set(names))

  def files(self, directory: str) -> dict:
    bucket, name = split_gcs(directory)
    prefix = gcs.dir_prefix(name)
    with gcs.errors_of(directory):
      blobs, _ = gcs.list_objects(bucket, prefix)
    # Names ending in "/" are folder placeholders that consoles create, not files.
    return {b.name[len(prefix):]: b.size for b in blobs if not b.name.endswith("/")}

  def makedirs(self, path: str) -> None:
    """A bucket has no directories: nothing to create."""

  def remove(self, path: str) -> None:
    bucket, name = split_gcs(path)
    with gcs.errors_of(path):
      gcs.delete_blob(bucket, name, missing_ok=False)

  def rmtree(self, path: str) -> None:
    bucket, name = split_gcs(path)
    if not name.strip("/"):
      raise errors.ConfigError(f"refusing to delete every object in gs://{bucket}")
    with gcs.errors_of(path):
      blobs, _ = gcs.list_objects(bucket, gcs.dir_prefix(name))
      for blob in blobs:
        gcs.delete_blob(bucket, blob.name, missing_ok=True)
    _LOG.debug("deleted %d objects under %s", len(blobs), path)

  def preflight(self, path: str) -> None:
    # TensorFlow writes a gs:// output into a local mirror first: that needs a writable cache.
    local.check_cache_writable(f"the local mirror of {FLAG.get()}={path}")
    bucket, name = split_gcs(path)
    probe = gcs.uri(bucket, gcs.dir_prefix(name) + f".preflight-{uuid.uuid4().hex}")
    data = b"preflight\n"
    with gcs.errors_of(path):
      try:
        # A fresh name needs no generation lookup: 0 means "must not exist yet".
        gcs.upload(probe, lambda: io.BytesIO(data), len(data), gcs.crc32c_bytes(data),
                   generation=0)
      except BaseException:
        # An upload that failed late may still have landed: never leave the probe behind.
        with contextlib.suppress(Exception):
          gcs.delete_blob(*split_gcs(probe), missing_ok=True)
        raise
      gcs.delete_blob(*split_gcs(probe), missing_ok=True)
    _LOG.info("preflight: %s is writable", path)

  # ------------------------------------------------------------- what only a bucket has

  def fetch_file(self, path: str, local_dst: str) -> int:
    """See trainer.storage.fetch_file."""
    bucket, name = split_gcs(path)
    with gcs.errors_of(path):
      blob = gcs.get_blob(bucket, name)
      if blob is None:
        raise FileNotFoundError(path)

      def write(f):
        gcs.download_into(bucket, name, f)
        f.flush()
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        kind, expected = ("crc32c", blob.crc32c) if blob.crc32c else ("md5", blob.md5_hash)
        actual = gcs.checksum_of(f, kind) if expected else None
        if size != blob.size or actual != expected:
          raise errors.StorageError(
              f"{path} changed while it was downloaded ({size} bytes, {kind} {actual}; the "
              f"object has {blob.size} bytes, {kind} {expected}): is it being rewritten? Rerun "
              f"once its upload has finished.")

      local.atomic_write_local(local_dst, write)
    return blob.size

  def differing_copies(self, directory: str, local_dir: str, rels) -> list:
    """See trainer.storage.differing_copies."""
    bucket, name = split_gcs(directory)
    prefix = gcs.dir_prefix(name)
    with gcs.errors_of(directory):
      blobs, _ = gcs.list_objects(bucket, prefix)
    objects = {b.name[len(prefix):]: b for b in blobs}
    differing = []
    for rel in rels:
      blob = objects.get(rel)
      copy = os.path.join(local_dir, *rel.split("/"))
      if blob is None or os.path.getsize(copy) != blob.size or (
          blob.crc32c and gcs.crc32c_file(copy) != blob.crc32c):
        differing.append(rel)
    return differing

  def generation(self, path: str):
    """The object's generation (changes on every write), or None when it does not exist."""
    bucket, name = split_gcs(path)
    with gcs.errors_of(path):
      blob = gcs.get_blob(bucket, name)
    return None if blob is None else blob.generation

  def write_if_generation(self, path: str, data: bytes, expected) -> bool:
    """Writes the object only if its generation is `expected` (0: absent); False if not."""
    data = bytes(data)
    try:
      with gcs.errors_of(path):
        gcs.upload(path, lambda: io.BytesIO(data), len(data), gcs.crc32c_bytes(data),
                   generation=expected)
    except errors.StorageError:
      if self.generation(path) == expected:
        raise
      return False
    return True


BUCKET = Bucket()

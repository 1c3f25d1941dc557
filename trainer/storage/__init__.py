"""Artifacts on local paths and gs:// alike: files, directories, completion markers, preflight.

The bucket transport (client, retries, error mapping) is trainer/storage/gcs.py; nothing here talks HTTP.
"""

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid

from trainer import errors
# Path helpers callers use, re-exported so callers need only this module.
from trainer.storage.gspath import FLAG, for_flag, is_gcs, join, split_gcs  # noqa: F401  (re-exported)

_LOG = logging.getLogger(__name__)
CACHE_DIR_ENV = "TRAINER_CACHE_DIR"
_COPY_BUFFER = 1 << 20


def _gcs():
  """The bucket transport (trainer/storage/gcs.py), imported by the first gs:// path: google-cloud-storage
  and google-api-core take a quarter of a second to import on their own, which a run on local
  paths never needs. Python's import lock makes a first use from two threads safe."""
  from trainer.storage import gcs  # pylint: disable=import-outside-toplevel
  return gcs


def cache_root(environ=None) -> str:
  """Where local mirrors of gs:// outputs and staged gs:// inputs live ($TRAINER_CACHE_DIR)."""
  environ = os.environ if environ is None else environ
  return environ.get(CACHE_DIR_ENV) or os.path.expanduser("~/.cache/mnist-trainer")


def check_cache_writable(what: str, environ=None) -> str:
  """cache_root(), created if need be; ConfigError (a bad environment, exit 2) naming it, what
  needs it and the fix when a file cannot be created in it (read-only, not a folder)."""
  root = cache_root(environ)
  try:
    os.makedirs(root, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
      pass
  except OSError as e:
    raise errors.ConfigError(
        f"The local cache {root} (${CACHE_DIR_ENV}, default ~/.cache/mnist-trainer) is not "
        f"writable ({e.strerror or e}), and {what} is kept there: set {CACHE_DIR_ENV} to a "
        "writable folder on a local disk with room for it.") from None
  return root


# --------------------------------------------------------------------------- local primitives


def _fsync_dir(path: str) -> None:
  # The rename itself is only durable once the directory entry is on disk.
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write_local(path: str, write_fn) -> None:
  """write_fn(f) fills a temp file next to path (named by is_partial_of) that then replaces
  path in one rename; if write_fn raises, the temp file is removed and the error goes on."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    # mkstemp's 0600 would hide exports from a serving process running as another user.
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w+b") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    if _names_no_file(e):
      # A write's error (ENOSPC, EIO) names no file: name the one being written, so that a
      # full disk is reported where it is, not at some other output folder.
      raise OSError(e.errno, e.strerror, path) from e
    raise
  _fsync_dir(parent)


def _names_no_file(e: BaseException) -> bool:
  """An operating system error without a file name (a library's OSError subclass is left as
  it is: only the type Python itself gives that errno)."""
  return (isinstance(e, OSError) and e.errno is not None and e.filename is None
          and type(e) is type(OSError(e.errno, "")))


def is_partial_of(name: str, target_name: str) -> bool:
  """Whether file `name` is atomic_write_local's temp file for a file called target_name."""
  return name.startswith(f".{target_name}.") and name.endswith(".tmp")


def _copy_local(src: str, dst: str) -> None:
  with open(src, "rb") as source:
    atomic_write_local(dst, lambda f: shutil.copyfileobj(source, f, _COPY_BUFFER))


def _local_files(root: str) -> list[str]:
  """Relative paths (with "/") of every file under root, sorted."""
  found = []
  for dirpath, _, filenames in os.walk(root):
    for filename in filenames:
      rel = os.path.relpath(os.path.join(dirpath, filename), root)
      found.append(rel.replace(os.sep, "/"))
  return sorted(found)


# --------------------------------------------------------------------------- files


def exists(path: str) -> bool:
  """True for an existing file or directory; for gs://, an object or anything under path/."""
  if not is_gcs(path):
    return os.path.exists(path)
  bucket, name = split_gcs(path)
  gcs = _gcs()
  with gcs.errors_of(path):
    if name.rstrip("/") and gcs.get_blob(bucket, name.rstrip("/")) is not None:
      return True
    return gcs.has_children(bucket, name)


def isdir(path: str) -> bool:
  if not is_gcs(path):
    return os.path.isdir(path)
  bucket, name = split_gcs(path)
  gcs = _gcs()
  with gcs.errors_of(path):
    return gcs.has_children(bucket, name)


def read_bytes(path: str) -> bytes:
  """The file's contents; FileNotFoundError when it does not exist (local and gs:// alike)."""
  if not is_gcs(path):
    with open(path, "rb") as f:
      return f.read()
  gcs = _gcs()
  with gcs.errors_of(path):
    return gcs.download_bytes(*split_gcs(path))


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
  if not is_gcs(path):
    atomic_write_local(path, lambda f: f.write(data))
    return
  data = bytes(data)
  gcs = _gcs()
  with gcs.errors_of(path):
    gcs.upload(path, lambda: io.BytesIO(data), len(data), gcs.crc32c_bytes(data))


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def _put_file(src: str, dst: str) -> None:
  """Copies the local file src to dst (local or gs://)."""
  if not is_gcs(dst):
    _copy_local(src, dst)
    return
  gcs = _gcs()
  with gcs.errors_of(dst):
    gcs.upload(dst, lambda: open(src, "rb"), os.path.getsize(src), gcs.crc32c_file(src))


def _get_file(src: str, dst: str) -> None:
  """Copies src (local or gs://) to the local file dst, atomically."""
  if not is_gcs(src):
    _copy_local(src, dst)
    return
  bucket, name = split_gcs(src)
  gcs = _gcs()
  with gcs.errors_of(src):
    atomic_write_local(dst, lambda f: gcs.download_into(bucket, name, f))


def listdir(path: str) -> list[str]:
  """Sorted names of path's immediate children; a missing directory lists as empty.

  GCS has no directories, so "missing" and "empty" cannot differ there; local paths follow suit
  so that callers need no branches.
  """
  if not is_gcs(path):
    try:
      return sorted(os.listdir(path))
    except FileNotFoundError:
      return []
  bucket, name = split_gcs(path)
  gcs = _gcs()
  prefix = gcs.dir_prefix(name)
  with gcs.errors_of(path):
    blobs, prefixes = gcs.list_objects(bucket, prefix, delimiter="/")
  names = [b.name[len(prefix):] for b in blobs if b.name != prefix]
  names += [p[len(prefix):].rstrip("/") for p in prefixes]
  return sorted(set(names))


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; GCS needs none."""
  if not is_gcs(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Deletes one file; FileNotFoundError when it does not exist."""
  if not is_gcs(path):
    os.remove(path)
    return
  bucket, name = split_gcs(path)
  gcs = _gcs()
  with gcs.errors_of(path):
    gcs.delete_blob(bucket, name, missing_ok=False)


def _remove_if_exists(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    remove(path)


def rmtree(path: str) -> None:
  """Deletes a directory and everything in it; a missing one is fine."""
  if not is_gcs(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    return
  bucket, name = split_gcs(path)
  if not name.strip("/"):
    raise errors.ConfigError(f"refusing to delete every object in gs://{bucket}")
  gcs = _gcs()
  with gcs.errors_of(path):
    blobs, _ = gcs.list_objects(bucket, gcs.dir_prefix(name))
    for blob in blobs:
      gcs.delete_blob(bucket, blob.name, missing_ok=True)
  _LOG.debug("deleted %d objects under %s", len(blobs), path)


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
  files = [rel for rel in _local_files(local_dir)
           if rel != marker and (names is None or rel in names)]
  if marker:
    _remove_if_exists(join(remote_dir, marker))
  sizes = {}
  for rel in files:
    src = os.path.join(local_dir, *rel.split("/"))
    sizes[rel] = os.path.getsize(src)
    _put_file(src, join(remote_dir, *rel.split("/")))
  if marker:
    manifest = {"files": [{"path": rel, "size": sizes[rel]} for rel in files]}
    write_text(join(remote_dir, marker), json.dumps(manifest, indent=1, sort_keys=True))
  _LOG.info("uploaded %d files from %s to %s", len(files), local_dir, remote_dir)
  return files


def _remote_files(remote_dir: str) -> dict[str, int]:
  """{relative path: size} of every file under remote_dir (local or gs://)."""
  if not is_gcs(remote_dir):
    if not os.path.isdir(remote_dir):
      return {}
    return {rel: os.path.getsize(os.path.join(remote_dir, *rel.split("/")))
            for rel in _local_files(remote_dir)}
  bucket, name = split_gcs(remote_dir)
  gcs = _gcs()
  prefix = gcs.dir_prefix(name)
  with gcs.errors_of(remote_dir):
    blobs, _ = gcs.list_objects(bucket, prefix)
  # Names ending in "/" are folder placeholders that consoles create, not files.
  return {b.name[len(prefix):]: b.size for b in blobs if not b.name.endswith("/")}


def _safe_local_path(local_dir: str, rel: str) -> str:
  parts = rel.split("/")
  if any(part in ("", ".", "..") for part in parts):
    raise errors.StorageError(f"refusing to download an object named {rel!r} outside {local_dir}")
  return os.path.join(local_dir, *parts)


def download_dir(remote_dir: str, local_dir: str, marker: str | None = None,
                 keep=None) -> list[str]:
  """Copies every file under remote_dir (local or gs://) into local_dir; returns relative paths.

  With a marker name, a remote_dir without it is refused as incomplete, and the marker is
  fetched last so that an interrupted download never looks complete either. `keep`, when
  given, limits the download to the relative paths for which keep(path) is true.
  """
  files = sorted(_remote_files(remote_dir))
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
    _get_file(join(remote_dir, *rel.split("/")), _safe_local_path(local_dir, rel))
  _LOG.info("downloaded %d files from %s to %s", len(files), remote_dir, local_dir)
  return files


def fetch_file(src: str, dst: str) -> int:
  """Copies the gs:// object src to the local file dst, whole or not at all; returns its size.

  The bytes land under a temporary name next to dst (see remove_partials) and are renamed to
  dst only once their size and CRC32C (MD5 if the object has none) match the object's, so a
  file under dst's name is always complete. FileNotFoundError when src does not exist.
  """
  bucket, name = split_gcs(src)
  gcs = _gcs()
  with gcs.errors_of(src):
    blob = gcs.get_blob(bucket, name)
    if blob is None:
      raise FileNotFoundError(src)

    def write(f):
      gcs.download_into(bucket, name, f)
      f.flush()
      size = os.fstat(f.fileno()).st_size
      f.seek(0)
      kind, expected = ("crc32c", blob.crc32c) if blob.crc32c else ("md5", blob.md5_hash)
      actual = gcs.checksum_of(f, kind) if expected else None
      if size != blob.size or actual != expected:
        raise errors.StorageError(
            f"{src} changed while it was downloaded ({size} bytes, {kind} {actual}; the object "
            f"has {blob.size} bytes, {kind} {expected}): is it being rewritten? Rerun once its "
            f"upload has finished.")

    atomic_write_local(dst, write)
  return blob.size


def differing_copies(remote_dir: str, local_dir: str, rels) -> list:
  """Of the local files local_dir/REL (REL in rels, "/"-separated), those whose size or CRC32C
  differs from the object remote_dir/REL, or whose object is gone: the bucket decides. One
  listing of remote_dir, then a CRC32C pass over each local file (google-crc32c, about 6 GB/s
  here)."""
  bucket, name = split_gcs(remote_dir)
  gcs = _gcs()
  prefix = gcs.dir_prefix(name)
  with gcs.errors_of(remote_dir):
    blobs, _ = gcs.list_objects(bucket, prefix)
  objects = {b.name[len(prefix):]: b for b in blobs}
  differing = []
  for rel in rels:
    blob = objects.get(rel)
    local = os.path.join(local_dir, *rel.split("/"))
    if blob is None or os.path.getsize(local) != blob.size or (
        blob.crc32c and gcs.crc32c_file(local) != blob.crc32c):
      differing.append(rel)
  return differing


def remove_partials(path: str) -> int:
  """Deletes the temporary files that interrupted writes of the local `path` left; their count.

  Only safe while no other process writes `path` (callers hold a lock): a live write's file
  would go too.
  """
  parent, base = os.path.split(os.path.abspath(path))
  removed = 0
  for name in os.listdir(parent) if os.path.isdir(parent) else ():
    if name.startswith(f".{base}.") and name.endswith(".tmp"):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(parent, name))
        removed += 1
  return removed


def is_complete(directory: str, marker: str, verify_files: bool = False) -> bool:
  """True when directory's marker exists (and with verify_files, its listed files match sizes)."""
  if not verify_files:
    marker_path = join(directory, marker)
    if not is_gcs(marker_path):
      return os.path.isfile(marker_path)
    gcs = _gcs()
    with gcs.errors_of(marker_path):
      return gcs.get_blob(*split_gcs(marker_path)) is not None
  try:
    manifest = json.loads(read_text(join(directory, marker)))
  except FileNotFoundError:
    return False
  except ValueError:
    _LOG.warning("unreadable marker %s: treating %s as incomplete", marker, directory)
    return False
  actual = _remote_files(directory)
  return all(actual.get(entry["path"]) == entry["size"] for entry in manifest.get("files", []))


# --------------------------------------------------------------------------- preflight


def preflight(path: str) -> None:
  """Fails fast, with the fix in the message, when path cannot hold the job's artifacts."""
  if is_gcs(path):
    _preflight_gcs(path)
  else:
    _preflight_local(path)


def _preflight_gcs(path: str) -> None:
  # TensorFlow writes a gs:// output into a local mirror first: that needs a writable cache.
  check_cache_writable(f"the local mirror of {FLAG.get()}={path}")
  bucket, name = split_gcs(path)
  gcs = _gcs()
  probe = gcs.uri(bucket, gcs.dir_prefix(name) + f".preflight-{uuid.uuid4().hex}")
  data = b"preflight\n"
  with gcs.errors_of(path):
    try:
      # A fresh name needs no generation lookup: 0 means "must not exist yet".
      gcs.upload(probe, lambda: io.BytesIO(data), len(data), gcs.crc32c_bytes(data), generation=0)
    except BaseException:
      # An upload that failed late may still have landed: never leave the probe behind.
      with contextlib.suppress(Exception):
        gcs.delete_blob(*split_gcs(probe), missing_ok=True)
      raise
    gcs.delete_blob(*split_gcs(probe), missing_ok=True)
  _LOG.info("preflight: %s is writable", path)


def _preflight_local(path: str) -> None:
  probe = os.path.join(path, f".preflight-{uuid.uuid4().hex}")
  try:
    os.makedirs(path, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"preflight\n")
    os.remove(probe)
  except OSError as exc:
    raise errors.StorageError(
        f"{path} is not a writable directory ({exc.strerror or exc}): fix {FLAG.get()} or its "
        f"permissions") from exc


# --------------------------------------------------------------------------- generations


def generation(path: str):
  """The gs:// object's generation (changes on every write), or None when it does not exist."""
  bucket, name = split_gcs(path)
  gcs = _gcs()
  with gcs.errors_of(path):
    blob = gcs.get_blob(bucket, name)
  return None if blob is None else blob.generation


def write_if_generation(path: str, data: bytes, expected) -> bool:
  """Writes the gs:// object only if its generation is `expected` (0: absent); False if not."""
  data = bytes(data)
  gcs = _gcs()
  try:
    with gcs.errors_of(path):
      gcs.upload(path, lambda: io.BytesIO(data), len(data), gcs.crc32c_bytes(data), generation=expected)
  except errors.StorageError:
    if generation(path) == expected:
      raise
    return False
  return True

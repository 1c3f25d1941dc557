"""Local paths: the storage backend for them, atomic writes, and the local cache folder."""

import contextlib
import os
import shutil
import tempfile
import uuid

from trainer import errors
from trainer.storage import backend
from trainer.storage.gspath import FLAG

CACHE_DIR_ENV = "TRAINER_CACHE_DIR"
_COPY_BUFFER = 1 << 20


class Local(backend.Backend):
  """Files on a local (or mounted) file system; every write lands whole or not at all."""

  def exists(self, path: str) -> bool:
    return os.path.exists(path)

  def isdir(self, path: str) -> bool:
    return os.path.isdir(path)

  def is_file(self, path: str) -> bool:
    return os.path.isfile(path)

  def read_bytes(self, path: str) -> bytes:
    with open(path, "rb") as f:
      return f.read()

  def write_bytes(self, path: str, data: bytes) -> None:
    atomic_write_local(path, lambda f: f.write(data))

  def put_file(self, local_src: str, path: str) -> None:
    _copy(local_src, path)

  def get_file(self, path: str, local_dst: str) -> None:
    _copy(path, local_dst)

  def listdir(self, path: str) -> list:
    try:
      return sorted(os.listdir(path))
    except FileNotFoundError:
      return []

  def files(self, directory: str) -> dict:
    if not os.path.isdir(directory):
      return {}
    return {rel: os.path.getsize(os.path.join(directory, *rel.split("/")))
            for rel in relative_files(directory)}

  def makedirs(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)

  def remove(self, path: str) -> None:
    os.remove(path)

  def rmtree(self, path: str) -> None:
    if os.path.isdir(path):
      shutil.rmtree(path)

  def preflight(self, path: str) -> None:
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


LOCAL = Local()


# --------------------------------------------------------------------------- atomic writes


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


def is_partial_of(name: str, target_name: str) -> bool:
  """Whether file `name` is atomic_write_local's temp file for a file called target_name."""
  return name.startswith(f".{target_name}.") and name.endswith(".tmp")


def remove_partials(path: str) -> int:
  """Deletes the temporary files that interrupted writes of the local `path` left; their count.

  Only safe while no other process writes `path` (callers hold a lock): a live write's file
  would go too.
  """
  parent, base = os.path.split(os.path.abspath(path))
  removed = 0
  for name in os.listdir(parent) if os.path.isdir(parent) else ():
    if is_partial_of(name, base):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(parent, name))
        removed += 1
  return removed


def relative_files(root: str) -> list:
  """Relative paths (with "/") of every file under the local directory root, sorted."""
  found = []
  for dirpath, _, filenames in os.walk(root):
    for filename in filenames:
      rel = os.path.relpath(os.path.join(dirpath, filename), root)
      found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def _copy(src: str, dst: str) -> None:
  with open(src, "rb") as source:
    atomic_write_local(dst, lambda f: shutil.copyfileobj(source, f, _COPY_BUFFER))


def _fsync_dir(path: str) -> None:
  # The rename itself is only durable once the directory entry is on disk.
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _names_no_file(e: BaseException) -> bool:
  """An operating system error without a file name (a library's OSError subclass is left as
  it is: only the type Python itself gives that errno)."""
  return (isinstance(e, OSError) and e.errno is not None and e.filename is None
          and type(e) is type(OSError(e.errno, "")))


# --------------------------------------------------------------------------- the local cache


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

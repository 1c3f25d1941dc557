"""Artifact I/O for local paths and gs:// URIs alike, with time-bounded retries of GCS errors."""

import base64
import contextlib
import contextvars
import functools
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid

import google_crc32c
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs
from google.cloud.storage import exceptions as gcs_exceptions

from trainer import errors
from trainer import preemption

_LOG = logging.getLogger(__name__)

_SCHEME = "gs://"
EMULATOR_HOST_ENV = "STORAGE_EMULATOR_HOST"
PROJECT_ENV = "GOOGLE_CLOUD_PROJECT"
RETRY_DEADLINE_ENV = "TRAINER_STORAGE_RETRY_DEADLINE_S"
DEFAULT_RETRY_DEADLINE_S = 60.0
DEFAULT_EMULATOR_PROJECT = "test-project"

_INITIAL_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 10.0
# (connect, read) seconds per HTTP request; read is per socket operation, so big files still fit.
_REQUEST_TIMEOUT = (10.0, 120.0)
_COPY_BUFFER = 1 << 20
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_TRANSIENT_TYPES = (
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    http.client.IncompleteRead,
    http.client.BadStatusLine,
    ConnectionError,  # builtin: reset, refused, aborted, broken pipe
    TimeoutError,
    auth_exceptions.TransportError,
    # A transfer whose checksum did not match was corrupted in flight: sending it again is the fix.
    gcs_exceptions.DataCorruption,
)
_JITTER = random.Random()
_URL_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


# --------------------------------------------------------------------------- paths


def is_gcs(path: str) -> bool:
  return str(path).startswith(_SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
  """("bucket", "object/name") of a gs:// URI; the name is "" for the bucket root."""
  if not is_gcs(uri):
    raise errors.ConfigError(f"not a gs:// URI: {uri!r}")
  bucket, _, name = uri[len(_SCHEME):].partition("/")
  if not bucket:
    raise errors.ConfigError(f"gs:// URI without a bucket: {uri!r}")
  return bucket, name


def join(base: str, *parts: str) -> str:
  if not is_gcs(base):
    return os.path.join(base, *parts)
  pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
  return "/".join(pieces)


def _dir_prefix(name: str) -> str:
  """The object-name prefix of everything "inside" name ("" for the bucket root)."""
  name = name.rstrip("/")
  return name + "/" if name else ""


def _uri(bucket: str, name: str) -> str:
  return f"{_SCHEME}{bucket}/{name}"


# --------------------------------------------------------------------------- client


def client() -> gcs.Client:
  """The process-wide GCS client; a new one only if the emulator settings change (tests)."""
  return _client_for(os.environ.get(EMULATOR_HOST_ENV) or None, os.environ.get(PROJECT_ENV) or None)


@functools.lru_cache(maxsize=None)
def _client_for(emulator_host, project):
  if emulator_host:
    # google-cloud-storage reads STORAGE_EMULATOR_HOST itself; the emulator needs no credentials.
    return gcs.Client(project=project or DEFAULT_EMULATOR_PROJECT,
                      credentials=auth_credentials.AnonymousCredentials())
  try:
    return gcs.Client(project=project) if project else gcs.Client()
  except auth_exceptions.DefaultCredentialsError as exc:
    raise errors.StorageError(
        "no Google Cloud credentials for gs:// access: run `gcloud auth application-default "
        "login`, set GOOGLE_APPLICATION_CREDENTIALS, or run with a service account") from exc


# --------------------------------------------------------------------------- retries


def _retry_deadline_s() -> float:
  raw = os.environ.get(RETRY_DEADLINE_ENV)
  if not raw:
    return DEFAULT_RETRY_DEADLINE_S
  try:
    return max(0.0, float(raw))
  except ValueError as exc:
    raise errors.ConfigError(f"{RETRY_DEADLINE_ENV}={raw!r} is not a number of seconds") from exc


def _is_transient(exc: BaseException) -> bool:
  if isinstance(exc, _TRANSIENT_TYPES):
    return True
  if isinstance(exc, api_exceptions.GoogleAPICallError):
    return exc.code in _TRANSIENT_STATUS
  if isinstance(exc, gcs_exceptions.InvalidResponse):
    return getattr(exc.response, "status_code", None) in _TRANSIENT_STATUS
  return False


def _describe(exc: BaseException) -> str:
  """A one-line description safe to log: URLs lose their query strings (signatures, ids)."""
  text = _URL_QUERY.sub(r"\1", f"{type(exc).__name__}: {exc}")
  return text if len(text) <= 300 else text[:297] + "..."


def _backoff_s(attempt: int) -> float:
  # Jitter spreads the retries of many workers hitting the same outage. It has its own random
  # source: drawing from Python's global one would change a seeded run's weights.
  cap = min(_MAX_BACKOFF_S, _INITIAL_BACKOFF_S * 2 ** (attempt - 1))
  return _JITTER.uniform(cap / 2, cap)


def _retry(fn, what: str):
  """fn() retried on transient errors; permanent errors propagate at once.

  The deadline counts from the first failure, not from the start, so that a long transfer that
  fails late still gets a full retry budget.
  """
  deadline_s = _retry_deadline_s()
  first_failure = None
  attempt = 0
  while True:
    try:
      return fn()
    except Exception as exc:  # pylint: disable=broad-except
      if not _is_transient(exc):
        raise
      now = time.monotonic()
      first_failure = now if first_failure is None else first_failure
      attempt += 1
      remaining = first_failure + deadline_s - now
      if remaining <= 0:
        raise errors.RetryableError(
            f"{what}: still failing after {attempt} attempts over {deadline_s:.0f} s "
            f"(last: {_describe(exc)})") from exc
      delay = min(remaining, _backoff_s(attempt))
      _LOG.warning("%s failed (%s); retry %d in %.2f s", what, _describe(exc), attempt, delay)
      # Retrying storage is not a silent peer: the collective watchdog allows for it.
      preemption.storage_retrying(what, remaining)
      time.sleep(delay)


# The flag whose path a storage call serves: error messages name it (see `for_flag`).
_FLAG = contextvars.ContextVar("storage_flag", default="--model_dir")


@contextlib.contextmanager
def for_flag(flag: str):
  """Storage errors raised inside name `flag` (e.g. --data_dir) as the one to fix."""
  token = _FLAG.set(flag)
  try:
    yield
  finally:
    _FLAG.reset(token)


def _missing_bucket_message(bucket: str) -> str:
  return (f"gs://{bucket} does not exist: create it with `gcloud storage buckets create "
          f"gs://{bucket}` or fix {_FLAG.get()}")


def _forbidden_message(bucket: str) -> str:
  return (f"permission denied on gs://{bucket}: grant the job's service account "
          f"roles/storage.objectAdmin on the bucket (`gcloud storage buckets "
          f"add-iam-policy-binding gs://{bucket} --member=serviceAccount:SA_EMAIL "
          f"--role=roles/storage.objectAdmin`) or fix {_FLAG.get()}")


@contextlib.contextmanager
def _gcs_errors(uri: str):
  """Turns the permanent GCS errors that reach here into StorageError with a fix in the message."""
  bucket, _ = split_gcs(uri)
  try:
    yield
  except api_exceptions.Unauthorized as exc:
    raise errors.StorageError(
        f"credentials rejected for {uri}: refresh Application Default Credentials "
        f"(`gcloud auth application-default login`) or check the job's service account") from exc
  except api_exceptions.Forbidden as exc:
    raise errors.StorageError(_forbidden_message(bucket)) from exc
  except api_exceptions.NotFound as exc:
    # Object-level 404s are handled where they mean "missing file"; one reaching here is the bucket.
    raise errors.StorageError(_missing_bucket_message(bucket)) from exc
  except auth_exceptions.RefreshError as exc:
    raise errors.StorageError(f"could not refresh credentials for {uri}: {_describe(exc)}") from exc
  except api_exceptions.GoogleAPICallError as exc:
    raise errors.StorageError(f"{uri}: {_describe(exc)}") from exc


# --------------------------------------------------------------------------- GCS primitives


def _crc32c_bytes(data: bytes) -> str:
  return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


def _crc32c_file(path: str) -> str:
  checksum = google_crc32c.Checksum()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_COPY_BUFFER), b""):
      checksum.update(block)
  return base64.b64encode(checksum.digest()).decode("ascii")


def _get_blob(bucket: str, name: str):
  """The object's metadata, or None when it does not exist."""
  def attempt():
    return client().bucket(bucket).get_blob(name, retry=None, timeout=_REQUEST_TIMEOUT)
  return _retry(attempt, f"stat {_uri(bucket, name)}")


def _list(bucket: str, prefix: str, delimiter: str | None = None,
          max_results: int | None = None) -> tuple[list, list[str]]:
  """(blobs, prefixes) under prefix; a whole listing is one retried unit."""
  def attempt():
    it = client().list_blobs(bucket, prefix=prefix, delimiter=delimiter, max_results=max_results,
                             retry=None, timeout=_REQUEST_TIMEOUT)
    blobs = list(it)
    return blobs, sorted(it.prefixes)
  return _retry(attempt, f"list {_uri(bucket, prefix)}")


def _upload(uri: str, open_source, size: int, crc32c: str, generation=None) -> None:
  """Uploads open_source() under a generation precondition, retrying the whole upload.

  generation=None looks up the current one (0 when absent). The precondition makes a retry
  after a lost response fail with 412 instead of writing the object twice, and makes a
  concurrent writer visible instead of silently overwritten.
  """
  bucket, name = split_gcs(uri)
  if generation is None:
    current = _get_blob(bucket, name)
    generation = current.generation if current is not None else 0

  def attempt():
    blob = client().bucket(bucket).blob(name)
    try:
      with open_source() as source:
        blob.upload_from_file(source, size=size, if_generation_match=generation,
                              checksum="crc32c", retry=None, timeout=_REQUEST_TIMEOUT)
    except api_exceptions.PreconditionFailed:
      _accept_if_ours(bucket, name, size, crc32c)

  _retry(attempt, f"upload {uri}")
  _LOG.debug("uploaded %s (%d bytes)", uri, size)


def _accept_if_ours(bucket: str, name: str, size: int, crc32c: str) -> None:
  """After a 412: fine if an earlier attempt of ours landed (same bytes), an error otherwise."""
  current = _get_blob(bucket, name)
  if current is not None and current.size == size and current.crc32c == crc32c:
    _LOG.info("%s already holds these bytes: an earlier attempt landed", _uri(bucket, name))
    return
  raise errors.StorageError(
      f"{_uri(bucket, name)} was changed by another writer during this upload: does a second "
      f"job or chief write to the same directory?")


def _delete_blob(bucket: str, name: str, missing_ok: bool) -> None:
  tried = []

  def attempt():
    try:
      client().bucket(bucket).blob(name).delete(retry=None, timeout=_REQUEST_TIMEOUT)
    except api_exceptions.NotFound:
      # After a failed attempt, 404 usually means that attempt's delete did happen.
      if not (missing_ok or tried):
        raise FileNotFoundError(_uri(bucket, name)) from None
    finally:
      tried.append(True)

  _retry(attempt, f"delete {_uri(bucket, name)}")


def _download_into(bucket: str, name: str, f) -> None:
  """Downloads the object into the open file f, starting over on every retry."""
  def attempt():
    f.seek(0)
    f.truncate()
    try:
      client().bucket(bucket).blob(name).download_to_file(
          f, retry=None, timeout=_REQUEST_TIMEOUT, checksum="crc32c")
    except api_exceptions.NotFound:
      raise FileNotFoundError(_uri(bucket, name)) from None
  _retry(attempt, f"download {_uri(bucket, name)}")


# --------------------------------------------------------------------------- local primitives


def _fsync_dir(path: str) -> None:
  # The rename itself is only durable once the directory entry is on disk.
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _atomic_write_local(path: str, write_fn) -> None:
  """write_fn(f) fills a temp file next to path that then replaces path in one rename."""
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
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_dir(parent)


def _copy_local(src: str, dst: str) -> None:
  with open(src, "rb") as source:
    _atomic_write_local(dst, lambda f: shutil.copyfileobj(source, f, _COPY_BUFFER))


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
  with _gcs_errors(path):
    if name.rstrip("/") and _get_blob(bucket, name.rstrip("/")) is not None:
      return True
    return _has_children(bucket, name)


def _has_children(bucket: str, name: str) -> bool:
  try:
    blobs, _ = _list(bucket, _dir_prefix(name), max_results=1)
  except api_exceptions.NotFound:
    return False  # no bucket, so nothing in it
  return bool(blobs)


def isdir(path: str) -> bool:
  if not is_gcs(path):
    return os.path.isdir(path)
  bucket, name = split_gcs(path)
  with _gcs_errors(path):
    return _has_children(bucket, name)


def read_bytes(path: str) -> bytes:
  """The file's contents; FileNotFoundError when it does not exist (local and gs:// alike)."""
  if not is_gcs(path):
    with open(path, "rb") as f:
      return f.read()
  bucket, name = split_gcs(path)

  def attempt():
    try:
      return client().bucket(bucket).blob(name).download_as_bytes(
          retry=None, timeout=_REQUEST_TIMEOUT, checksum="crc32c")
    except api_exceptions.NotFound:
      raise FileNotFoundError(path) from None

  with _gcs_errors(path):
    return _retry(attempt, f"read {path}")


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Replaces path with data: atomically for local paths, under a generation check for gs://."""
  if not is_gcs(path):
    _atomic_write_local(path, lambda f: f.write(data))
    return
  data = bytes(data)
  with _gcs_errors(path):
    _upload(path, lambda: io.BytesIO(data), len(data), _crc32c_bytes(data))


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def _put_file(src: str, dst: str) -> None:
  """Copies the local file src to dst (local or gs://)."""
  if not is_gcs(dst):
    _copy_local(src, dst)
    return
  with _gcs_errors(dst):
    _upload(dst, lambda: open(src, "rb"), os.path.getsize(src), _crc32c_file(src))


def _get_file(src: str, dst: str) -> None:
  """Copies src (local or gs://) to the local file dst, atomically."""
  if not is_gcs(src):
    _copy_local(src, dst)
    return
  bucket, name = split_gcs(src)
  with _gcs_errors(src):
    _atomic_write_local(dst, lambda f: _download_into(bucket, name, f))


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
  prefix = _dir_prefix(name)
  with _gcs_errors(path):
    blobs, prefixes = _list(bucket, prefix, delimiter="/")
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
  with _gcs_errors(path):
    _delete_blob(bucket, name, missing_ok=False)


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
  with _gcs_errors(path):
    blobs, _ = _list(bucket, _dir_prefix(name))
    for blob in blobs:
      _delete_blob(bucket, blob.name, missing_ok=True)
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
  prefix = _dir_prefix(name)
  with _gcs_errors(remote_dir):
    blobs, _ = _list(bucket, prefix)
  # Names ending in "/" are folder placeholders that consoles create, not files.
  return {b.name[len(prefix):]: b.size for b in blobs if not b.name.endswith("/")}


def _safe_local_path(local_dir: str, rel: str) -> str:
  parts = rel.split("/")
  if any(part in ("", ".", "..") for part in parts):
    raise errors.StorageError(f"refusing to download an object named {rel!r} outside {local_dir}")
  return os.path.join(local_dir, *parts)


def download_dir(remote_dir: str, local_dir: str, marker: str | None = None) -> list[str]:
  """Copies every file under remote_dir (local or gs://) into local_dir; returns relative paths.

  With a marker name, a remote_dir without it is refused as incomplete, and the marker is
  fetched last so that an interrupted download never looks complete either.
  """
  files = sorted(_remote_files(remote_dir))
  if not files:
    raise FileNotFoundError(f"nothing to download under {remote_dir}")
  if marker:
    if marker not in files:
      raise FileNotFoundError(f"{remote_dir} has no {marker}: its upload did not finish")
    files = [rel for rel in files if rel != marker] + [marker]
  os.makedirs(local_dir, exist_ok=True)
  for rel in files:
    _get_file(join(remote_dir, *rel.split("/")), _safe_local_path(local_dir, rel))
  _LOG.info("downloaded %d files from %s to %s", len(files), remote_dir, local_dir)
  return files


def is_complete(directory: str, marker: str, verify_files: bool = False) -> bool:
  """True when directory's marker exists (and with verify_files, its listed files match sizes)."""
  if not verify_files:
    marker_path = join(directory, marker)
    if not is_gcs(marker_path):
      return os.path.isfile(marker_path)
    with _gcs_errors(marker_path):
      return _get_blob(*split_gcs(marker_path)) is not None
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
  bucket, name = split_gcs(path)
  probe = _uri(bucket, _dir_prefix(name) + f".preflight-{uuid.uuid4().hex}")
  data = b"preflight\n"
  with _gcs_errors(path):
    try:
      # A fresh name needs no generation lookup: 0 means "must not exist yet".
      _upload(probe, lambda: io.BytesIO(data), len(data), _crc32c_bytes(data), generation=0)
    except BaseException:
      # An upload that failed late may still have landed: never leave the probe behind.
      with contextlib.suppress(Exception):
        _delete_blob(*split_gcs(probe), missing_ok=True)
      raise
    _delete_blob(*split_gcs(probe), missing_ok=True)
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
        f"{path} is not a writable directory ({exc.strerror or exc}): fix {_FLAG.get()} or its "
        f"permissions") from exc


# --------------------------------------------------------------------------- generations


def generation(path: str):
  """The gs:// object's generation (changes on every write), or None when it does not exist."""
  bucket, name = split_gcs(path)
  with _gcs_errors(path):
    blob = _get_blob(bucket, name)
  return None if blob is None else blob.generation


def write_if_generation(path: str, data: bytes, expected) -> bool:
  """Writes the gs:// object only if its generation is `expected` (0: absent); False if not."""
  data = bytes(data)
  try:
    with _gcs_errors(path):
      _upload(path, lambda: io.BytesIO(data), len(data), _crc32c_bytes(data), generation=expected)
  except errors.StorageError:
    if generation(path) == expected:
      raise
    return False
  return True

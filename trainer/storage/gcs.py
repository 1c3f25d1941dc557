"""The GCS transport: client, time-bounded retries, error mapping and object primitives.

Imported by the first gs:// path only (trainer/storage/bucket.py): google-cloud-storage and
google-api-core take a quarter of a second to import, which a run on local paths never needs.
"""

import base64
import contextlib
import functools
import hashlib
import http.client
import io
import logging
import os

import google_crc32c
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs_client
from google.cloud.storage import exceptions as gcs_exceptions

from trainer import errors
from trainer.storage import fencing
from trainer.storage import retries
# The path helpers and the retry budget live apart, so that local paths never load the Google
# libraries above; re-exported for the transport's callers.
from trainer.storage.gspath import FLAG, dir_prefix, is_gcs, split_gcs, uri  # noqa: F401
from trainer.storage.retries import RETRY_DEADLINE_ENV, describe, retry_deadline_s  # noqa: F401

_LOG = logging.getLogger(__name__)

EMULATOR_HOST_ENV = "STORAGE_EMULATOR_HOST"
PROJECT_ENV = "GOOGLE_CLOUD_PROJECT"
DEFAULT_EMULATOR_PROJECT = "test-project"

# (connect, read) seconds per HTTP request; read is per socket operation, so big files still fit.
REQUEST_TIMEOUT = (10.0, 120.0)
COPY_BUFFER = 1 << 20
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



def client() -> gcs_client.Client:
  """The process-wide GCS client; a new one only if the emulator settings change (tests)."""
  return _client_for(os.environ.get(EMULATOR_HOST_ENV) or None, os.environ.get(PROJECT_ENV) or None)


@functools.lru_cache(maxsize=None)
def _client_for(emulator_host, project):
  if emulator_host:
    # google-cloud-storage reads STORAGE_EMULATOR_HOST itself; the emulator needs no credentials.
    return gcs_client.Client(project=project or DEFAULT_EMULATOR_PROJECT,
                             credentials=auth_credentials.AnonymousCredentials())
  try:
    return gcs_client.Client(project=project) if project else gcs_client.Client()
  except auth_exceptions.DefaultCredentialsError as exc:
    raise errors.StorageError(
        "no Google Cloud credentials for gs:// access: run `gcloud auth application-default "
        "login`, set GOOGLE_APPLICATION_CREDENTIALS, or run with a service account") from exc



def retry(fn, what: str):
  """fn() retried on transient errors (trainer/storage/retries.py: the deadline, the backoff and
  the listeners); permanent errors propagate at once."""
  return retries.retry(fn, what, _is_transient)


def _is_transient(exc: BaseException) -> bool:
  if isinstance(exc, _TRANSIENT_TYPES):
    return True
  if isinstance(exc, api_exceptions.GoogleAPICallError):
    return exc.code in _TRANSIENT_STATUS
  if isinstance(exc, gcs_exceptions.InvalidResponse):
    return getattr(exc.response, "status_code", None) in _TRANSIENT_STATUS
  return False


def _missing_bucket_message(bucket: str) -> str:
  return (f"gs://{bucket} does not exist: create it with `gcloud storage buckets create "
          f"gs://{bucket}` or fix {FLAG.get()}")


def _forbidden_message(bucket: str) -> str:
  return (f"permission denied on gs://{bucket}: grant the job's service account "
          f"roles/storage.objectAdmin on the bucket (`gcloud storage buckets "
          f"add-iam-policy-binding gs://{bucket} --member=serviceAccount:SA_EMAIL "
          f"--role=roles/storage.objectAdmin`) or fix {FLAG.get()}")


@contextlib.contextmanager
def errors_of(uri: str):
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
    raise errors.StorageError(f"could not refresh credentials for {uri}: {describe(exc)}") from exc
  except api_exceptions.GoogleAPICallError as exc:
    raise errors.StorageError(f"{uri}: {describe(exc)}") from exc


# --------------------------------------------------------------------------- GCS primitives


def crc32c_bytes(data: bytes) -> str:
  return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


def crc32c_file(path: str) -> str:
  with open(path, "rb") as f:
    return checksum_of(f, "crc32c")


def checksum_of(f, kind: str) -> str:
  """The base64 crc32c or md5 of the rest of the open binary file f, as GCS metadata has it."""
  checksum = google_crc32c.Checksum() if kind == "crc32c" else hashlib.md5()
  for block in iter(lambda: f.read(COPY_BUFFER), b""):
    checksum.update(block)
  return base64.b64encode(checksum.digest()).decode("ascii")


def get_blob(bucket: str, name: str):
  """The object's metadata, or None when it does not exist."""
  def attempt():
    return client().bucket(bucket).get_blob(name, retry=None, timeout=REQUEST_TIMEOUT)
  return retry(attempt, f"stat {uri(bucket, name)}")


def list_objects(bucket: str, prefix: str, delimiter: str | None = None,
                 max_results: int | None = None) -> tuple[list, list[str]]:
  """(blobs, prefixes) under prefix; a whole listing is one retried unit."""
  def attempt():
    it = client().list_blobs(bucket, prefix=prefix, delimiter=delimiter, max_results=max_results,
                             retry=None, timeout=REQUEST_TIMEOUT)
    blobs = list(it)
    return blobs, sorted(it.prefixes)
  return retry(attempt, f"list {uri(bucket, prefix)}")


def upload(uri: str, open_source, size: int, crc32c: str, generation=None,
           fenced: bool = True) -> None:
  """Uploads open_source() under a generation precondition, retrying the whole upload.

  generation=None looks up the current one (0 when absent). The precondition makes a retry
  after a lost response fail with 412 instead of writing the object twice, and makes a
  concurrent writer visible instead of silently overwritten.

  fenced (all but the run lock's own objects): the write is allowed only while this process
  still holds its run locks (trainer/storage/fencing.py), else ConfigError before any byte is sent.
  Into a bucket that holds some of those lock objects, the condition is also enforced by the
  bucket itself: the bytes go to a staging object next to a lock, and a compose whose sources
  are that object and the (empty) lock objects, each under ifGenerationMatch, publishes them
  under `uri`; a takeover of a lock between our check and the compose makes it fail with 412.
  ComposeRequest.sourceObjects[].objectPreconditions.ifGenerationMatch is GCS's condition on a
  source's generation (JSON API reference, objects/compose).
  """
  bucket, name = split_gcs(uri)
  fences = []
  if fenced:
    fencing.check()
    fences = fencing.bucket_fences(bucket)
    if not fences:
      fencing.verify()  # no lock object in this bucket to compose with: ask each lock now
  if generation is None:
    current = get_blob(bucket, name)
    generation = current.generation if current is not None else 0
  if fences:
    _publish_by_compose(uri, fences, open_source, size, crc32c, generation)
    return

  def attempt():
    blob = client().bucket(bucket).blob(name)
    try:
      with open_source() as source:
        blob.upload_from_file(source, size=size, if_generation_match=generation,
                              checksum="crc32c", retry=None, timeout=REQUEST_TIMEOUT)
    except api_exceptions.PreconditionFailed:
      _accept_if_ours(bucket, name, size, crc32c)

  retry(attempt, f"upload {uri}")
  _LOG.debug("uploaded %s (%d bytes)", uri, size)


def _publish_by_compose(target: str, fences, open_source, size: int, crc32c: str,
                        generation: int) -> None:
  """Stages the bytes, then composes them into `target` on the condition that each lock object
  in `fences` still has the generation of this process's holding (see upload)."""
  bucket, name = split_gcs(target)
  staged = fences[0].staging_name()
  upload(uri(bucket, staged), open_source, size, crc32c, generation=0, fenced=False)
  lock_generations = [lock.generation for lock in fences]

  def attempt():
    objects = client().bucket(bucket)
    try:
      objects.blob(name).compose(
          [objects.blob(staged)] + [objects.blob(lock.object_name) for lock in fences],
          if_generation_match=generation,
          if_source_generation_match=[None] + lock_generations,
          retry=None, timeout=REQUEST_TIMEOUT)
    except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
      # A lock object changed (taken over: ConfigError here), the staged object is gone (a
      # new owner cleaned it up), or the target changed: an earlier attempt of ours, or not.
      for lock in fences:
        lock.verify()
      _accept_if_ours(bucket, name, size, crc32c)

  try:
    retry(attempt, f"publish {target}")
  finally:
    try:
      delete_blob(bucket, staged, missing_ok=True, fenced=False)
    except (errors.TrainerError, api_exceptions.GoogleAPICallError) as exc:
      # The next holder of the lock deletes leftovers; the publish itself is settled.
      _LOG.warning("could not delete the staging object %s: %s", uri(bucket, staged),
                   describe(exc))
  _LOG.debug("published %s (%d bytes) under %d lock(s)", target, size, len(fences))


def _accept_if_ours(bucket: str, name: str, size: int, crc32c: str) -> None:
  """After a 412: fine if an earlier attempt of ours landed (same bytes), an error otherwise."""
  current = get_blob(bucket, name)
  if current is not None and current.size == size and current.crc32c == crc32c:
    _LOG.info("%s already holds these bytes: an earlier attempt landed", uri(bucket, name))
    return
  raise errors.StorageError(
      f"{uri(bucket, name)} was changed by another writer during this upload: does a second "
      f"job or chief write to the same directory?")


def delete_blob(bucket: str, name: str, missing_ok: bool, fenced: bool = True) -> None:
  """Deletes the object; fenced (all but the lock's own objects): only after each run lock this
  process holds was confirmed on storage just before (GCS has no condition on another object
  for a delete, so a lock taken over between that read and the delete is not caught)."""
  if fenced:
    fencing.verify()
  tried = []

  def attempt():
    try:
      client().bucket(bucket).blob(name).delete(retry=None, timeout=REQUEST_TIMEOUT)
    except api_exceptions.NotFound:
      # After a failed attempt, 404 usually means that attempt's delete did happen.
      if not (missing_ok or tried):
        raise FileNotFoundError(uri(bucket, name)) from None
    finally:
      tried.append(True)

  retry(attempt, f"delete {uri(bucket, name)}")


def download_into(bucket: str, name: str, f) -> None:
  """Downloads the object into the open file f, starting over on every retry."""
  def attempt():
    f.seek(0)
    f.truncate()
    try:
      client().bucket(bucket).blob(name).download_to_file(
          f, retry=None, timeout=REQUEST_TIMEOUT, checksum="crc32c")
    except api_exceptions.NotFound:
      raise FileNotFoundError(uri(bucket, name)) from None
  retry(attempt, f"download {uri(bucket, name)}")


def has_children(bucket: str, name: str) -> bool:
  """True when any object lies under name/ (a missing bucket holds nothing)."""
  try:
    blobs, _ = list_objects(bucket, dir_prefix(name), max_results=1)
  except api_exceptions.NotFound:
    return False
  return bool(blobs)


def download_bytes(bucket: str, name: str) -> bytes:
  """The object's bytes, checksummed; FileNotFoundError when it does not exist."""
  def attempt():
    try:
      return client().bucket(bucket).blob(name).download_as_bytes(
          retry=None, timeout=REQUEST_TIMEOUT, checksum="crc32c")
    except api_exceptions.NotFound:
      raise FileNotFoundError(uri(bucket, name)) from None
  return retry(attempt, f"read {uri(bucket, name)}")


# --------------------------------------------------------------------------- lock objects
# Empty objects whose custom metadata names their owner (trainer/storage/lock.py). Each write is
# conditional; a retried write whose first attempt landed is recognised by its metadata, which
# holds a token unique to the owner.


def stat_marker(target: str):
  """The object's metadata (generation, metageneration, metadata), or None when absent."""
  with errors_of(target):
    return get_blob(*split_gcs(target))


def create_marker(target: str, metadata: dict, if_generation_match: int,
                  if_metageneration_match=None):
  """Writes an empty object carrying `metadata` if the current one has that generation (0: none)
  and metageneration; (generation, metageneration) of the new object, or None when refused."""
  bucket, name = split_gcs(target)

  def attempt():
    blob = client().bucket(bucket).blob(name)
    blob.metadata = metadata
    try:
      blob.upload_from_file(io.BytesIO(b""), size=0, if_generation_match=if_generation_match,
                            if_metageneration_match=if_metageneration_match, checksum="crc32c",
                            retry=None, timeout=REQUEST_TIMEOUT)
    except api_exceptions.PreconditionFailed:
      current = get_blob(bucket, name)
      if current is not None and current.metadata == metadata:
        return current.generation, current.metageneration  # our earlier attempt landed
      return None
    return blob.generation, blob.metageneration

  with errors_of(target):
    return retry(attempt, f"lock {target}")


def patch_marker(target: str, metadata: dict, generation: int, metageneration: int):
  """Replaces the object's metadata if it still has that generation and metageneration; the new
  metageneration, or None when refused (someone else wrote it, or it is gone)."""
  bucket, name = split_gcs(target)

  def attempt():
    blob = client().bucket(bucket).blob(name)
    blob.metadata = metadata
    try:
      blob.patch(if_generation_match=generation, if_metageneration_match=metageneration,
                 retry=None, timeout=REQUEST_TIMEOUT)
    except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
      current = get_blob(bucket, name)
      if (current is not None and current.generation == generation
          and current.metadata == metadata):
        return current.metageneration  # our earlier attempt landed
      return None
    return blob.metageneration

  with errors_of(target):
    return retry(attempt, f"renew {target}")


def delete_marker(target: str, generation: int) -> None:
  """Deletes the object only if it still has that generation; gone or rewritten is fine."""
  bucket, name = split_gcs(target)

  def attempt():
    try:
      client().bucket(bucket).blob(name).delete(if_generation_match=generation, retry=None,
                                                timeout=REQUEST_TIMEOUT)
    except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
      pass

  with errors_of(target):
    retry(attempt, f"release {target}")


def delete_staged(bucket: str, prefix: str) -> int:
  """Deletes the staging objects named prefix* that interrupted publishes left; their count."""
  with errors_of(uri(bucket, prefix)):
    blobs, _ = list_objects(bucket, prefix)
    for blob in blobs:
      delete_blob(bucket, blob.name, missing_ok=True, fenced=False)
  return len(blobs)

"""gs:// path strings, no I/O and no Google libraries: recognise, split, join, name the flag."""

import contextlib
import contextvars
import os

from trainer import errors

SCHEME = "gs://"


def is_gcs(path: str) -> bool:
  return str(path).startswith(SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
  """("bucket", "object/name") of a gs:// URI; the name is "" for the bucket root."""
  if not is_gcs(uri):
    raise errors.ConfigError(f"not a gs:// URI: {uri!r}")
  bucket, _, name = uri[len(SCHEME):].partition("/")
  if not bucket:
    raise errors.ConfigError(f"gs:// URI without a bucket: {uri!r}")
  return bucket, name


def join(base: str, *parts: str) -> str:
  if not is_gcs(base):
    return os.path.join(base, *parts)
  pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
  return "/".join(pieces)


def dir_prefix(name: str) -> str:
  """The object-name prefix of everything "inside" name ("" for the bucket root)."""
  name = name.rstrip("/")
  return name + "/" if name else ""


def uri(bucket: str, name: str) -> str:
  return f"{SCHEME}{bucket}/{name}"


# The flag whose path a storage call serves: error messages name it (see `for_flag`).
FLAG = contextvars.ContextVar("storage_flag", default="--model_dir")


@contextlib.contextmanager
def for_flag(flag: str):
  """Storage errors raised inside name `flag` (e.g. --data_dir) as the one to fix."""
  token = FLAG.set(flag)
  try:
    yield
  finally:
    FLAG.reset(token)

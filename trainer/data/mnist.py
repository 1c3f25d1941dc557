"""MNIST's four files: where they come from (given, vendored, or one bounded download), their
canonical SHA-256s, and the IDX format they hold."""

import logging
import os
import pathlib
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from trainer import errors
from trainer.data import files

# SHA-256 of the four vendored .gz files (data/mnist/SHA256SUMS holds the same).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz":
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz":
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz":
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
# The mirror TFDS itself fetches MNIST from (tensorflow_datasets/image_classification/mnist.py).
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# Bounds of the one download an installed package (no vendored copy) makes. TFDS's own download
# has no socket timeout and retries each file 10 times: minutes offline, forever on a stalled
# connection. Here every blocking socket call waits at most DOWNLOAD_TIMEOUT_S, each file gets
# DOWNLOAD_ATTEMPTS tries and the whole download DOWNLOAD_DEADLINE_S (11 MB: >= 37 KB/s). Name
# lookups are bounded by the resolver's own timeouts (resolv.conf), not by these.
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOAD_ATTEMPTS = 3
DOWNLOAD_DEADLINE_S = 300.0


def source_dir(data_dir: str, mnist_source_dir: str) -> str:
  """The directory with the four MNIST files: given, vendored, or downloaded into data_dir (the
  caller holds the data_dir lock)."""
  if mnist_source_dir:
    return mnist_source_dir
  if os.path.isdir(vendored_mnist_dir()):
    return vendored_mnist_dir()
  return download_mnist(os.path.join(data_dir, "downloads", "mnist-raw"))


def vendored_mnist_dir() -> str:
  """The repository's copy of MNIST (absent in an installed package: see download_mnist)."""
  return str(pathlib.Path(__file__).resolve().parents[2] / "data" / "mnist")


def verify_mnist_files(directory: str) -> None:
  """Raises DataError naming the file when one is missing or its SHA-256 does not match."""
  for name, expected in MNIST_SHA256.items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise errors.DataError(
          f"MNIST file {path} is missing: restore it (git checkout data/mnist) or point "
          "--mnist_source_dir at a directory with the four canonical .gz files.")
    actual = files.sha256(path)
    if actual != expected:
      raise errors.DataError(
          f"MNIST file {path} is corrupt: SHA-256 {actual} != expected {expected}. "
          "Restore it (git checkout data/mnist) or fix --mnist_source_dir.")


def download_mnist(target_dir: str, base_url: str = MNIST_URL,
                   timeout_s: float = DOWNLOAD_TIMEOUT_S,
                   deadline_s: float = DOWNLOAD_DEADLINE_S) -> str:
  """target_dir holding the four MNIST files, downloaded (bounded) unless a verified copy is there.

  For an installed package, which has no vendored copy. The files go to a temporary directory
  next to target_dir and are checked against MNIST_SHA256 before the rename, so target_dir never
  holds a partial set. The caller holds the data_dir lock.
  """
  try:
    verify_mnist_files(target_dir)
    return target_dir
  except errors.DataError:
    pass  # not downloaded yet (or damaged since): download again
  parent = os.path.dirname(target_dir)
  os.makedirs(parent, exist_ok=True)
  partial_prefix = f".{os.path.basename(target_dir)}.partial-"
  files.remove_partials(parent, partial_prefix)
  partial = tempfile.mkdtemp(dir=parent, prefix=partial_prefix)
  deadline = time.monotonic() + deadline_s
  logging.info("No vendored MNIST: downloading it from %s into %s", base_url, target_dir)
  try:
    for name, expected in MNIST_SHA256.items():
      _download_file(urllib.parse.urljoin(base_url, name), os.path.join(partial, name),
                     expected, timeout_s, deadline)
    files.replace_dir(partial, target_dir, partial_prefix)
  finally:
    shutil.rmtree(partial, ignore_errors=True)  # only after a failure: the rename moved it
  logging.info("Downloaded MNIST from %s into %s", base_url, target_dir)
  return target_dir


def read_idx(path: str) -> np.ndarray:
  """Reads a gzip IDX file (the canonical MNIST format) into a numpy array."""
  import gzip
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _download_file(url: str, path: str, expected: str, timeout_s: float,
                   deadline: float) -> None:
  """url -> path in at most DOWNLOAD_ATTEMPTS tries; DataError unless it has the canonical bytes."""
  for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
    try:
      _fetch(url, path, timeout_s, deadline)
      break
    except urllib.error.HTTPError as e:
      reason = f"HTTP {e.code} {e.reason}"
      if e.code < 500:  # a refusal (403, 404) is the same on every attempt
        raise _no_download(url, reason) from None
    except OSError as e:  # timeouts, refused or reset connections, failed name lookups
      reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    if attempt == DOWNLOAD_ATTEMPTS or time.monotonic() + attempt >= deadline:
      raise _no_download(url, f"{reason}; {attempt} attempt(s)")
    logging.warning("Downloading %s failed (%s, attempt %d of %d); retrying in %d s", url, reason,
                    attempt, DOWNLOAD_ATTEMPTS, attempt)
    time.sleep(attempt)
  actual = files.sha256(path)
  if actual != expected:
    raise errors.DataError(
        f"{url} sent a file with SHA-256 {actual}, not the canonical MNIST file ({expected}): a "
        "proxy or mirror altered it. Pass --mnist_source_dir=DIR with the four canonical files.")


def _fetch(url: str, path: str, timeout_s: float, deadline: float) -> None:
  """One attempt at url -> path; every socket wait and the whole transfer are bounded."""
  remaining = deadline - time.monotonic()
  if remaining <= 0:
    raise TimeoutError("download deadline passed")
  with urllib.request.urlopen(url, timeout=min(timeout_s, remaining)) as response, \
      open(path, "wb") as f:
    for chunk in iter(lambda: response.read(1 << 16), b""):
      f.write(chunk)
      if time.monotonic() > deadline:
        raise TimeoutError("download deadline passed")


def _no_download(url: str, reason: str) -> errors.DataError:
  return errors.DataError(
      f"Could not download MNIST from {url} ({reason}), and this installation has no vendored "
      f"copy ({vendored_mnist_dir()}). Without network access, pass --mnist_source_dir=DIR "
      "(local or gs://) holding the four MNIST .gz files, or --data_dir=gs://BUCKET/"
      "tensorflow_datasets holding a prepared TFDS mnist (prepare it where there is network, "
      "then `gcloud storage cp -r ~/tensorflow_datasets/mnist gs://BUCKET/tensorflow_datasets/`).")

"""Input data: gets, verifies and prepares MNIST with TFDS, loads splits, shards tf.data input."""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np
import tensorflow as tf

from trainer import errors

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
# Other datasets are downloaded by TFDS: a TCP connect to each host, bounded, fails fast offline.
PROBE_TIMEOUT_S = 10.0
# A dead process's flock is released by the kernel, so a wait only outlasts a live holder.
LOCK_TIMEOUT_S = 1800.0
# Written last into a staged copy of a gs:// directory; holds the source URI.
STAGED_MARKER = ".staged-from"


@dataclasses.dataclass(frozen=True)
class Splits:
  """The test split (and in in_memory mode the train split) as uint8 images and int32 labels."""

  train_images: np.ndarray | None  # None in stream mode: the train split stays in its files
  train_labels: np.ndarray | None
  test_images: np.ndarray | None  # None on workers that do not evaluate
  test_labels: np.ndarray | None
  num_classes: int
  image_shape: tuple
  class_names: tuple = ()  # label i's name (exported next to the SavedModel)


def vendored_mnist_dir() -> str:
  """The repository's copy of MNIST (absent in an installed package: see download_mnist)."""
  return str(pathlib.Path(__file__).resolve().parents[2] / "data" / "mnist")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_mnist_files(source_dir: str) -> None:
  """Raises DataError naming the file when one is missing or its SHA-256 does not match."""
  for name, expected in MNIST_SHA256.items():
    path = os.path.join(source_dir, name)
    if not os.path.isfile(path):
      raise errors.DataError(
          f"MNIST file {path} is missing: restore it (git checkout data/mnist) or point "
          "--mnist_source_dir at a directory with the four canonical .gz files.")
    actual = _sha256(path)
    if actual != expected:
      raise errors.DataError(
          f"MNIST file {path} is corrupt: SHA-256 {actual} != expected {expected}. "
          "Restore it (git checkout data/mnist) or fix --mnist_source_dir.")


def check_writable(data_dir: str) -> None:
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise errors.DataError(f"--data_dir={data_dir} is not writable ({e.strerror}): choose a "
                           "directory you can write to.") from None


@contextlib.contextmanager
def _lock(directory: str, name: str, timeout_s: float = LOCK_TIMEOUT_S):
  """Serializes preparation between processes sharing one directory (local cluster workers)."""
  path = os.path.join(directory, f".{name}.lock")
  with open(path, "w") as f:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          raise errors.DataError(
              f"Another process has held {path} for {timeout_s:.0f} s while preparing data: let "
              "it finish, or stop it and run again.") from None
        time.sleep(0.2)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _remove_partials(directory: str, prefix: str) -> None:
  """Deletes leftovers of interrupted downloads; the caller holds the lock, so none is live."""
  for name in os.listdir(directory):
    if name.startswith(prefix):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _replace_dir(partial: str, target: str, prefix: str) -> None:
  """Renames the complete `partial` onto `target`; an incomplete old target is moved aside first
  (one atomic rename), so an interruption never leaves a half-deleted target in place."""
  if os.path.lexists(target):
    parent = os.path.dirname(target)
    old = os.path.join(parent, f"{prefix}old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(target, old)
    shutil.rmtree(old, ignore_errors=True)
  os.rename(partial, target)


def _builder(dataset: str, data_dir: str):
  import tensorflow_datasets as tfds  # Heavy import; keep it off module import paths.
  from trainer import logs
  if not logs.verbose():
    tfds.disable_progress_bar()  # one log line per phase, not a progress bar per file
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.ConfigError(f"--dataset={dataset!r} is not a TensorFlow Datasets name: use "
                             "mnist, fashion_mnist, kmnist, cifar10, ...") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise errors.ConfigError(f"--dataset={dataset!r} is not an image classification dataset "
                             "(needs 'image' and 'label' features).")
  return builder


def _prepared_builder(dataset: str, data_dir: str):
  """A read-only builder of the one version of `dataset` prepared in data_dir, or None.

  It reads the prepared metadata alone (trainer/data/tfds_metadata.py without TFDS, else TFDS's
  builder_from_directory), where tfds.builder first imports TFDS's whole catalog of dataset
  modules (about a quarter of a second every run). TFDS lays a prepared dataset out as
  data_dir/NAME/VERSION/dataset_info.json and renames it into place when complete (a folder
  being prepared has another name); anything else (several versions, a config, none) takes the
  full path.
  """
  folder = os.path.join(data_dir, dataset)
  try:
    versions = [v for v in os.listdir(folder) if re.fullmatch(r"\d+\.\d+\.\d+", v)
                and os.path.isfile(os.path.join(folder, v, "dataset_info.json"))]
  except OSError:
    return None
  if len(versions) != 1:
    return None
  from trainer.data import tfds_metadata
  builder = tfds_metadata.open_read_only(os.path.join(folder, versions[0]))
  features = builder.info.features
  if builder.name != dataset or "image" not in features or "label" not in features:
    return None
  return builder


def staged_dir(path: str) -> str:
  """Where stage() keeps its local copy of the gs:// directory `path`."""
  from trainer import storage
  cache = storage.cache_root()
  return os.path.join(cache, "staged", hashlib.sha256(path.encode()).hexdigest()[:16])


def has_marker(directory: str, marker: str, source: str) -> bool:
  """Whether directory is a finished copy of source: its marker file, written last, names it."""
  try:
    with open(os.path.join(directory, marker)) as f:
      return f.read() == source
  except OSError:
    return False


def is_record_file(path: str) -> bool:
  """A TFDS record file (a split's examples), as opposed to the metadata next to it."""
  name = os.path.basename(path)
  return ".tfrecord" in name or ".array_record" in name


def stage(path: str, what: str) -> str:
  """A local copy of a gs:// directory (data inputs are read locally); local paths pass through.

  Under a file lock (workers may share the cache), the copy is downloaded into a temporary
  directory next to it, marked with the source URI last and renamed into place. A directory
  without that marker (an interrupted copy) is downloaded again, never used. Record files are
  left out: fetch_records gets each when something is about to read it (a stream-mode worker
  reads only its own).
  """
  from trainer import storage
  if not storage.is_gcs(path):
    return os.path.expanduser(path)
  storage.check_cache_writable(f"the local copy of {what}={path}")
  local = staged_dir(path)
  parent, key = os.path.split(local)
  os.makedirs(parent, exist_ok=True)
  with _lock(parent, key):
    if has_marker(local, STAGED_MARKER, path):
      return local
    partial_prefix = f".{key}.partial-"
    _remove_partials(parent, partial_prefix)
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
      with open(os.path.join(partial, STAGED_MARKER), "w") as f:
        f.write(path)
      _replace_dir(partial, local, partial_prefix)
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
  from trainer import storage
  if not storage.is_gcs(data_dir):
    return []
  paths = [str(p) for p in builder.info.splits[split].filepaths]
  wanted = [paths[i] for i in (range(len(paths)) if indices is None else indices)]
  root = staged_dir(data_dir)
  fetched = []
  with _lock(root, "records"):
    _remove_damaged_copies(data_dir, root, [p for p in wanted if os.path.isfile(p)])
    for path in wanted:
      if os.path.isfile(path):
        continue  # cached, or fetched by another process while this one waited
      remote = _remote_of(data_dir, root, path)
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


def _remote_of(data_dir: str, root: str, path: str) -> str:
  """The gs:// object of the file `path` of data_dir's staged copy `root` (the same relative
  path: the staged copy mirrors data_dir)."""
  from trainer import storage
  return storage.join(data_dir, *os.path.relpath(path, root).split(os.sep))


def _remove_damaged_copies(data_dir: str, root: str, cached: list) -> None:
  """Deletes the cached copies of gs:// record files that differ from their objects (a disk's
  damage, a person's edit), with a warning each, so that they are fetched again: the bucket
  decides. Costs one listing and a CRC32C pass over the cached files (fetched files were
  checked as they came). The caller holds the records lock."""
  from trainer import storage
  if not cached:
    return
  folder = os.path.dirname(cached[0])  # a split's files lie in one folder
  with storage.for_flag("--data_dir"):
    differing = storage.differing_copies(_remote_of(data_dir, root, folder), folder,
                                         [os.path.basename(p) for p in cached])
  for name in differing:
    path = os.path.join(folder, name)
    logging.warning("The local copy %s of %s differs from the bucket's object (size or CRC32C): "
                    "damaged on this disk; fetching it again.", path,
                    _remote_of(data_dir, root, path))
    os.remove(path)


def _cache_full(remote: str, error: OSError) -> errors.StorageError:
  from trainer import storage
  return errors.StorageError(
      f"No space left on the device of the local cache {storage.cache_root()} "
      f"(${storage.CACHE_DIR_ENV}) while copying {remote} into it ({error.filename or ''}). "
      f"gs:// data is read from local copies there: free space on that disk, or set "
      f"{storage.CACHE_DIR_ENV} to a folder on a disk with room for the dataset, then rerun the "
      "same command.")


def _no_mnist_download(url: str, reason: str) -> errors.DataError:
  return errors.DataError(
      f"Could not download MNIST from {url} ({reason}), and this installation has no vendored "
      f"copy ({vendored_mnist_dir()}). Without network access, pass --mnist_source_dir=DIR "
      "(local or gs://) holding the four MNIST .gz files, or --data_dir=gs://BUCKET/"
      "tensorflow_datasets holding a prepared TFDS mnist (prepare it where there is network, "
      "then `gcloud storage cp -r ~/tensorflow_datasets/mnist gs://BUCKET/tensorflow_datasets/`).")


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


def _download_mnist_file(url: str, path: str, expected: str, timeout_s: float,
                         deadline: float) -> None:
  """url -> path in at most DOWNLOAD_ATTEMPTS tries; DataError unless it has the canonical bytes."""
  for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
    try:
      _fetch(url, path, timeout_s, deadline)
      break
    except urllib.error.HTTPError as e:
      reason = f"HTTP {e.code} {e.reason}"
      if e.code < 500:  # a refusal (403, 404) is the same on every attempt
        raise _no_mnist_download(url, reason) from None
    except OSError as e:  # timeouts, refused or reset connections, failed name lookups
      reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    if attempt == DOWNLOAD_ATTEMPTS or time.monotonic() + attempt >= deadline:
      raise _no_mnist_download(url, f"{reason}; {attempt} attempt(s)")
    logging.warning("Downloading %s failed (%s, attempt %d of %d); retrying in %d s", url, reason,
                    attempt, DOWNLOAD_ATTEMPTS, attempt)
    time.sleep(attempt)
  actual = _sha256(path)
  if actual != expected:
    raise errors.DataError(
        f"{url} sent a file with SHA-256 {actual}, not the canonical MNIST file ({expected}): a "
        "proxy or mirror altered it. Pass --mnist_source_dir=DIR with the four canonical files.")


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
  _remove_partials(parent, partial_prefix)
  partial = tempfile.mkdtemp(dir=parent, prefix=partial_prefix)
  deadline = time.monotonic() + deadline_s
  logging.info("No vendored MNIST: downloading it from %s into %s", base_url, target_dir)
  try:
    for name, expected in MNIST_SHA256.items():
      _download_mnist_file(urllib.parse.urljoin(base_url, name), os.path.join(partial, name),
                           expected, timeout_s, deadline)
    _replace_dir(partial, target_dir, partial_prefix)
  finally:
    shutil.rmtree(partial, ignore_errors=True)  # only after a failure: the rename moved it
  logging.info("Downloaded MNIST from %s into %s", base_url, target_dir)
  return target_dir


def _download_endpoint(url: str) -> tuple:
  """(host, port) a download of url connects to: the proxy from *_PROXY variables, if any."""
  parsed = urllib.parse.urlsplit(url)
  proxy = urllib.request.getproxies().get(parsed.scheme)
  if proxy and not urllib.request.proxy_bypass(parsed.hostname):
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
  return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def check_download_hosts(dataset: str, urls, timeout_s: float = PROBE_TIMEOUT_S) -> None:
  """DataError within seconds when a host TFDS would download `dataset` from is unreachable.

  A connect with a timeout settles the offline case; a download that stalls after a good probe
  is still bounded only by TFDS.
  """
  for host, port in sorted({_download_endpoint(url) for url in urls}):
    try:
      with socket.create_connection((host, port), timeout=timeout_s):
        pass
    except OSError as e:
      copy = f"gcloud storage cp -r ~/tensorflow_datasets/{dataset} gs://BUCKET/tensorflow_datasets"
      raise errors.DataError(
          f"--dataset={dataset} is downloaded from {host}:{port}, which cannot be reached "
          f"({type(e).__name__}: {e}). Without network access, pass --data_dir=gs://BUCKET/"
          "tensorflow_datasets holding a prepared copy (prepare it where there is network, then "
          f"`{copy}`).") from None


def _mnist_source(data_dir: str, mnist_source_dir: str) -> str:
  """The directory with the four MNIST files: given, vendored, or downloaded into data_dir."""
  if mnist_source_dir:
    return mnist_source_dir
  if os.path.isdir(vendored_mnist_dir()):
    return vendored_mnist_dir()
  return download_mnist(os.path.join(data_dir, "downloads", "mnist-raw"))


def prepare(dataset: str, data_dir: str, mnist_source_dir: str = "", num_shards: int = 0,
            image_size: int = 0, eval_fraction: float = 0.1):
  """Returns a prepared TFDS builder; TFDS never downloads MNIST itself.

  MNIST is built from local files: --mnist_source_dir, the vendored copy, or in an installed
  package (which has none) the four files fetched once by download_mnist, with bounded waits.
  gs:// inputs are staged to local disk first: a prepared TFDS directory in a bucket, or the
  four MNIST files. Without network, a download that is needed fails with DataError (exit 3).
  num_shards (0: TFDS's choice) sets how many record files each split gets when it is prepared
  here; stream mode shards by file, so it wants at least one per input pipeline, and a dataset
  already prepared with another count is a ConfigError (it is never prepared twice).
  image_folder:DIR datasets are prepared by trainer/data/image_folder.py (image_size, eval_fraction).
  A dataset already prepared is only read: data_dir need not be writable then.
  """
  given = data_dir
  data_dir = stage(data_dir, "--data_dir")
  if mnist_source_dir:
    mnist_source_dir = stage(mnist_source_dir, "--mnist_source_dir")
  from trainer.data import image_folder
  if image_folder.is_image_folder(dataset):
    builder = image_folder.prepare(dataset, data_dir, image_size, eval_fraction, num_shards)
  else:
    builder = _prepared_builder(dataset, data_dir) or _read_only_builder(dataset, data_dir)
    if builder is None:
      builder = _prepare_tfds(dataset, data_dir, mnist_source_dir, num_shards)
    else:
      _remove_leftovers_if_free(data_dir, dataset, str(builder.data_dir))
  _check_num_shards(builder, num_shards, given)
  return builder


def _read_only_builder(dataset: str, data_dir: str):
  """TFDS's builder of a dataset prepared in a data_dir this process cannot write (in a layout
  that _prepared_builder leaves to TFDS), or None: preparing needs a writable data_dir."""
  if not os.path.isdir(data_dir) or os.access(data_dir, os.W_OK):
    return None
  builder = _builder(dataset, data_dir)
  return builder if builder.is_prepared() else None


def _prepare_tfds(dataset: str, data_dir: str, mnist_source_dir: str, num_shards: int):
  """Prepares a TFDS dataset in data_dir under its lock (unless another process just did).

  TFDS downloads into a folder of this dataset's own (_download_dir), removed once the dataset
  is prepared or the preparation failed, and at the next preparation after a killed one, with
  TFDS's unfinished incomplete.* folder: a prepared data_dir holds the records alone.
  """
  check_writable(data_dir)
  builder = _builder(dataset, data_dir)
  with _lock(data_dir, dataset):
    _remove_leftovers(data_dir, dataset, str(builder.data_dir))
    if builder.is_prepared():
      # Built anew: a builder made before another process prepared the data under this lock
      # has empty metadata (no splits).
      return _builder(dataset, data_dir)
    if dataset == "mnist":
      source = _mnist_source(data_dir, mnist_source_dir)
      verify_mnist_files(source)
      builder.URL = source.rstrip("/") + "/"
      logging.info("Preparing TFDS mnist in %s from %s", data_dir, source)
    else:
      check_download_hosts(dataset, (builder.url_infos or {}).keys())
    download_dir = _download_dir(data_dir, dataset)
    try:
      import tensorflow_datasets as tfds
      builder.download_and_prepare(
          download_dir=download_dir, download_config=tfds.download.DownloadConfig(
              num_shards=num_shards or None,
              # Where TFDS looks for manual downloads by default: download_dir/manual
              # (tensorflow_datasets/core/dataset_builder.py, _make_download_manager).
              manual_dir=os.path.join(data_dir, "downloads", "manual")))
    except Exception as e:  # TFDS raises many types; all mean the data cannot be had.
      raise errors.DataError(f"Could not prepare --dataset={dataset} in --data_dir={data_dir}: "
                             f"{e}") from e
    finally:
      shutil.rmtree(download_dir, ignore_errors=True)
  return builder


def _download_dir(data_dir: str, dataset: str) -> str:
  """TFDS's download folder for one preparation of dataset (its own: several datasets may be
  prepared in one data_dir at once, each under its own lock)."""
  return os.path.join(data_dir, "downloads", ".preparing-" + re.sub(r"[^\w.-]+", "_", dataset))


def _leftovers(data_dir: str, dataset: str, version_dir: str) -> list:
  """What killed preparations of dataset left in data_dir: this dataset's download folder, and
  the incomplete.XXXXXX_VERSION folders TFDS writes a version into before renaming it
  (tensorflow_datasets/core/utils/file_utils.py: incomplete_dir; it removes them itself on
  failure, but nothing removes a killed one's)."""
  parent, version = os.path.split(version_dir.rstrip("/"))
  pattern = re.compile(r"incomplete\.[A-Z0-9]{6}_" + re.escape(version))
  try:
    found = [os.path.join(parent, n) for n in os.listdir(parent) if pattern.fullmatch(n)]
  except OSError:
    found = []
  download_dir = _download_dir(data_dir, dataset)
  return found + ([download_dir] if os.path.lexists(download_dir) else [])


def _remove_leftovers(data_dir: str, dataset: str, version_dir: str) -> None:
  """Removes _leftovers(); the caller holds the dataset's lock, so none of them is live."""
  for path in _leftovers(data_dir, dataset, version_dir):
    shutil.rmtree(path, ignore_errors=True)
    logging.info("Removed %s, left by an interrupted preparation of %s.", path, dataset)


def _remove_leftovers_if_free(data_dir: str, dataset: str, version_dir: str) -> None:
  """_remove_leftovers for a dataset that is prepared already: best effort, only when there
  are any, data_dir is writable and the lock is free within seconds."""
  if not _leftovers(data_dir, dataset, version_dir) or not os.access(data_dir, os.W_OK):
    return
  try:
    with _lock(data_dir, dataset, timeout_s=5.0):
      _remove_leftovers(data_dir, dataset, version_dir)
  except (errors.DataError, OSError):
    pass  # a preparation of another version holds it, or the folder cannot be written


def _check_num_shards(builder, num_shards: int, data_dir: str) -> None:
  """--num_shards applies when a dataset is prepared; one prepared with another count is an
  error, not silently read (stream mode's sharding depends on the count)."""
  splits = builder.info.splits
  if not num_shards or "train" not in splits:
    return
  files = len(splits["train"].filepaths)
  if files != num_shards:
    raise errors.ConfigError(
        f"--num_shards={num_shards}, but --data_dir={data_dir} already holds {builder.name} "
        f"prepared with {files} train record file(s), and --num_shards applies only when a "
        f"dataset is prepared. Pass --num_shards={files} (or none) to train on those files, or "
        f"a new --data_dir to prepare {num_shards}.")


def _load_split(builder, split: str, limit: int):
  """(uint8 images, int32 labels) of the split's first `limit` examples (0: all).

  Decoding the records (PNG for MNIST) costs seconds every run, so the decoded arrays are
  kept next to the prepared data, keyed by a hash of the record files: a changed dataset is
  decoded again, never read stale. The CRC-32 of each array, recorded when it is written, is
  checked when it is read (about 12 ms for MNIST's 47 MB train split): a damaged array is
  decoded again, with one warning, never trained or evaluated on.
  """
  images, labels = _decoded_from_cache(builder, split)
  if images is None:
    try:
      images, labels = _decode_split(builder, split)
    except tf.errors.DataLossError as e:
      raise errors.DataError(
          f"A record file of the prepared {builder.name} {split} split in {builder.data_dir} "
          f"is damaged ({str(e).strip().splitlines()[0][:300]}): prepare the dataset again (a "
          "new --data_dir, or delete the dataset's folder in it); of a gs:// --data_dir, whose "
          "local copies were checked against the bucket, upload a good copy.") from None
    _save_decoded(builder, split, images, labels)
  if limit:
    images, labels = images[:limit], labels[:limit]
  return np.asarray(images), np.asarray(labels)


def _decode_split(builder, split: str):
  import tensorflow_datasets as tfds
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32)


def _decoded_paths(builder, split: str) -> tuple:
  """(images .npy, labels .npy) named by the hash of the split's record files."""
  digest = hashlib.sha256()
  for path in builder.info.splits[split].filepaths:
    digest.update(os.path.basename(str(path)).encode())
    digest.update(_sha256(str(path)).encode())
  key = digest.hexdigest()[:16]
  base = os.path.join(str(builder.data_dir), f"decoded-{split}-{key}")
  return base + "-images.npy", base + "-labels.npy"


def _checksums_path(images_path: str) -> str:
  """The JSON beside a decoded split's arrays: their CRC-32s, written after both arrays."""
  return images_path[:-len("-images.npy")] + "-crc32.json"


def _crc32(array: np.ndarray) -> int:
  """CRC-32 of the array's bytes (zlib's, about 4 GB/s here: the cheapest check in stdlib)."""
  return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _decoded_from_cache(builder, split: str) -> tuple:
  """The kept arrays when they are there and match the checksums recorded with them, else
  (None, None) (a mismatch is logged: the split is decoded again and the arrays rewritten)."""
  images_path, labels_path = _decoded_paths(builder, split)
  try:
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(labels_path, mmap_mode="r")
  except (OSError, ValueError):
    return None, None
  if len(images) != len(labels) or images.dtype != np.uint8 or labels.dtype != np.int32:
    logging.warning("The decoded %s split in %s has damaged headers: decoding it again.", split,
                    images_path)
    return None, None
  sums_path = _checksums_path(images_path)
  try:
    with open(sums_path) as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    # Written by an older version (no checksums) or interrupted before its last file.
    logging.info("No checksums for the decoded %s split (%s): decoding it again.", split,
                 sums_path)
    return None, None
  for name, array, path in (("images", images, images_path), ("labels", labels, labels_path)):
    actual = _crc32(array)
    if not isinstance(recorded, dict) or recorded.get(name) != actual:
      logging.warning("The decoded %s split's %s (%s) do not match the checksum recorded when "
                      "they were written (CRC-32 %08x, recorded %s): damaged since; decoding "
                      "the split again.", split, name, path, actual,
                      recorded.get(name) if isinstance(recorded, dict) else recorded)
      return None, None
  return images, labels


def _save_decoded(builder, split: str, images, labels) -> None:
  """Best effort (a read-only data_dir just decodes every run); each file lands whole, and the
  checksums go last, so arrays without them are never used."""
  from trainer import storage
  images_path, labels_path = _decoded_paths(builder, split)
  sums = json.dumps({"images": _crc32(images), "labels": _crc32(labels)})
  writes = ((images_path, lambda f: np.save(f, images)),
            (labels_path, lambda f: np.save(f, labels)),
            (_checksums_path(images_path), lambda f: f.write(sums.encode())))
  for path, write in writes:
    try:
      storage.atomic_write_local(path, write)
    except OSError as e:  # a full disk keeps no half-written array
      logging.info("Not caching the decoded %s split (%s); it is decoded every run.", split, e)
      return


def load(config, builder=None, with_train: bool = True, with_test: bool = True) -> Splits:
  """Loads the splits into memory (MNIST is 55 MB decoded; decode once, not every epoch).

  with_train=False (stream mode) leaves the train split in its files; with_test=False (a worker
  that does not evaluate) leaves the test split unread, and of gs:// data unfetched.
  """
  if builder is None:
    builder = prepare(config.dataset, config.data_dir, config.mnist_source_dir,
                      config.num_shards, config.image_size, config.eval_fraction)
  train_images = train_labels = None
  if with_train:
    fetch_records(builder, config.data_dir, "train")  # gs:// data: every file, as before
    train_images, train_labels = _load_split(builder, "train", config.train_examples)
  test_images = test_labels = None
  if with_test:
    fetch_records(builder, config.data_dir, "test")
    test_images, test_labels = _load_split(builder, "test", config.eval_examples)
  loaded = test_images if test_images is not None else train_images
  image_shape = tuple(loaded.shape[1:]) if loaded is not None else _fixed_image_shape(builder)
  label = builder.info.features["label"]
  return Splits(train_images, train_labels, test_images, test_labels,
                num_classes=label.num_classes, image_shape=image_shape,
                class_names=tuple(label.names))


def _fixed_image_shape(builder) -> tuple:
  shape = tuple(builder.info.features["image"].shape)
  if any(d is None for d in shape):
    raise errors.DataError(
        f"The {builder.name} images vary in size ({shape}); the model needs one size. For your "
        "own images, --dataset=image_folder:DIR with --image_size resizes them.")
  return tuple(int(d) for d in shape)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Every example once per epoch: the last global batch is padded (weight 0), never dropped."""
  return -(-num_examples // global_batch_size)


def check_divisible(global_batch_size: int, num_replicas: int) -> None:
  if global_batch_size % num_replicas:
    raise errors.ConfigError(
        f"--global_batch_size={global_batch_size} is not divisible by the {num_replicas} "
        f"replicas in sync: use a multiple of {num_replicas}, e.g. "
        f"{(global_batch_size // num_replicas + 1) * num_replicas}.")


def epoch_permutation(num_examples: int, seed: int, epoch) -> tf.Tensor:
  """The global example order of one epoch; every worker computes the same one."""
  keys = tf.random.stateless_uniform([num_examples], seed=tf.stack(
      [tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]), dtype=tf.float32)
  return tf.argsort(keys, stable=True)


def shard_indices(num_examples: int, global_batch_size: int, seed: int, epoch,
                  num_pipelines: int, pipeline_id: int, per_replica_batch: int) -> tf.Tensor:
  """[steps * local_replicas, per_replica_batch] example indices of one pipeline; -1 = padding.

  Global batch b is examples perm[b*G:(b+1)*G]; pipeline p takes its contiguous slice of it, so
  pipelines are disjoint, together complete, and all have the same number of steps.
  """
  steps = steps_per_epoch(num_examples, global_batch_size)
  local_replicas = global_batch_size // (num_pipelines * per_replica_batch)
  perm = epoch_permutation(num_examples, seed, epoch)
  padding = -tf.ones([steps * global_batch_size - num_examples], tf.int32)
  indices = tf.reshape(tf.concat([perm, padding], 0),
                       [steps, num_pipelines, local_replicas, per_replica_batch])
  return tf.reshape(indices[:, pipeline_id], [steps * local_replicas, per_replica_batch])


def no_autograph(fn):
  """fn, for tf.data to trace as it is: tf.data runs AutoGraph on every function it traces, and
  our input functions branch on Python values only, so converting them (parsing their source,
  writing a module to a temporary file) is start-up time and nothing else."""
  return tf.autograph.experimental.do_not_convert(fn)


def without_autotune_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Turns off tf.data's autotuning thread; AUTOTUNE sizes then stay at tf.data's defaults.

  Deleting an iterator waits out that thread's current sleep, which doubles up to 60 s (see
  distribute.input_iterator), after the last step. Both input modes use it; in memory the
  pipeline runs far faster than training needs (bench's input_headroom).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def train_dataset_fn(images: np.ndarray, labels: np.ndarray, global_batch_size: int, seed: int,
                     start_step: int = 0, total_steps: int = 0):
  """Returns the input function (InputContext -> dataset) for distribute.input_iterator.

  Batches of indices are built first and examples gathered per batch (batching before
  mapping). The order depends only on (seed, step), so a resumed run continues exactly where
  an uninterrupted one would be, without saving iterator state.
  """
  num_examples = len(images)
  steps = steps_per_epoch(num_examples, global_batch_size)
  start_epoch, offset = divmod(start_step, steps)
  end_epoch = max(start_epoch + 1, -(-max(total_steps, 1) // steps))

  # One host copy that every local pipeline reads: a copy per pipeline (each tf.constant
  # copies its array, and again onto a replica's own CPU device) took about a third of a second
  # of every run's start-up on full MNIST (bench/README.md). In host memory, where tf.data runs.
  with tf.device("CPU:0"):
    images_t = tf.constant(images)
    labels_t = tf.constant(labels)

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines

    @no_autograph
    def epoch_rows(epoch):
      return tf.data.Dataset.from_tensor_slices(shard_indices(
          num_examples, global_batch_size, seed, epoch, ctx.num_input_pipelines,
          ctx.input_pipeline_id, per_replica))

    @no_autograph
    def gather(index_row):
      valid = index_row >= 0
      safe = tf.maximum(index_row, 0)
      x = tf.cast(tf.gather(images_t, safe), tf.float32) / 255.0
      return x, tf.gather(labels_t, safe), tf.cast(valid, tf.float32)

    ds = tf.data.Dataset.range(start_epoch, end_epoch + 1).flat_map(epoch_rows)
    ds = ds.skip(offset * local_replicas)
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return without_autotune_thread(ds.prefetch(tf.data.AUTOTUNE))

  return dataset_fn


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int = 1000):
  """Test examples in fixed order, normalized like training."""
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
  ds = ds.map(no_autograph(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y)),
              num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
  return without_autotune_thread(ds)


def read_idx(path: str) -> np.ndarray:
  """Reads a gzip IDX file (the canonical MNIST format) into a numpy array."""
  import gzip
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def shard_lengths(builder, split: str = "train") -> tuple:
  """Examples per record file of the split, from the TFDS metadata."""
  return tuple(int(n) for n in builder.info.splits[split].shard_lengths)


def num_train_examples(builder, limit: int = 0) -> int:
  """Size of the train split from the TFDS metadata, without decoding anything."""
  total = builder.info.splits["train"].num_examples
  return min(total, limit) if limit else total


def check_batch_fits(global_batch_size: int, num_examples: int) -> None:
  """A global batch larger than the train split is a config error, found before any allocation."""
  if global_batch_size > num_examples:
    raise errors.ConfigError(
        f"--global_batch_size={global_batch_size} is larger than the {num_examples} training "
        f"examples: use at most {num_examples} (or more --train_examples).")


def choose_input_mode(config, builder) -> str:
  """in_memory or stream: --input_mode, or for auto the decoded size from the metadata."""
  if config.input_mode != "auto":
    logging.info("Input mode %s (--input_mode).", config.input_mode)
    return config.input_mode
  decoded_mb = decoded_train_mb(builder, config.train_examples)
  mode = "stream" if decoded_mb > config.in_memory_limit_mb else "in_memory"
  logging.info("Input mode %s: the decoded train split is about %.0f MB, %s "
               "--in_memory_limit_mb=%d.", mode, decoded_mb,
               "over" if mode == "stream" else "within", config.in_memory_limit_mb)
  return mode


def decoded_train_mb(builder, limit: int = 0) -> float:
  """What the decoded train split would take in memory, from the TFDS metadata alone."""
  shape = builder.info.features["image"].shape
  if any(d is None for d in shape):
    return float("inf")  # images of varying size cannot be held as one array anyway
  return num_train_examples(builder, limit) * (int(np.prod(shape)) + 4) / 2 ** 20


def record_source(builder, split: str = "train", data_dir: str = "", num_pipelines: int = 1,
                  pipeline_ids=(0,), examples_read: int = 0):
  """The split's record files, examples per file and decoder, for stream mode.

  Only the files that the input pipelines `pipeline_ids` (of num_pipelines) read need be here:
  of a gs:// data_dir, just those are fetched (every file when there are fewer files than
  pipelines, since then every pipeline reads every file). When these pipelines read at least
  all the examples of those files (examples_read), the files are decoded once, up front, into
  fixed-length records (trainer/data/decoded_records.py) instead of at every epoch.
  """
  from trainer.data import decoded_records
  from trainer import storage
  from trainer.data import stream
  info = builder.info.splits[split]
  features = builder.info.features

  image_shape = tuple(features["image"].shape)

  @no_autograph
  def decode(records):
    # TFDS stores the image encoded (PNG or JPEG) under "image" and the class under "label".
    parsed = tf.io.parse_example(records, {"image": tf.io.FixedLenFeature([], tf.string),
                                           "label": tf.io.FixedLenFeature([], tf.int64)})
    images = tf.map_fn(
        lambda encoded: tf.io.decode_image(encoded, channels=image_shape[-1],
                                           expand_animations=False),
        parsed["image"], fn_output_signature=tf.TensorSpec(image_shape, tf.uint8))
    return images, parsed["label"]

  mine = stream.files_read_by(len(info.filepaths), num_pipelines, pipeline_ids)
  if storage.is_gcs(data_dir) and len(info.filepaths) < num_pipelines:
    logging.info("Stream mode: %d %s record file(s) for %d input pipelines, so every pipeline "
                 "reads every file and this worker fetches them all.", len(info.filepaths),
                 split, num_pipelines)
  fetch_records(builder, data_dir, split, mine)
  for path in (info.filepaths[i] for i in mine):
    if not os.path.isfile(str(path)):
      raise errors.DataError(
          f"Record file {path} of the prepared {builder.name} {split} split is missing: prepare "
          "the dataset again (a new --data_dir, or delete the dataset's folder in it).")
  origins = ()
  if storage.is_gcs(data_dir):  # the files are local copies: messages name the objects
    origins = tuple(_remote_of(data_dir, staged_dir(data_dir), str(p)) for p in info.filepaths)
  source = stream.RecordSource(files=tuple(str(p) for p in info.filepaths),
                               counts=shard_lengths(builder, split),
                               image_shape=image_shape, decode=decode, origins=origins)
  return decoded_records.decoded_source(source, mine, examples_read)

"""--dataset as a prepared dataset: a TFDS dataset prepared once in --data_dir (MNIST from local
files, never TFDS's own download), or an image folder (trainer/data/image_folder.py)."""

import logging
import os
import re
import shutil
import socket
import urllib.parse
import urllib.request

from trainer import errors
from trainer.data import cache
from trainer.data import files
from trainer.data import image_folder
from trainer.data import mnist
from trainer.data import mnist_tfds
from trainer.data import staging
from trainer.data import tfds_metadata

# Other datasets are downloaded by TFDS: a TCP connect to each host, bounded, fails fast offline.
PROBE_TIMEOUT_S = 10.0


def prepare(dataset: str, data_dir: str, mnist_source_dir: str = "", num_shards: int = 0,
            image_size: int = 0, eval_fraction: float = 0.1):
  """Returns a prepared TFDS builder; TFDS never downloads MNIST itself.

  MNIST is built from local files: --mnist_source_dir, the vendored copy, or in an installed
  package (which has none) the four files fetched once by mnist.download_mnist, with bounded
  waits. gs:// inputs are staged to local disk first: a prepared TFDS directory in a bucket, or
  the four MNIST files. Without network, a download that is needed fails with DataError (exit 3).
  num_shards (0: TFDS's choice) sets how many record files each split gets when it is prepared
  here; stream mode shards by file, so it wants at least one per input pipeline, and a dataset
  already prepared with another count is a ConfigError (it is never prepared twice).
  image_folder:DIR datasets are prepared by trainer/data/image_folder.py (image_size,
  eval_fraction). A dataset already prepared is only read: data_dir need not be writable then.
  """
  given = data_dir
  data_dir = staging.stage(data_dir, "--data_dir")
  if mnist_source_dir:
    mnist_source_dir = staging.stage(mnist_source_dir, "--mnist_source_dir")
  if image_folder.is_image_folder(dataset):
    builder = image_folder.prepare(dataset, data_dir, image_size, eval_fraction, num_shards)
  else:
    builder = prepared_builder(dataset, data_dir) or _read_only_builder(dataset, data_dir)
    if builder is None:
      builder = _prepare_tfds(dataset, data_dir, mnist_source_dir, num_shards)
    else:
      _remove_leftovers_if_free(data_dir, dataset, str(builder.data_dir))
  _check_num_shards(builder, num_shards, given)
  return builder


def prepare_data(data) -> object:
  """prepare() of a DataConfig (trainer/config.py): --dataset, prepared as its flags say."""
  return prepare(data.dataset, data.data_dir, data.mnist_source_dir, data.num_shards,
                 data.image_size, data.eval_fraction)


def tfds_builder(dataset: str, data_dir: str):
  """TFDS's builder of `dataset` in data_dir (imports TFDS and its catalog); ConfigError unless
  it names an image classification dataset."""
  import tensorflow_datasets as tfds  # Heavy import; keep it off module import paths.
  from trainer import logs
  if not logs.verbose():
    tfds.disable_progress_bar()  # one log line per phase, not a progress bar per file
  try:
    # MNIST, the default, without first importing TFDS's catalog (a quarter of a second).
    builder = (tfds.image_classification.MNIST(data_dir=data_dir) if dataset == "mnist"
               else tfds.builder(dataset, data_dir=data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.ConfigError(f"--dataset={dataset!r} is not a TensorFlow Datasets name: use "
                             "mnist, fashion_mnist, kmnist, cifar10, ...") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise errors.ConfigError(f"--dataset={dataset!r} is not an image classification dataset "
                             "(needs 'image' and 'label' features).")
  return builder


def prepared_builder(dataset: str, data_dir: str):
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
  builder = tfds_metadata.open_read_only(os.path.join(folder, versions[0]))
  features = builder.info.features
  if builder.name != dataset or "image" not in features or "label" not in features:
    return None
  return builder


def download_dir(data_dir: str, dataset: str) -> str:
  """TFDS's download folder for one preparation of dataset (its own: several datasets may be
  prepared in one data_dir at once, each under its own lock)."""
  return os.path.join(data_dir, "downloads", ".preparing-" + re.sub(r"[^\w.-]+", "_", dataset))


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


def _download_endpoint(url: str) -> tuple:
  """(host, port) a download of url connects to: the proxy from *_PROXY variables, if any."""
  parsed = urllib.parse.urlsplit(url)
  proxy = urllib.request.getproxies().get(parsed.scheme)
  if proxy and not urllib.request.proxy_bypass(parsed.hostname):
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
  return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def _read_only_builder(dataset: str, data_dir: str):
  """TFDS's builder of a dataset prepared in a data_dir this process cannot write (in a layout
  that prepared_builder leaves to TFDS), or None: preparing needs a writable data_dir."""
  if not os.path.isdir(data_dir) or os.access(data_dir, os.W_OK):
    return None
  builder = tfds_builder(dataset, data_dir)
  return builder if builder.is_prepared() else None


def _prepare_tfds(dataset: str, data_dir: str, mnist_source_dir: str, num_shards: int):
  """Prepares a TFDS dataset in data_dir under its lock (unless another process just did).

  TFDS downloads into a folder of this dataset's own (download_dir), removed once the dataset
  is prepared or the preparation failed, and at the next preparation after a killed one, with
  TFDS's unfinished incomplete.* folder: a prepared data_dir holds the records alone.
  """
  files.check_writable(data_dir)
  builder = tfds_builder(dataset, data_dir)
  with files.lock(data_dir, dataset):
    _remove_leftovers(data_dir, dataset, str(builder.data_dir))
    if builder.is_prepared():
      # Built anew: a builder made before another process prepared the data under this lock
      # has empty metadata (no splits).
      return tfds_builder(dataset, data_dir)
    if dataset == "mnist":
      return _prepare_mnist(builder, data_dir, mnist_source_dir, num_shards)
    check_download_hosts(dataset, (builder.url_infos or {}).keys())
    downloads = download_dir(data_dir, dataset)
    try:
      import tensorflow_datasets as tfds
      builder.download_and_prepare(
          download_dir=downloads, download_config=tfds.download.DownloadConfig(
              num_shards=num_shards or None,
              # Where TFDS looks for manual downloads by default: download_dir/manual
              # (tensorflow_datasets/core/dataset_builder.py, _make_download_manager).
              manual_dir=os.path.join(data_dir, "downloads", "manual")))
    except Exception as e:  # TFDS raises many types; all mean the data cannot be had.
      raise errors.DataError(f"Could not prepare --dataset={dataset} in --data_dir={data_dir}: "
                             f"{e}") from e
    finally:
      shutil.rmtree(downloads, ignore_errors=True)
  return builder


def _prepare_mnist(builder, data_dir: str, mnist_source_dir: str, num_shards: int):
  """TFDS's mnist written from the four local files (trainer/data/mnist_tfds.py), and the
  decoded cache of each split kept from the same arrays (no PNG decoded back). The caller
  holds the dataset's lock."""
  source = mnist.source_dir(data_dir, mnist_source_dir)
  mnist.verify_mnist_files(source)
  logging.info("Preparing TFDS mnist in %s from %s", data_dir, source)
  try:
    arrays = mnist_tfds.write(builder, source, num_shards)
  except Exception as e:  # OSError, or TensorFlow's own error types for its writer
    raise errors.DataError(f"Could not prepare --dataset=mnist in --data_dir={data_dir}: "
                           f"{e}") from e
  builder = tfds_builder("mnist", data_dir)
  for split, (images, labels) in arrays.items():
    # The cache holds a split in the order TFDS reads it: one file's order; several files
    # TFDS interleaves (as_dataset), and those are decoded once by cache.load_split.
    if len(builder.info.splits[split].filepaths) == 1:
      cache.save(builder, split, images, labels)
  return builder


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
  downloads = download_dir(data_dir, dataset)
  return found + ([downloads] if os.path.lexists(downloads) else [])


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
    with files.lock(data_dir, dataset, timeout_s=5.0):
      _remove_leftovers(data_dir, dataset, version_dir)
  except (errors.DataError, OSError):
    pass  # a preparation of another version holds it, or the folder cannot be written


def _check_num_shards(builder, num_shards: int, data_dir: str) -> None:
  """--num_shards applies when a dataset is prepared; one prepared with another count is an
  error, not silently read (stream mode's sharding depends on the count)."""
  splits = builder.info.splits
  if not num_shards or "train" not in splits:
    return
  count = len(splits["train"].filepaths)
  if count != num_shards:
    raise errors.ConfigError(
        f"--num_shards={num_shards}, but --data_dir={data_dir} already holds {builder.name} "
        f"prepared with {count} train record file(s), and --num_shards applies only when a "
        f"dataset is prepared. Pass --num_shards={count} (or none) to train on those files, or "
        f"a new --data_dir to prepare {num_shards}.")

"""Classifies images with an exported SavedModel: `python -m trainer.predict --model_dir DIR a.png`
(or `mnist-predict`).

What is wrong with the input (no export yet, a damaged or incomplete export, a bucket that does
not exist, a path that is no image file) exits with a documented code (trainer/errors.py) and one
message naming the file and the fix; only a bug ends in a traceback.
"""

import dataclasses
import os
import re
import shutil
import sys

from absl import app
from absl import flags

from trainer import cli
from trainer import errors
from trainer import startup

FLAGS = flags.FLAGS
# The way back from a damaged or incomplete export, in every message about one. Rerunning the
# training command of a finished run restores its last checkpoint, trains no further step and
# exports again (trainer/train.py _finish; tests/predict_test.py test_rerun_repairs_the_export).
REEXPORT = ("export it again: rerun the training command with the same --model_dir (a finished "
            "run restores its last checkpoint and only exports again), or restore the export "
            "from where you published it")
# A SavedModel's weights: TensorFlow's checkpoint bundle, an index and data shards named as
# DataFilename in tensorflow/core/util/tensor_bundle/tensor_bundle.cc writes them.
_VARIABLES = "variables"
_INDEX = "variables.index"
_SHARD = re.compile(r"variables\.data-(\d{5})-of-(\d{5})")


def _define_flags() -> None:
  """Defined only when run as a program: importing this module next to trainer.task (which
  defines --model_dir too) must not raise DuplicateFlagError."""
  flags.DEFINE_string("model_dir", None, "Training output dir (its export/ is used) or an export.")
  flags.DEFINE_integer("samples", 0, "Also write this many MNIST test digits as PNGs into "
                       "model_dir/samples and classify them (make predict uses 5).")


def predict(model_dir: str, paths) -> list:
  """Returns (path, class, probability) per image."""
  check_paths(paths)
  exported = find_export(model_dir)
  try:
    return classify(exported, paths)
  finally:
    exported.close()


@dataclasses.dataclass(frozen=True)
class Export:
  """An export ready to load: `path` is a local directory, `source` where the export was found
  (the gs:// folder a download came from), which messages name. A download is this process's
  own copy, removed by close()."""

  path: str
  source: str
  downloaded: bool = False

  def name(self, local_path: str) -> str:
    """local_path (inside `path`) as the user knows it: under `source`."""
    from trainer import storage
    rel = os.path.relpath(local_path, self.path)
    return self.source if rel == "." else storage.join(self.source, *rel.split(os.sep))

  def close(self) -> None:
    if self.downloaded:
      shutil.rmtree(self.path, ignore_errors=True)


def find_export(model_dir: str) -> Export:
  """The export in model_dir/export (or model_dir itself), checked to have every file of a
  SavedModel; a gs:// export is downloaded, and only once marked complete. Needs no TensorFlow,
  so a missing export, bucket or weights folder fails in a fraction of a second."""
  from trainer import storage
  exported = _download_export(model_dir) if storage.is_gcs(model_dir) else _local_export(model_dir)
  try:
    _check_files(exported)
  except BaseException:
    exported.close()
    raise
  return exported


def _local_export(model_dir: str) -> Export:
  candidate = os.path.join(model_dir, "export")
  export_dir = candidate if os.path.isdir(candidate) else model_dir
  if os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
    return Export(export_dir, export_dir)
  if export_dir == candidate:  # training wrote this folder (atomically): something removed it
    raise errors.DataError(f"{candidate} has no saved_model.pb, so the export is incomplete: "
                           f"{REEXPORT}.")
  where = "does not exist" if not os.path.exists(model_dir) else "has no SavedModel"
  raise errors.DataError(f"--model_dir={model_dir} {where} (expected {candidate}/saved_model.pb): "
                         "train first with make train, or fix --model_dir.")


def _download_export(model_dir: str) -> Export:
  """The complete export under model_dir (its export/ folder or itself), downloaded."""
  import tempfile
  from trainer import outputs
  from trainer import storage
  marker = outputs.EXPORT_MARKER
  # A missing or forbidden bucket answers a request for one object as if the object were
  # missing, or with StorageError (exit 6) from trainer/storage/gcs.py; _no_export() tells them apart.
  remotes = [storage.join(model_dir, "export"), model_dir]
  remote = next((r for r in remotes if storage.is_complete(r, marker)), None)
  if remote is None:
    _no_export(model_dir, marker)
  exported = Export(tempfile.mkdtemp(prefix="trainer-predict-"), remote, downloaded=True)
  try:
    storage.download_dir(remote, exported.path, marker=marker)
    _check_manifest(exported, marker)
  except FileNotFoundError:
    exported.close()
    raise errors.DataError(f"{remote} changed while it was downloaded (a new export being "
                           "published?): run predict again once training has finished.") from None
  except BaseException:
    exported.close()
    raise
  return exported


def _no_export(model_dir: str, marker: str) -> None:
  """Raises why a gs:// model_dir has no complete export. Listing it is a request on the bucket
  itself, which GCS answers with 404 for a missing bucket and 403 without access: StorageError
  naming the bucket and the fix (trainer/storage/gcs.py errors_of), exit 6."""
  from trainer import storage
  if not storage.listdir(model_dir):
    raise errors.DataError(f"--model_dir={model_dir} holds nothing: fix --model_dir, or train "
                           "first (training publishes the export there when it finishes).")
  raise errors.DataError(
      f"--model_dir={model_dir} has no complete export yet (no "
      f"{storage.join(model_dir, 'export', marker)}): training publishes it, that marker last, "
      "when it finishes: wait for training to finish (or, if it ran with --export=false, rerun "
      "it with --export).")


def _check_manifest(exported: Export, marker: str) -> None:
  """Every file the marker's manifest lists (storage.upload_dir writes it) arrived whole."""
  import json
  marker_path = os.path.join(exported.path, marker)
  try:
    with open(marker_path) as f:
      listed = json.load(f)["files"]
  except (ValueError, KeyError, TypeError):
    raise errors.DataError(f"{exported.name(marker_path)} is not the manifest that training "
                           f"writes: {REEXPORT}.") from None
  for entry in listed:
    local = os.path.join(exported.path, *entry["path"].split("/"))
    size = os.path.getsize(local) if os.path.isfile(local) else None
    if size != entry["size"]:
      found = "is missing" if size is None else f"has {size} bytes"
      raise errors.DataError(
          f"{exported.name(local)} {found} where {marker} lists {entry['size']} bytes, so the "
          f"export was changed after it was published: {REEXPORT}.")


def _check_files(exported: Export) -> None:
  """The SavedModel's weights are all there: variables/ with its index and every data shard.
  (Whether they are whole is for TensorFlow's checksums: see load_serving.)"""
  folder = os.path.join(exported.path, _VARIABLES)
  if not os.path.isdir(folder):
    raise errors.DataError(f"{exported.name(folder)}/ is missing (a SavedModel keeps its weights "
                           f"there), so the export is incomplete: {REEXPORT}.")
  names = set(os.listdir(folder))
  counts = {int(m.group(2)) for m in map(_SHARD.fullmatch, names) if m}
  count = max(counts) if counts else 1
  expected = [_INDEX] + [f"variables.data-{i:05d}-of-{count:05d}" for i in range(count)]
  missing = [n for n in expected if n not in names]
  if missing:
    named = ", ".join(exported.name(os.path.join(folder, n)) for n in missing)
    raise errors.DataError(f"{named} {'is' if len(missing) == 1 else 'are'} missing, so the "
                           f"export is incomplete: {REEXPORT}.")


def check_paths(paths) -> None:
  """Paths that are no file are named before TensorFlow's seconds of start-up."""
  local = [p for p in paths if "://" not in p]
  folders = [p for p in local if os.path.isdir(p)]
  if folders:
    raise errors.DataError(
        f"{', '.join(folders)}: a directory, not an image: pass the PNG or JPEG files in it "
        f"(e.g. {os.path.join(folders[0], '*.png')}).")
  missing = [p for p in local if not os.path.isfile(p)]
  if missing:
    raise errors.DataError(f"No such image file (PNG or JPEG): {', '.join(missing)}")


def load_images(paths, image_shape):
  """Decodes PNGs (or JPEGs) to uint8 [N, H, W, C] in the model's channel count, resizing when
  needed."""
  import tensorflow as tf
  height, width, channels = image_shape
  out = []
  for path in paths:
    try:
      image = _decode(tf.io.read_file(path), channels)
    except tf.errors.OpError as e:  # unreadable (NotFound, PermissionDenied) or not an image
      raise errors.DataError(f"Cannot read PNG or JPEG {path}: {e.message}") from None
    if image.shape[:2] != (height, width):
      image = tf.cast(tf.image.resize(image, (height, width)), tf.uint8)
    out.append(image)
  return tf.stack(out)


def _decode(contents, channels: int):
  """The image with `channels` channels. TensorFlow has libjpeg convert a CMYK or YCCK JPEG (4
  components) to RGB itself, but asks libjpeg for grayscale directly, which libjpeg cannot make
  from those ("Unsupported color conversion request"; UncompressLow in
  tensorflow/core/lib/jpeg/jpeg_mem.cc): such a JPEG is decoded to RGB, then made gray. Every
  other image decodes as TensorFlow decodes it."""
  import tensorflow as tf
  if channels == 1 and bool(tf.io.is_jpeg(contents)):
    components = int(tf.io.extract_jpeg_shape(contents)[2])
    if components == 4:
      return tf.image.rgb_to_grayscale(tf.io.decode_jpeg(contents, channels=3))
  return tf.io.decode_image(contents, channels=channels, expand_animations=False)


def write_samples(out_dir: str, count: int) -> list:
  """Writes the first `count` vendored MNIST test digits as PNGs named by their true label."""
  import tensorflow as tf
  from trainer import data
  source = data.vendored_mnist_dir()
  if not os.path.isdir(source):
    raise errors.DataError(
        f"--samples takes digits from the repository's MNIST copy ({source}), which an installed "
        "package does not carry: classify your own PNG files instead (python -m trainer.predict "
        "--model_dir=DIR a.png ...).")
  images = data.read_idx(os.path.join(source, "t10k-images-idx3-ubyte.gz"))
  labels = data.read_idx(os.path.join(source, "t10k-labels-idx1-ubyte.gz"))
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i in range(count):
    path = os.path.join(out_dir, f"test{i:04d}_label{labels[i]}.png")
    tf.io.write_file(path, tf.io.encode_png(images[i][..., None]))
    paths.append(path)
  return paths


def class_names(exported: Export) -> list:
  """Label i's name at index i, from the export's class_names.json ([] when it has none)."""
  import json
  path = os.path.join(exported.path, "class_names.json")  # export.CLASS_NAMES, without TensorFlow
  try:
    with open(path) as f:
      names = json.load(f)
  except FileNotFoundError:
    return []
  except (ValueError, UnicodeDecodeError):
    raise errors.DataError(f"{exported.name(path)} is not valid JSON: {REEXPORT}.") from None
  return [str(n) for n in names] if isinstance(names, list) else []


def describe(cls: int, names) -> str:
  """'class 3', or 'class 3 (cat)' when the class has a name other than its number."""
  name = names[cls] if cls < len(names) else ""
  return f"class {cls}" + (f" ({name})" if name and name != str(cls) else "")


def classify(exported: Export, paths) -> list:
  """predict() for an export find_export() returned."""
  serve = load_serving(exported)
  image_shape = serve.structured_input_signature[1]["images"].shape[1:]
  out = serve(images=load_images(paths, image_shape))
  classes = out["classes"].numpy()
  probabilities = out["probabilities"].numpy()
  return [(p, int(c), float(probabilities[i, c])) for i, (p, c) in enumerate(zip(paths, classes))]


def load_serving(exported: Export):
  """The export's serving function; DataError naming the damaged file and the fix when the
  export cannot be loaded.

  TensorFlow itself notices a damaged weights file: every tensor in the bundle carries a CRC32C
  of its bytes that restoring checks (BundleReader::GetValue in
  tensorflow/core/util/tensor_bundle/tensor_bundle.cc, "Checksum does not match"), and loading
  restores every tensor the export holds (its weights and its object graph), which cover the
  data file end to end. So a same-size bit flip anywhere in it fails the load, as a truncation
  does. saved_model.pb has no checksum: a damaged one fails to parse or to load, or, where the
  damage hits bytes the load does not use (names, debug information), loads as before.
  """
  import tensorflow as tf
  from google.protobuf import message
  from trainer import export as export_lib
  try:
    loaded = tf.saved_model.load(exported.path)
  except (tf.errors.OpError, OSError, IndexError, ValueError, message.DecodeError) as e:
    # IndexError: TensorFlow's checkpoint reader on a data file shorter than its index says.
    raise errors.DataError(_load_failure(exported, e)) from None
  if export_lib.SIGNATURE not in loaded.signatures:
    raise errors.DataError(
        f"{exported.source} has no {export_lib.SIGNATURE!r} signature (it has "
        f"{sorted(loaded.signatures) or 'none'}), so trainer.export did not write it, or it was "
        f"damaged: {REEXPORT}.")
  return loaded.signatures[export_lib.SIGNATURE]


def _load_failure(exported: Export, error: Exception) -> str:
  damaged, reason = _damaged_file(exported)
  if damaged:
    reason = reason.replace(exported.path, exported.source)
    return (f"{exported.name(damaged)} is damaged ({reason}), so the export {exported.source} "
            f"cannot be loaded: {REEXPORT}.")
  detail = _first_line(error).replace(exported.path, exported.source)
  return f"The export {exported.source} cannot be loaded ({detail}): {REEXPORT}."


def _damaged_file(exported: Export):
  """(local path, what is wrong) of the first file that does not read back whole: saved_model.pb
  must parse, the bundle's index must open and each of its tensors must pass its checksum;
  (None, None) when all do. Runs only after a load failed."""
  import tensorflow as tf
  from google.protobuf import message
  from tensorflow.core.protobuf import saved_model_pb2
  pb = os.path.join(exported.path, "saved_model.pb")
  try:
    with open(pb, "rb") as f:
      parsed = saved_model_pb2.SavedModel.FromString(f.read())
  except (OSError, message.DecodeError) as e:
    return pb, f"not a SavedModel protocol buffer: {_first_line(e)}"
  if not parsed.meta_graphs:  # an empty file parses, as an empty message
    return pb, "it holds no MetaGraph"
  folder = os.path.join(exported.path, _VARIABLES)
  try:
    reader = tf.train.load_checkpoint(os.path.join(folder, "variables"))
  except Exception as e:  # pylint: disable=broad-except  (any failure to open it is the finding)
    return os.path.join(folder, _INDEX), _first_line(e)
  shards = sorted(n for n in os.listdir(folder) if _SHARD.fullmatch(n))
  data = os.path.join(folder, shards[0] if len(shards) == 1 else "variables.data-*")
  for key in sorted(reader.get_variable_to_dtype_map()):
    try:
      reader.get_tensor(key)
    except Exception as e:  # pylint: disable=broad-except
      return data, f"tensor {key}: {_first_line(e)}"
  return None, None


def _first_line(error: Exception) -> str:
  text = getattr(error, "message", None) or str(error) or type(error).__name__
  return text.strip().splitlines()[0]


def main(argv):
  paths = list(argv[1:])
  try:
    if not FLAGS.model_dir:
      raise errors.ConfigError("--model_dir is required (the training output directory).")
    if not paths and not FLAGS.samples:
      raise errors.ConfigError("Give PNG files to classify, or --samples=N.")
    check_paths(paths)
    exported = find_export(FLAGS.model_dir)
    try:
      if FLAGS.samples:
        from trainer import storage
        sample_root = (os.path.join(os.getcwd(), "samples") if storage.is_gcs(FLAGS.model_dir)
                       else os.path.join(FLAGS.model_dir, "samples"))
        paths += write_samples(sample_root, FLAGS.samples)
      names = class_names(exported)
      for path, cls, probability in classify(exported, paths):
        print(f"{path}\t{describe(cls, names)}\tp={probability:.4f}")
    finally:
      exported.close()
  except errors.TrainerError as e:
    sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n")
    sys.exit(e.exit_code)


if __name__ == "__main__":
  startup.set_tensorflow_environment()  # before anything can load TensorFlow
  startup.skip_plotting_imports()  # Keras' plotting helpers: 0.9 s, never called here
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)

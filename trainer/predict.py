"""Classifies PNG digits with an exported SavedModel: `python -m trainer.predict --model_dir DIR a.png`."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app
from absl import flags

from trainer import cli
from trainer import errors

FLAGS = flags.FLAGS
def _define_flags() -> None:
  """Defined only when run as a program: importing this module next to trainer.task (which
  defines --model_dir too) must not raise DuplicateFlagError."""
  flags.DEFINE_string("model_dir", None, "Training output dir (its export/ is used) or an export.")
  flags.DEFINE_integer("samples", 0, "Also write this many MNIST test digits as PNGs into "
                       "model_dir/samples and classify them (make predict uses 5).")


def find_export(model_dir: str) -> str:
  """The local export directory holding saved_model.pb; a gs:// export is downloaded only when
  marked complete. Needs no TensorFlow, so a missing export fails in a fraction of a second."""
  from trainer import storage
  if storage.is_gcs(model_dir):
    export_dir = _download_export(model_dir)
  else:
    candidate = os.path.join(model_dir, "export")
    export_dir = candidate if os.path.isdir(candidate) else model_dir
  if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
    raise errors.DataError(f"--model_dir={model_dir} has no SavedModel (expected "
                           f"{export_dir}/saved_model.pb): train first with make train.")
  return export_dir


def _download_export(model_dir: str) -> str:
  import tempfile
  from trainer import outputs
  from trainer import storage
  marker = outputs.EXPORT_MARKER
  for remote in (storage.join(model_dir, "export"), model_dir):
    if storage.is_complete(remote, marker, verify_files=True):
      local = tempfile.mkdtemp(prefix="trainer-predict-")
      storage.download_dir(remote, local, marker=marker)
      return local
  raise errors.DataError(f"--model_dir={model_dir} has no complete export (no {marker} "
                         "marker): wait for training to finish.")


def check_paths(paths) -> None:
  """Missing local files are named before TensorFlow's seconds of start-up."""
  missing = [p for p in paths if "://" not in p and not os.path.isfile(p)]
  if missing:
    raise errors.DataError(f"No such PNG file: {', '.join(missing)}")


def load_images(paths, image_shape):
  """Decodes PNGs (or JPEGs) to uint8 [N, H, W, C], resizing when needed."""
  import tensorflow as tf
  height, width, channels = image_shape
  out = []
  for path in paths:
    try:
      image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                 expand_animations=False)
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
      raise errors.DataError(f"Cannot read PNG or JPEG {path}: {e.message}") from None
    if image.shape[:2] != (height, width):
      image = tf.cast(tf.image.resize(image, (height, width)), tf.uint8)
    out.append(image)
  return tf.stack(out)


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


def predict(model_dir: str, paths) -> list:
  """Returns (path, class, probability) per image."""
  return classify(find_export(model_dir), paths)


def class_names(export_dir: str) -> list:
  """Label i's name at index i, from the export's class_names.json ([] when it has none)."""
  import json
  path = os.path.join(export_dir, "class_names.json")  # export.CLASS_NAMES, without TensorFlow
  try:
    with open(path) as f:
      names = json.load(f)
  except FileNotFoundError:
    return []
  except ValueError:
    raise errors.DataError(f"{path} is not valid JSON: export the model again.") from None
  return [str(n) for n in names] if isinstance(names, list) else []


def describe(cls: int, names) -> str:
  """'class 3', or 'class 3 (cat)' when the class has a name other than its number."""
  name = names[cls] if cls < len(names) else ""
  return f"class {cls}" + (f" ({name})" if name and name != str(cls) else "")


def classify(export_dir: str, paths) -> list:
  """predict() for an export directory find_export() returned."""
  import tensorflow as tf
  serve = tf.saved_model.load(export_dir).signatures["serving_default"]
  image_shape = serve.structured_input_signature[1]["images"].shape[1:]
  out = serve(images=load_images(paths, image_shape))
  classes = out["classes"].numpy()
  probabilities = out["probabilities"].numpy()
  return [(p, int(c), float(probabilities[i, c])) for i, (p, c) in enumerate(zip(paths, classes))]


def main(argv):
  paths = list(argv[1:])
  try:
    if not FLAGS.model_dir:
      raise errors.ConfigError("--model_dir is required (the training output directory).")
    if not paths and not FLAGS.samples:
      raise errors.ConfigError("Give PNG files to classify, or --samples=N.")
    check_paths(paths)
    export_dir = find_export(FLAGS.model_dir)
    if FLAGS.samples:
      from trainer import storage
      sample_root = (os.path.join(os.getcwd(), "samples") if storage.is_gcs(FLAGS.model_dir)
                     else os.path.join(FLAGS.model_dir, "samples"))
      paths += write_samples(sample_root, FLAGS.samples)
    names = class_names(export_dir)
    for path, cls, probability in classify(export_dir, paths):
      print(f"{path}\t{describe(cls, names)}\tp={probability:.4f}")
  except errors.TrainerError as e:
    sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n")
    sys.exit(e.exit_code)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)

"""--dataset=image_folder:DIR: preparing a folder of images, its bad-data errors, training on it."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from trainer import config as config_lib
from trainer import data
from trainer import errors
from trainer.data import cache
from trainer.data import image_folder
from trainer.data import image_scan

# Easy to learn: each class is one dominant colour with noise.
COLOURS = {"blue": (20, 30, 220), "green": (30, 200, 40), "red": (220, 30, 20)}


def _image(rng, colour, size):
  noise = rng.integers(-30, 30, size=(*size, 3))
  return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def _write(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if path.endswith(".png"):
    encoded = tf.io.encode_png(image)
  else:
    encoded = tf.io.encode_jpeg(image, quality=95)
  tf.io.write_file(path, encoded)


def make_folder(root, per_class=20, size=(20, 20), classes=COLOURS, seed=0):
  """root/CLASS/imgNNN.{png,jpg}: PNGs and JPEGs mixed, every image of the given size."""
  rng = np.random.default_rng(seed)
  for name, colour in classes.items():
    for i in range(per_class):
      suffix = "png" if i % 2 else "jpg"
      _write(os.path.join(root, name, f"img{i:03d}.{suffix}"), _image(rng, colour, size))
  return str(root)


def _prepare(folder, data_dir, **kwargs):
  return data.prepare(f"image_folder:{folder}", str(data_dir), **kwargs)


def _test_split(builder):
  """(images, labels) of the prepared test split, in its stored order."""
  return cache.decode_split(builder, "test")


# ---- preparation: deterministic split, prepared once, re-prepared on change ----


def test_prepare_writes_both_splits_with_class_names(tmp_path):
  folder = make_folder(tmp_path / "images")
  builder = _prepare(folder, tmp_path / "tfds", num_shards=2)
  info = builder.info
  assert info.features["label"].names == ["blue", "green", "red"]
  assert tuple(info.features["image"].shape) == (20, 20, 3)
  train, test = info.splits["train"].num_examples, info.splits["test"].num_examples
  assert train + test == 60 and 1 <= test <= 15
  assert len(info.splits["train"].filepaths) == 2  # --num_shards record files per split
  split_of = image_scan.split_of
  expected = sum(split_of(f"{c}/{n}", 0.1) == "test"
                 for c in COLOURS for n in os.listdir(os.path.join(folder, c)))
  assert test == expected
  splits = data.load(config_lib.Config(epochs=1, dataset=f"image_folder:{folder}",
                                       data_dir=str(tmp_path / "tfds")).data, builder)
  assert splits.image_shape == (20, 20, 3) and splits.num_classes == 3
  assert splits.class_names == ("blue", "green", "red")
  assert splits.train_images.dtype == np.uint8 and len(splits.train_labels) == train


def test_split_depends_on_the_path_only(tmp_path):
  folder = make_folder(tmp_path / "images", per_class=30)
  _, before = image_scan.scan(folder, 0.2)
  # Another order of creation, more images: the images already there keep their split.
  make_folder(tmp_path / "images", per_class=40, seed=1)
  _, after = image_scan.scan(folder, 0.2)
  split_before = {i.rel: i.split for i in before}
  split_after = {i.rel: i.split for i in after}
  assert all(split_after[rel] == split for rel, split in split_before.items())
  assert 0.1 < sum(s == "test" for s in split_after.values()) / len(split_after) < 0.3
  # Two preparations of the same folder hold the same test examples in the same order.
  first = _test_split(_prepare(folder, tmp_path / "a", eval_fraction=0.2))
  second = _test_split(_prepare(folder, tmp_path / "b", eval_fraction=0.2))
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])


def test_train_and_test_subfolders_are_the_splits(tmp_path):
  make_folder(tmp_path / "images" / "train", per_class=6, classes={"a": (0, 0, 0),
                                                                   "b": (255, 255, 255)})
  make_folder(tmp_path / "images" / "test", per_class=2, classes={"a": (0, 0, 0),
                                                                  "b": (255, 255, 255)})
  builder = _prepare(tmp_path / "images", tmp_path / "tfds")
  assert builder.info.splits["train"].num_examples == 12
  assert builder.info.splits["test"].num_examples == 4
  assert builder.info.features["label"].names == ["a", "b"]


def test_prepared_once_and_again_after_a_change(tmp_path, monkeypatch):
  folder = make_folder(tmp_path / "images", per_class=8)
  first = _prepare(folder, tmp_path / "tfds")
  prepared = os.listdir(tmp_path / "tfds" / "image_folder")

  def no_second_preparation(*args):
    raise AssertionError("prepared again although nothing changed")

  with monkeypatch.context() as m:
    m.setattr(image_folder, "_write", no_second_preparation)
    again = _prepare(folder, tmp_path / "tfds")
  assert str(again.data_dir) == str(first.data_dir)
  assert os.listdir(tmp_path / "tfds" / "image_folder") == prepared

  # A changed image (same name) makes a new preparation; the old one is never read for it.
  rng = np.random.default_rng(5)
  _write(os.path.join(folder, "red", "img001.png"), _image(rng, (255, 255, 255), (20, 20)))
  changed = _prepare(folder, tmp_path / "tfds")
  assert str(changed.data_dir) != str(first.data_dir)
  # So does another --image_size or --eval_fraction.
  resized = _prepare(folder, tmp_path / "tfds", image_size=8)
  assert tuple(resized.info.features["image"].shape) == (8, 8, 3)
  assert str(resized.data_dir) not in (str(first.data_dir), str(changed.data_dir))


def test_interrupted_preparation_is_never_used(tmp_path, monkeypatch):
  folder = make_folder(tmp_path / "images", per_class=8)
  real_write = image_folder._write  # pylint: disable=protected-access

  def write_then_die(*args):
    real_write(*args)
    raise KeyboardInterrupt  # killed after the records, before the marker and the rename

  with monkeypatch.context() as m:
    m.setattr(image_folder, "_write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
      _prepare(folder, tmp_path / "tfds")
  root = tmp_path / "tfds" / "image_folder"
  assert [n for n in os.listdir(root) if not n.startswith(".")] == []
  # A target without its marker (as if renamed by hand) is prepared again, not read.
  builder = _prepare(folder, tmp_path / "tfds")
  target = os.path.dirname(os.path.dirname(str(builder.data_dir)))
  os.remove(os.path.join(target, image_folder.PREPARED_MARKER))
  rebuilt = _prepare(folder, tmp_path / "tfds")
  assert os.path.isfile(os.path.join(target, image_folder.PREPARED_MARKER))
  assert rebuilt.info.splits["train"].num_examples == builder.info.splits["train"].num_examples


def test_hidden_entries_are_not_classes(tmp_path):
  folder = make_folder(tmp_path / "images", per_class=4, classes={"a": (0, 0, 0),
                                                                  "b": (255, 255, 255)})
  os.makedirs(os.path.join(folder, ".ipynb_checkpoints"))
  for path in (".DS_Store", "a/.DS_Store", "README.txt"):
    with open(os.path.join(folder, path), "w") as f:
      f.write("x")
  class_names, images = image_scan.scan(folder, 0.5)
  assert class_names == ["a", "b"] and len(images) == 8


def test_grayscale_folder_keeps_one_channel_and_resizes(tmp_path):
  rng = np.random.default_rng(0)
  for name, level in (("dark", 30), ("light", 220)):
    for i in range(10):
      image = np.clip(level + rng.integers(-20, 20, size=(12 + i, 15, 1)), 0, 255)
      _write(str(tmp_path / "gray" / name / f"{i}.png"), image.astype(np.uint8))
  builder = _prepare(tmp_path / "gray", tmp_path / "tfds", image_size=10)
  assert tuple(builder.info.features["image"].shape) == (10, 10, 1)


# ---- bad data: DataError (exit 3) naming the file or folder, before training ----


def _corrupt(folder):
  path = os.path.join(folder, "red", "img003.png")
  with open(path, "wb") as f:
    f.write(b"this is not an image")
  return path


def _truncated(folder, name="img003.png", keep=0.5):
  path = os.path.join(folder, "red", name)
  with open(path, "rb") as f:
    contents = f.read()
  with open(path, "wb") as f:
    f.write(contents[:int(len(contents) * keep)])  # the header is intact, pixels are cut off
  return path


def _truncated_jpeg(folder):
  return _truncated(folder, "img004.jpg", keep=0.9)  # a JPEG's header is most of a small one


def _mixed_sizes(folder):
  path = os.path.join(folder, "green", "img004.jpg")
  _write(path, np.zeros((24, 20, 3), np.uint8))
  return path


def _empty_class(folder):
  path = os.path.join(folder, "purple")
  os.makedirs(path)
  return path


def _stray_file(folder):
  path = os.path.join(folder, "blue", "notes.txt")
  with open(path, "w") as f:
    f.write("hello")
  return path


def _nested_folder(folder):
  path = os.path.join(folder, "blue", "more")
  _write(os.path.join(path, "x.png"), np.zeros((20, 20, 3), np.uint8))
  return path


def _one_class(folder):
  for name in ("blue", "green"):
    for f in os.listdir(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name, f))
    os.rmdir(os.path.join(folder, name))
  return "only one class folder (red)"


@pytest.mark.parametrize("damage, fix", [
    (_corrupt, "replace it"), (_truncated, "Invalid PNG data"), (_truncated_jpeg, "Invalid JPEG"),
    (_mixed_sizes, "--image_size=N"),
    (_empty_class, "holds no images"), (_stray_file, "not a JPEG or PNG"),
    (_nested_folder, "classes are one level deep"), (_one_class, "at least two"),
])
def test_bad_data_is_a_data_error_naming_it(tmp_path, damage, fix):
  folder = make_folder(tmp_path / "images", per_class=6)
  named = damage(folder)
  with pytest.raises(errors.DataError) as raised:
    _prepare(folder, tmp_path / "tfds")
  assert named in str(raised.value) and fix in str(raised.value)
  assert raised.value.exit_code == errors.EXIT_DATA
  root = tmp_path / "tfds" / "image_folder"
  assert [n for n in os.listdir(root) if not n.startswith(".")] == [], "nothing half-prepared"


def _dangling_link(folder):
  link = os.path.join(folder, "red", "gone.png")
  os.symlink(os.path.join(folder, "red", "moved-away.png"), link)
  return f"{link} is a broken symbolic link"


def _folder_link_loop(folder):
  link = os.path.join(folder, "red", "again")
  os.symlink("..", link)  # a link to an ancestor: walking it never ends
  return f"{link} is a symbolic link loop"


def _file_link_loop(folder):
  a, b = os.path.join(folder, "red", "a.png"), os.path.join(folder, "red", "b.png")
  os.symlink(b, a)
  os.symlink(a, b)
  return "is a symbolic link loop"


@pytest.mark.parametrize("damage", [_dangling_link, _folder_link_loop, _file_link_loop])
def test_bad_symbolic_links_are_data_errors_naming_them(tmp_path, damage):
  """Issue 33: a dangling link or a link loop ended in a traceback (exit 1)."""
  folder = make_folder(tmp_path / "images", per_class=6)
  named = damage(folder)
  with pytest.raises(errors.DataError) as raised:
    _prepare(folder, tmp_path / "tfds")
  assert named in str(raised.value), str(raised.value)
  assert "remove the link" in str(raised.value).lower()
  assert raised.value.exit_code == errors.EXIT_DATA


def test_links_to_images_and_class_folders_are_followed(tmp_path):
  """Good links stay fine: a class folder kept elsewhere, an image linked twice."""
  make_folder(tmp_path / "elsewhere", per_class=6, classes={"green": COLOURS["green"]})
  folder = make_folder(tmp_path / "images", per_class=6,
                       classes={k: v for k, v in COLOURS.items() if k != "green"})
  os.symlink(tmp_path / "elsewhere" / "green", os.path.join(folder, "green"))
  os.symlink(os.path.join(folder, "red", "img000.jpg"), os.path.join(folder, "red", "copy.jpg"))
  builder = _prepare(folder, tmp_path / "tfds", eval_fraction=0.3)
  assert builder.info.features["label"].names == ["blue", "green", "red"]
  splits = builder.info.splits
  assert splits["train"].num_examples + splits["test"].num_examples == 19


def test_images_too_large_without_image_size_are_a_data_error(tmp_path):
  folder = make_folder(tmp_path / "images", per_class=2, size=(1030, 4), classes={
      "a": (0, 0, 0), "b": (9, 9, 9)})
  with pytest.raises(errors.DataError, match=r"images are 1030x4 .* --image_size=N \(N <= 1024\)"):
    _prepare(folder, tmp_path / "tfds", eval_fraction=0.5)


def test_image_size_above_the_bound_exits_2_before_tensorflow(tmp_path):
  """Issue 33: --image_size=30000 ran out of memory, reported as a data error (exit 3)."""
  from conftest import run_without_tf
  result = run_without_tf("trainer.task", f"--model_dir={tmp_path / 'run'}",
                          f"--dataset=image_folder:{tmp_path}", "--image_size=30000",
                          "--epochs=1")
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert "--image_size must be in [0, 1024]" in result.stdout and "got 30000" in result.stdout


def test_missing_and_empty_folders(tmp_path):
  with pytest.raises(errors.DataError, match=f"{tmp_path}/nope does not exist"):
    _prepare(tmp_path / "nope", tmp_path / "tfds")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(errors.DataError, match=f"image_folder:{tmp_path}/empty is empty"):
    _prepare(tmp_path / "empty", tmp_path / "tfds")
  make_folder(tmp_path / "few", per_class=1, classes={"a": (0, 0, 0), "b": (9, 9, 9)})
  with pytest.raises(errors.DataError, match="falls in the test split .*--eval_fraction"):
    _prepare(tmp_path / "few", tmp_path / "tfds")


def test_flags(tmp_path):
  config = config_lib.Config(epochs=1, dataset="image_folder:/x", image_size=28,
                             eval_fraction=0.2)
  assert config.data.image_size == 28
  for bad, match in (({"eval_fraction": 0.0}, "--eval_fraction must be in"),
                     ({"eval_fraction": 1.0}, "--eval_fraction must be in"),
                     ({"image_size": -1}, r"--image_size must be in \[0, 1024\]"),
                     # It ran out of memory while preparing, and was reported as a data error.
                     ({"image_size": 30000}, r"--image_size must be in \[0, 1024\].*got 30000"),
                     ({"dataset": "image_folder:"}, "names no folder")):
    with pytest.raises(errors.ConfigError, match=match):
      config.replace(**bad)


# ---- training on a folder, exporting its class names, predicting names ----


@pytest.mark.slow
@pytest.mark.parametrize("input_mode", ["in_memory", "stream"])
def test_trains_on_a_folder_and_predicts_names(tmp_path, input_mode):
  from trainer import train
  folder = make_folder(tmp_path / "images", per_class=40)  # 120 RGB images, 20x20 -> 16x16
  config = config_lib.Config(
      model_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "tfds"),
      dataset=f"image_folder:{folder}", image_size=16, eval_fraction=0.25, input_mode=input_mode,
      train_steps=30, global_batch_size=16, log_every_steps=10, checkpoint_every_steps=30,
      steps_per_loop=10, model_widths=(8, 16), learning_rate=0.02, num_shards=2)
  metrics = train.train_and_evaluate(config)
  assert metrics["test_accuracy"] >= 0.9, metrics  # chance is 1/3
  export = os.path.join(config.outputs.model_dir, "export")
  with open(os.path.join(export, "class_names.json")) as f:
    assert json.load(f) == ["blue", "green", "red"]
  if input_mode == "stream":
    return  # one predict subprocess is enough
  image = str(tmp_path / "query.jpg")
  _write(image, _image(np.random.default_rng(9), COLOURS["green"], (30, 30)))
  result = run_module("trainer.predict", f"--model_dir={config.outputs.model_dir}", image, timeout=120)
  assert result.returncode == 0, result.stdout[-3000:]
  assert f"{image}\tclass 1 (green)\tp=" in result.stdout, result.stdout[-3000:]

  # A corrupt image added later: the changed folder is prepared again and the command line
  # exits 3 naming the file, before training, leaving the checkpoints as they were.
  checkpoints = os.path.join(config.outputs.model_dir, "checkpoints")
  before = {f: os.path.getmtime(os.path.join(checkpoints, f)) for f in os.listdir(checkpoints)}
  bad = os.path.join(folder, "blue", "broken.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8 not really a JPEG")
  flags = [f"--model_dir={config.outputs.model_dir}", f"--data_dir={config.data.data_dir}",
           f"--dataset={config.data.dataset}", "--image_size=16", "--eval_fraction=0.25",
           "--train_steps=60", "--global_batch_size=16", "--model_widths=8,16"]
  result = run_module("trainer.task", *flags, timeout=120)
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert f"Image {bad} is corrupt" in result.stdout, result.stdout[-3000:]
  assert {f: os.path.getmtime(os.path.join(checkpoints, f))
          for f in os.listdir(checkpoints)} == before


# ---- a gs:// folder: listed for the key, copied down only to prepare ----


EMULATOR_BUCKETS = ("images",)  # for conftest's emulator


@pytest.mark.slow
def test_gcs_folder_is_copied_down_and_prepared_again_after_a_change(emulator, tmp_path,
                                                                      monkeypatch):
  from trainer import storage
  for name, value in {**emulator.env(), "TRAINER_CACHE_DIR": str(tmp_path / "cache"),
                      "TRAINER_STORAGE_RETRY_DEADLINE_S": "30"}.items():
    monkeypatch.setenv(name, value)
  uri = f"gs://images/{tmp_path.name}"
  storage.upload_dir(make_folder(tmp_path / "images", per_class=8), uri)
  first = _prepare(uri, tmp_path / "tfds")
  assert first.info.features["label"].names == ["blue", "green", "red"]
  assert first.info.splits["train"].num_examples + first.info.splits["test"].num_examples == 24
  root = tmp_path / "tfds" / "image_folder"
  assert [n for n in os.listdir(os.path.dirname(os.path.dirname(str(first.data_dir))))
          if n != image_folder.PREPARED_MARKER] == ["image_folder"], "no copy of the images left"
  assert str(_prepare(uri, tmp_path / "tfds").data_dir) == str(first.data_dir)

  # The same name and size, other pixels: a new generation, so prepared again.
  storage.write_bytes(f"{uri}/red/img001.png",
                      open(os.path.join(tmp_path, "images", "green", "img001.png"), "rb").read())
  changed = _prepare(uri, tmp_path / "tfds")
  assert str(changed.data_dir) != str(first.data_dir)
  storage.write_bytes(f"{uri}/red/img002.jpg", b"\xff\xd8 broken")
  with pytest.raises(errors.DataError, match=f"Image {uri}/red/img002.jpg is corrupt"):
    _prepare(uri, tmp_path / "tfds")
  assert len([n for n in os.listdir(root) if not n.startswith(".")]) == 2
  with pytest.raises(errors.DataError, match="image_folder:gs://images/nothing-here is empty"):
    _prepare("gs://images/nothing-here", tmp_path / "tfds")

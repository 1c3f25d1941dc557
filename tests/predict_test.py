"""`python -m trainer.predict` classifies PNG files with a trained export; a missing, incomplete
or damaged export, a bucket that is not there and a path that is no image are documented exits
naming the file and the fix."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import gcs_emulator
import numpy as np
import pytest

from conftest import child_env, run_module, run_without_tf, tiny_flags
from trainer import errors
from trainer.storage import gcs
from trainer import predict

BUCKET = "predict-test"
EMULATOR_BUCKETS = (BUCKET,)  # for conftest's emulator
DATA = "variables/variables.data-00000-of-00001"
REEXPORT = "export it again: rerun the training command with the same --model_dir"


def _predict_without_tf(*args, **env):
  return run_without_tf("trainer.predict", *args, **env)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
  """A model_dir whose export/ trainer.export made from a tiny CNN's seeded initial weights:
  what the checks of a missing, damaged or misused export need, in seconds, without a dataset."""
  import keras
  from trainer import config as config_lib
  from trainer import data
  from trainer import export
  from trainer import step
  model_dir = tmp_path_factory.mktemp("untrained") / "run"
  config = config_lib.Config(model_dir=str(model_dir), data_dir=str(model_dir / "unused"),
                             train_steps=1, model_widths=(4, 8))
  splits = data.Splits(None, None, None, None, num_classes=10, image_shape=(28, 28, 1),
                       class_names=tuple(str(i) for i in range(10)))
  keras.utils.set_random_seed(0)
  eval_model = step.EvalModel(config.model, splits)
  export.export_saved_model(eval_model, eval_model.model.get_weights(), splits.image_shape,
                            str(model_dir / "export"), splits.class_names)
  return str(model_dir)


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
  """(pixels, path of a PNG of them): the first MNIST test digit, uint8 28x28."""
  from PIL import Image
  from trainer import data
  pixels = data.read_idx(os.path.join(data.vendored_mnist_dir(), "t10k-images-idx3-ubyte.gz"))[0]
  path = str(tmp_path_factory.mktemp("digit") / "digit.png")
  Image.fromarray(pixels).save(path)
  return pixels, path


def _copy(untrained, tmp_path) -> str:
  model_dir = str(tmp_path / "run")
  shutil.copytree(untrained, model_dir)
  return model_dir


def _flip_bit(path, offset) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))


def _truncate_to_half(path) -> None:
  os.truncate(path, os.path.getsize(path) // 2)


# How each damage is made, and the file the message must name (relative to export/).
DAMAGES = {
    "truncated_weights": (lambda export: _truncate_to_half(os.path.join(export, DATA)), DATA),
    "bit_flipped_weights": (
        lambda export: _flip_bit(os.path.join(export, DATA),
                                 os.path.getsize(os.path.join(export, DATA)) // 2), DATA),
    "truncated_saved_model_pb": (
        lambda export: _truncate_to_half(os.path.join(export, "saved_model.pb")),
        "saved_model.pb"),
    "empty_saved_model_pb": (
        lambda export: os.truncate(os.path.join(export, "saved_model.pb"), 0), "saved_model.pb"),
    "truncated_index": (
        lambda export: _truncate_to_half(os.path.join(export, "variables", "variables.index")),
        "variables/variables.index"),
    "missing_variables": (lambda export: shutil.rmtree(os.path.join(export, "variables")),
                          "variables/"),
    "missing_weights_file": (lambda export: os.remove(os.path.join(export, DATA)), DATA),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_export_is_a_data_error_naming_the_file(untrained, digit, tmp_path, damage):
  model_dir = _copy(untrained, tmp_path)
  export = os.path.join(model_dir, "export")
  size = os.path.getsize(os.path.join(export, DATA))
  damage_fn, named = DAMAGES[damage]
  damage_fn(export)
  if damage == "bit_flipped_weights":
    assert os.path.getsize(os.path.join(export, DATA)) == size  # the same size, other bytes
  with pytest.raises(errors.DataError) as raised:
    predict.predict(model_dir, [digit[1]])
  message = str(raised.value)
  assert message.startswith(os.path.join(export, named)), message
  assert REEXPORT in message and "restore the export from where you published it" in message


def test_a_bit_flip_anywhere_in_the_weights_fails_the_load(untrained, digit, tmp_path):
  """TensorFlow checks each tensor's CRC32C when it restores it, and the export's tensors cover
  its data file end to end: a same-size flip of the first, any middle or the last byte is
  caught, not loaded as other weights."""
  model_dir = _copy(untrained, tmp_path)
  data_file = os.path.join(model_dir, "export", DATA)
  with open(data_file, "rb") as f:
    original = f.read()
  for offset in sorted({0, 1, len(original) - 1, *range(0, len(original), len(original) // 9)}):
    _flip_bit(data_file, offset)
    with pytest.raises(errors.DataError, match=f"^{data_file} is damaged"):
      predict.predict(model_dir, [digit[1]])
    with open(data_file, "wb") as f:
      f.write(original)
  assert predict.predict(model_dir, [digit[1]])[0][0] == digit[1]  # whole again: it loads


def test_damaged_export_exits_3_without_a_traceback(untrained, digit, tmp_path):
  model_dir = _copy(untrained, tmp_path)
  data_file = os.path.join(model_dir, "export", DATA)
  _flip_bit(data_file, os.path.getsize(data_file) - 1)
  result = run_module("trainer.predict", f"--model_dir={model_dir}", digit[1])
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert "Traceback" not in result.stdout
  assert f"FATAL DataError: {data_file} is damaged" in result.stdout
  assert "Checksum does not match" in result.stdout and REEXPORT in result.stdout


def test_missing_variables_exits_3_before_tensorflow(untrained, digit, tmp_path):
  model_dir = _copy(untrained, tmp_path)
  shutil.rmtree(os.path.join(model_dir, "export", "variables"))
  result = _predict_without_tf(f"--model_dir={model_dir}", digit[1])
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  variables = os.path.join(model_dir, "export", "variables")
  assert f"FATAL DataError: {variables}/ is missing" in result.stdout
  assert REEXPORT in result.stdout


def test_cmyk_jpeg_is_classified_like_its_gray_png(untrained, digit, tmp_path):
  """A CMYK JPEG (as print workflows write them) is a valid image: on the 1-channel MNIST model
  it is decoded as the gray digit it shows, not reported as corrupt."""
  from PIL import Image
  pixels, png = digit
  cmyk = str(tmp_path / "digit_cmyk.jpg")
  black = np.zeros_like(pixels)
  Image.merge("CMYK", [Image.fromarray(a) for a in (black, black, black, 255 - pixels)]).save(
      cmyk, "JPEG", quality=100)
  assert Image.open(cmyk).mode == "CMYK"
  images = predict.load_images([png, cmyk], (28, 28, 1)).numpy()
  assert images.shape == (2, 28, 28, 1)
  difference = np.abs(images[0].astype(int) - images[1].astype(int))
  assert difference.mean() < 2 and difference.max() < 40, difference.max()  # JPEG's loss only
  (path_png, class_png, p_png), (path_cmyk, class_cmyk, p_cmyk) = predict.predict(
      untrained, [png, cmyk])
  assert (path_png, path_cmyk) == (png, cmyk) and class_cmyk == class_png
  assert p_cmyk == pytest.approx(p_png, abs=0.01)
  # A CMYK JPEG on an RGB model decodes as TensorFlow decodes it.
  assert predict.load_images([cmyk], (28, 28, 3)).shape == (1, 28, 28, 3)


def test_directory_given_as_an_image(tmp_path):
  folder = tmp_path / "digits"
  folder.mkdir()
  result = _predict_without_tf(f"--model_dir={tmp_path}", str(folder))
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert (f"{folder}: a directory, not an image: pass the PNG or JPEG files in it (e.g. "
          f"{folder}/*.png)") in result.stdout
  assert "No such" not in result.stdout


# ----------------------------------------------------------------------------- gs:// exports


@pytest.fixture
def gcs_env(emulator, monkeypatch):
  env = dict(emulator.env(), **{gcs.RETRY_DEADLINE_ENV: "5"})
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  return env


def _published(untrained, gcs_env) -> str:
  """A gs:// model_dir holding the untrained export, published as training publishes it."""
  from trainer import outputs
  from trainer import storage
  model_dir = f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
  storage.upload_dir(os.path.join(untrained, "export"), storage.join(model_dir, "export"),
                     marker=outputs.EXPORT_MARKER)
  return model_dir


def test_gcs_missing_bucket_is_a_storage_error(gcs_env, digit):
  result = _predict_without_tf("--model_dir=gs://no-such-bucket-here/run", digit[1], **gcs_env)
  assert result.returncode == errors.EXIT_STORAGE, result.stdout[-3000:]
  assert "gs://no-such-bucket-here does not exist" in result.stdout
  assert "wait for training" not in result.stdout


def test_gcs_bucket_without_access_is_a_storage_error(untrained, gcs_env, digit):
  model_dir = _published(untrained, gcs_env)
  with gcs_emulator.FaultProxy(gcs_env["STORAGE_EMULATOR_HOST"], forbid_bucket=BUCKET) as proxy:
    result = _predict_without_tf(f"--model_dir={model_dir}", digit[1], **dict(gcs_env,
                                                                                **proxy.env()))
  assert result.returncode == errors.EXIT_STORAGE, result.stdout[-3000:]
  assert f"permission denied on gs://{BUCKET}" in result.stdout


def test_gcs_model_dir_without_export(gcs_env, digit):
  from trainer import storage
  empty = f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
  result = _predict_without_tf(f"--model_dir={empty}", digit[1], **gcs_env)
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert f"--model_dir={empty} holds nothing: fix --model_dir, or train first" in result.stdout
  # A run still training: checkpoints there, no export yet.
  storage.write_text(storage.join(empty, "checkpoints", "checkpoint"), "model_checkpoint_path")
  result = _predict_without_tf(f"--model_dir={empty}", digit[1], **gcs_env)
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert (f"has no complete export yet (no {empty}/export/_COMPLETE)" in result.stdout
          and "wait for training to finish" in result.stdout)


def test_gcs_export_damaged_after_publishing(untrained, gcs_env, digit, monkeypatch, tmp_path):
  """The bucket's copy decides: a same-size flip fails TensorFlow's checksum, a shorter file
  the marker's sizes; both name the object. The downloaded copy is removed either way."""
  from trainer import storage
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  os.makedirs(tempfile.tempdir)
  model_dir = _published(untrained, gcs_env)
  assert predict.predict(model_dir, [digit[1]])[0][0] == digit[1]
  remote = storage.join(model_dir, "export", DATA)
  original = storage.read_bytes(remote)
  flipped = bytearray(original)
  flipped[len(flipped) // 3] ^= 0x01
  storage.write_bytes(remote, bytes(flipped))
  with pytest.raises(errors.DataError, match=f"^{remote} is damaged .*Checksum does not match"):
    predict.predict(model_dir, [digit[1]])
  storage.write_bytes(remote, original[:1000])
  with pytest.raises(errors.DataError, match=(f"^{remote} has 1000 bytes where _COMPLETE lists "
                                              f"{len(original)} bytes")):
    predict.predict(model_dir, [digit[1]])
  assert os.listdir(tempfile.tempdir) == []


@pytest.mark.slow
def test_predict_cli(tiny):
  from trainer import train
  config = tiny(train_steps=40)
  model_dir = config.outputs.model_dir
  train.train_and_evaluate(config)  # In-process: the training CLI has its own tests.
  result = run_module("trainer.predict", f"--model_dir={model_dir}", "--samples=8")
  assert result.returncode == 0, result.stdout[-3000:]
  lines = [l for l in result.stdout.splitlines() if "\tclass " in l]
  assert len(lines) == 8
  for line in lines:
    path, cls, prob = line.split("\t")
    assert os.path.isfile(path) and path.endswith(".png")
    assert 0 <= int(cls.split()[1]) <= 9 and 0.0 < float(prob[2:]) <= 1.0
  right = sum(line.split("_label")[1][0] == line.split("\tclass ")[1][0] for line in lines)
  assert right >= 4, result.stdout  # a briefly trained model gets most digits right
  # Files given on the command line work too.
  pngs = sorted(os.path.join(model_dir, "samples", f) for f in os.listdir(
      os.path.join(model_dir, "samples")))[:2]
  again = run_module("trainer.predict", f"--model_dir={model_dir}", *pngs)
  assert again.returncode == 0 and again.stdout.count("\tclass ") == 2
  # A corrupt PNG is a data error naming the file (in-process: TensorFlow is loaded already).
  bad = os.path.join(model_dir, "bad.png")
  with open(bad, "wb") as f:
    f.write(b"not a png")
  with pytest.raises(errors.DataError, match="Cannot read PNG .*bad.png"):
    predict.predict(model_dir, [pngs[0], bad])


def test_predict_without_export(tmp_path):
  result = _predict_without_tf(f"--model_dir={tmp_path}", "--samples=1")
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert "has no SavedModel" in result.stdout and "make train" in result.stdout
  assert not (tmp_path / "samples").exists()  # nothing written for a run that cannot work


def test_predict_missing_png(tmp_path):
  result = _predict_without_tf(f"--model_dir={tmp_path}", str(tmp_path / "nope.png"))
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert f"No such image file (PNG or JPEG): {tmp_path / 'nope.png'}" in result.stdout


def test_predict_needs_inputs(tmp_path):
  result = _predict_without_tf(f"--model_dir={tmp_path}")
  assert result.returncode == errors.EXIT_CONFIG
  assert "Give PNG files to classify, or --samples=N." in result.stdout


@pytest.mark.parametrize("flag", ["--help", "--helpfull", "-?"])
def test_predict_help_exits_0(flag):
  result = _predict_without_tf(flag)
  assert result.returncode == errors.EXIT_OK, result.stdout[-3000:]
  assert "--model_dir: Training output dir" in result.stdout


def test_predict_unknown_flag_is_a_config_error(tmp_path):
  result = _predict_without_tf(f"--model_dir={tmp_path}", "--sample=3")
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-3000:]
  assert "Unknown command line flag 'sample'" in result.stdout


@pytest.mark.parametrize("modules", [("predict", "task"), ("task", "predict")])
def test_predict_imports_next_to_the_trainer(modules):
  """Only entry points define flags: both modules load in one process (a notebook, a test)."""
  script = "; ".join(f"from trainer import {m}" for m in modules) + "; print('imported')"
  result = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "imported"


def test_samples_without_vendored_mnist_is_a_data_error(tmp_path, monkeypatch):
  """An installed package has no data/mnist: --samples says so (exit 3), not a traceback."""
  from trainer import data
  monkeypatch.setattr(data, "vendored_mnist_dir", lambda: str(tmp_path / "no_vendored_copy"))
  with pytest.raises(errors.DataError, match="--samples takes digits from .*no_vendored_copy"):
    predict.write_samples(str(tmp_path / "samples"), 1)
  assert not (tmp_path / "samples").exists()


@pytest.mark.slow
def test_rerun_repairs_the_export(tfds_dir, tmp_path, digit):
  """The fix every damaged-export message gives works: rerunning the finished training command
  restores its last checkpoint, trains no further step and exports again."""
  model_dir = str(tmp_path / "run")
  flags = tiny_flags(model_dir, tfds_dir, train_steps=10)
  first = run_module("trainer.task", *flags)
  assert first.returncode == 0, first.stdout[-3000:]
  with open(os.path.join(model_dir, "metrics.json")) as f:
    trained = json.load(f)
  data_file = os.path.join(model_dir, "export", DATA)
  _flip_bit(data_file, os.path.getsize(data_file) // 2)
  broken = run_module("trainer.predict", f"--model_dir={model_dir}", digit[1])
  assert broken.returncode == errors.EXIT_DATA, broken.stdout[-3000:]
  assert f"{data_file} is damaged" in broken.stdout and REEXPORT in broken.stdout
  rerun = run_module("trainer.task", *flags)
  assert rerun.returncode == 0, rerun.stdout[-3000:]
  with open(os.path.join(model_dir, "metrics.json")) as f:
    again = json.load(f)
  assert (again["global_step"], again["weights_sha256"]) == (
      trained["global_step"], trained["weights_sha256"])
  assert again["start_step"] == trained["global_step"]  # restored, nothing trained
  fixed = run_module("trainer.predict", f"--model_dir={model_dir}", digit[1])
  assert fixed.returncode == 0, fixed.stdout[-3000:]
  assert fixed.stdout.count("\tclass ") == 1

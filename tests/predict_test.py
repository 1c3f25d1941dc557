"""`python -m trainer.predict` classifies PNG files with a trained export."""

import os
import subprocess
import sys

import pytest

from conftest import child_env, run_module, run_without_tf
from trainer import errors
from trainer import predict


def _predict_without_tf(*args):
  return run_without_tf("trainer.predict", *args)


@pytest.mark.slow
def test_predict_cli(tiny):
  from trainer import train
  config = tiny(train_steps=40)
  model_dir = config.model_dir
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
  assert f"No such PNG file: {tmp_path / 'nope.png'}" in result.stdout


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

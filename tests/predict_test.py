"""`python -m trainer.predict` classifies PNG files with a trained export."""

import os

from conftest import run_module
from trainer import errors


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


def test_predict_without_export(tmp_path):
  result = run_module("trainer.predict", f"--model_dir={tmp_path}", "--samples=1")
  assert result.returncode == errors.EXIT_DATA and "has no SavedModel" in result.stdout


def test_predict_bad_png(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  result = run_module("trainer.predict", f"--model_dir={tmp_path}", str(bad))
  assert result.returncode != 0

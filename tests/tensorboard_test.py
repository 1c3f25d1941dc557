"""TensorBoard tells the whole run: the real `tensorboard` program, started on a finished run,
serves through its HTTP data API the training curve, every evaluation (the final one equal to
metrics.json), the confusion matrix and misclassified images, and the HParams row."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import child_env, run_module, tiny_flags
from trainer import pictures
from trainer import summaries


def test_captions_are_drawn_in_the_bitmap_font():
  strip = pictures.text("T 7", 40)
  assert strip.shape == (pictures.LINE_H, 40) and strip.dtype == np.uint8
  # "T" lights its top row across three pixels; the space stays dark; "7" lights its top row.
  columns_lit = np.flatnonzero(strip.max(axis=0))
  assert columns_lit.min() < pictures.CHAR_W and columns_lit.max() >= 2 * pictures.CHAR_W
  assert not strip[:, pictures.CHAR_W:2 * pictures.CHAR_W].any()
  assert (pictures.text("?", 8) == pictures.text("\u00e9", 8)).all()  # unknown -> "?"


def test_confusion_matrix_counts_and_image():
  labels = np.array([0, 0, 1, 2, 2, 2])
  predicted = np.array([0, 1, 1, 2, 0, 2])
  counts = pictures.confusion_matrix(labels, predicted, 3)
  assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
  image = pictures.confusion_image(counts, cell=16)
  assert image.dtype == np.uint8 and image.shape[-1] == 3
  top, left = image.shape[0] - 3 * 16, image.shape[1] - 3 * 16
  cell = lambda r, c: image[top + r * 16 + 8, left + c * 16 + 8]  # a cell's centre
  assert cell(1, 1)[1] == 255 and cell(1, 1)[0] == 0  # all of row 1 right: full green
  assert cell(0, 1)[0] > 0 and cell(0, 1)[1] == 0  # an error: red
  assert not cell(1, 0).any()  # never happened: black
  table = summaries._counts_table(counts, ("a", "b", "c"))  # pylint: disable=protected-access
  assert "| c | 1 | 0 | 2 |" in table


def test_misclassified_grid_shows_only_errors():
  images = np.zeros((5, 28, 28, 1), np.uint8)
  images[1] = 200  # the one misclassified image is bright
  grid = pictures.misclassified_grid(images, np.array([1, 2, 3, 4, 5]),
                                     np.array([1, 9, 3, 4, 5]), columns=4)
  assert grid is not None and grid.shape[-1] == 3
  assert (grid == 200).any()
  assert pictures.misclassified_grid(images, np.arange(5), np.arange(5)) is None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url: str, body=None):
  request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json",
                                            "X-XSRF-Protected": "1"})
  with urllib.request.urlopen(request, timeout=30) as response:
    raw = response.read()
  return raw if raw[:4] == b"\x89PNG" else json.loads(raw)


@pytest.fixture
def tensorboard():
  """Starts the real TensorBoard on a log dir (loopback only); stops it afterwards."""
  started = []

  def start(logdir: str) -> str:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1",
         f"--port={port}", "--reload_interval=1"], env=child_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    started.append(process)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
      if process.poll() is not None:
        raise AssertionError(f"tensorboard exited {process.returncode}: {process.stderr.read()}")
      try:
        if {"train", "eval"} <= set(_get(base + "/data/runs")):
          return base
      except OSError:
        pass
      time.sleep(0.5)
    raise AssertionError("tensorboard did not list the runs train and eval within 90 s")

  yield start
  for process in started:
    process.terminate()
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


@pytest.mark.slow
def test_tensorboard_shows_the_whole_run(tmp_path, tfds_dir, tensorboard):
  model_dir = tmp_path / "run"
  result = run_module("trainer.task", *tiny_flags(
      str(model_dir), tfds_dir, train_steps=40, summary_every_steps=4, eval_every_steps=20,
      export=False))
  assert result.returncode == 0, result.stdout[-3000:]
  metrics = json.loads((model_dir / "metrics.json").read_text())
  base = tensorboard(str(model_dir / "logs"))

  def scalars(run, tag):
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return _get(f"{base}/data/plugin/scalars/scalars?{query}")

  # A curve: one training point every 4 steps, the last at the final step.
  loss = scalars("train", "loss")
  assert [step for _, step, _ in loss] == list(range(4, 41, 4))
  assert all(np.isfinite(value) for _, _, value in loss)
  assert {"accuracy", "learning_rate", "images_per_sec"} <= set(
      _get(f"{base}/data/plugin/scalars/tags")["train"])
  # Every evaluation, the final one included, equal to metrics.json.
  accuracy = scalars("eval", "test_accuracy")
  assert [step for _, step, _ in accuracy] == [20, 40]
  assert accuracy[-1][2] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
  assert scalars("eval", "test_loss")[-1][2] == pytest.approx(metrics["test_loss"], rel=1e-6)

  # The pictures: the confusion matrix and the misclassified test images, as PNGs.
  image_tags = _get(f"{base}/data/plugin/images/tags")["eval"]
  assert {"confusion_matrix", "misclassified"} <= set(image_tags)
  for tag in ("confusion_matrix", "misclassified"):
    query = urllib.parse.urlencode({"run": "eval", "tag": tag})
    (entry,) = _get(f"{base}/data/plugin/images/images?{query}")
    assert entry["step"] == 40
    png = _get(f"{base}/data/plugin/images/individualImage?{entry['query']}")
    assert png[:4] == b"\x89PNG"
  assert "confusion_matrix_counts" in _get(f"{base}/data/plugin/text/tags")["eval"]

  # HParams: the run's configuration, and the metrics found below it.
  experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
  hparams = {info["name"] for info in experiment["hparamInfos"]}
  assert {"learning_rate", "global_batch_size", "model_widths", "num_workers",
          "precision_policy"} <= hparams
  metric_names = {m["name"]["tag"] for m in experiment["metricInfos"]}
  assert {"test_accuracy", "test_loss"} <= metric_names
  groups = _get(f"{base}/data/plugin/hparams/session_groups",
                {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                 "colParams": [], "startIndex": 0, "sliceSize": 10})
  (group,) = groups["sessionGroups"]
  assert group["hparams"]["learning_rate"] == pytest.approx(0.05)
  final = [m for m in group["metricValues"] if m["name"]["tag"] == "test_accuracy"]
  assert final and final[0]["value"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
  assert os.path.isdir(model_dir / "logs" / "eval")

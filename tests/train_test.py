"""End-to-end tests of train_and_evaluate on tiny configs: outputs, resume, refusal, divergence."""

import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import run_module, tiny_flags
from trainer import checkpoint as checkpoint_lib
from trainer import errors
from trainer import train


def _checkpoint_files(model_dir):
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  return {f: os.path.getmtime(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)}


@pytest.mark.slow
def test_train_evaluate_export(tiny):
  config = tiny()
  metrics = train.train_and_evaluate(config)
  with open(os.path.join(config.outputs.model_dir, "metrics.json")) as f:
    written = json.load(f)
  nested = ("phase_seconds", "precision_segments")
  for key in nested:
    assert written.pop(key) == metrics[key]
  assert written == pytest.approx({k: v for k, v in metrics.items() if k not in nested})
  assert metrics["precision_segments"] == [{"steps": [1, 20], "precision": metrics["precision"]}]
  for key in ("test_accuracy", "test_loss", "global_step", "train_images_per_sec"):
    assert key in written
  assert written["global_step"] == 20 and written["test_examples"] == 500
  assert written["test_accuracy"] > 0.3, "20 steps on MNIST beat chance (0.1) by far"
  assert checkpoint_lib.complete_checkpoints(os.path.join(config.outputs.model_dir, "checkpoints"))[0].endswith(
      "ckpt-20")
  assert os.path.isfile(os.path.join(config.outputs.model_dir, "export", "saved_model.pb"))
  assert tf.io.gfile.glob(os.path.join(config.outputs.model_dir, "logs", "train", "events.*"))

  # The export loads in a process that never imports trainer, and agrees with metrics.json.
  script = f"""
import sys, numpy as np, tensorflow as tf, tensorflow_datasets as tfds
assert "trainer" not in sys.modules
m = tf.saved_model.load({os.path.join(config.outputs.model_dir, "export")!r})
f = m.signatures["serving_default"]
ds = tfds.load("mnist", split="test[:500]", data_dir={config.data.data_dir!r}, batch_size=-1)
x, y = tfds.as_numpy(ds)["image"], tfds.as_numpy(ds)["label"]
out = f(images=tf.constant(x))
assert out["probabilities"].dtype == tf.float32 and out["probabilities"].shape == (500, 10)
assert out["classes"].dtype == tf.int64 and out["classes"].shape == (500,)
np.testing.assert_allclose(out["probabilities"].numpy().sum(1), 1.0, rtol=1e-5)
assert "trainer" not in sys.modules
print("ACC", float((out["classes"].numpy() == y).mean()))
"""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd="/", timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  accuracy = float(result.stdout.split("ACC")[1])
  assert accuracy == pytest.approx(written["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_space_to_depth_model_trains_and_exports(tiny):
  config = tiny(space_to_depth=2, pool_sizes=(1, 2), conv_padding="same",
                eval_examples=200)
  metrics = train.train_and_evaluate(config)
  assert metrics["test_accuracy"] > 0.3
  served = tf.saved_model.load(os.path.join(config.outputs.model_dir, "export"))
  from trainer import data
  splits = data.load(config.data)
  images = splits.test_images[:200]
  classes = served.signatures["serving_default"](images=tf.constant(images))["classes"].numpy()
  accuracy = float((classes == splits.test_labels[:200]).mean())
  assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tiny):
  first = train.train_and_evaluate(tiny(train_steps=10, checkpoint_every_steps=5))
  assert first["start_step"] == 0 and first["global_step"] == 10
  second = train.train_and_evaluate(tiny(train_steps=20, checkpoint_every_steps=5))
  assert second["start_step"] == 10 and second["global_step"] == 20
  again = train.train_and_evaluate(tiny(train_steps=20, checkpoint_every_steps=5))
  assert again["start_step"] == 20 and again["global_step"] == 20


@pytest.mark.slow
def test_refuses_checkpoint_of_another_model(tiny):
  train.train_and_evaluate(tiny(train_steps=5, export=False))
  before = _checkpoint_files(tiny().outputs.model_dir)
  with pytest.raises(errors.IncompatibleCheckpointError, match="different model"):
    train.train_and_evaluate(tiny(train_steps=10, model_widths=(8, 24)))
  assert _checkpoint_files(tiny().outputs.model_dir) == before, "the old checkpoint is untouched"


@pytest.mark.slow
def test_divergence_stops_and_keeps_last_good_checkpoint(tiny):
  config = tiny(train_steps=30, inject_nan_at_step=17)
  with pytest.raises(errors.DivergenceError, match="Loss became nan by step 20"):
    train.train_and_evaluate(config)
  paths = checkpoint_lib.complete_checkpoints(os.path.join(config.outputs.model_dir, "checkpoints"))
  assert paths[0].endswith("ckpt-10")
  reader = tf.train.load_checkpoint(paths[0])
  for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    if hasattr(value, "dtype") and value.dtype.kind == "f":
      assert tf.reduce_all(tf.math.is_finite(value)), name


@pytest.mark.slow
def test_batch_not_divisible_by_the_replicas_is_an_error(tmp_path, tfds_dir):
  """Two CPU replicas (a fresh process: the CPU is split before TensorFlow starts) and 33."""
  result = run_module("trainer.task", *tiny_flags(str(tmp_path / "run"), tfds_dir,
                                                  num_cpu_devices=2, global_batch_size=33))
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-3000:]
  assert "--global_batch_size=33 is not divisible by the 2 replicas" in result.stdout
  assert "e.g. 34" in result.stdout and not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("knob", [dict(weight_decay=0.01), dict(label_smoothing=0.1),
                                  dict(global_pool=True), dict(batch_norm=True),
                                  dict(dropout=0.2)])
def test_every_model_and_loss_knob_trains_under_two_replicas(tmp_path, tfds_dir, knob):
  """Each knob trains a short run under MirroredStrategy (2 CPU replicas) and lowers the loss."""
  flags = tiny_flags(str(tmp_path / "run"), tfds_dir, num_cpu_devices=2, train_steps=30,
                     log_every_steps=5, export=False, **knob)
  result = run_module("trainer.task", *flags)
  assert result.returncode == 0, result.stdout[-3000:]
  assert "Strategy mirrored with 2 replica(s)" in result.stdout
  losses = [float(x) for x in re.findall(r"step \d+/30 loss ([\d.]+)", result.stdout)]
  assert len(losses) == 6 and losses[-1] < losses[0], losses


@pytest.mark.slow
def test_every_run_reports_its_phases(tiny, caplog):
  with caplog.at_level("INFO"):
    metrics = train.train_and_evaluate(tiny(train_steps=10))
  phases = metrics["phase_seconds"]
  assert list(phases) == ["start-up", "data", "build", "train", "evaluate", "export"]
  assert all(v >= 0 for v in phases.values())
  assert abs(sum(phases.values()) - metrics["wall_seconds"]) < 0.01
  line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("phases: ")]
  assert line and f"total {metrics['wall_seconds']:.1f} s" in line[-1]
  written = json.load(open(os.path.join(tiny().outputs.model_dir, "metrics.json")))
  assert written["phase_seconds"] == phases


@pytest.mark.slow
def test_late_dense_evaluations_run_at_their_steps(tiny, caplog):
  with caplog.at_level("INFO"):
    train.train_and_evaluate(tiny(train_steps=20, eval_every_steps=4, first_eval_step=13))
  evaluated = [int(m) for r in caplog.records
               for m in re.findall(r"^eval at step (\d+): test_accuracy", r.getMessage())]
  assert evaluated == [13, 17, 20], "the schedule's steps, then the final evaluation"

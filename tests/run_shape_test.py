"""A resumed run keeps what its order of examples depends on (issue 33, docs/data.md "Resume
guarantee"): another global batch or input mode is refused; another worker count is not."""

import json
import os

import pytest

from conftest import child_env, run_module, tiny_flags
from trainer import config as config_lib
from trainer import run_shape
from trainer import errors

pytestmark = pytest.mark.slow


def _config(tmp_path, data_dir, **overrides):
  values = dict(model_dir=str(tmp_path / "run"), data_dir=data_dir, train_steps=10,
                global_batch_size=32, steps_per_loop=5, checkpoint_every_steps=10,
                log_every_steps=5, model_widths=(8, 16), eval_examples=100, export=False,
                input_mode="in_memory", num_cpu_devices=1)
  values.update(overrides)
  return config_lib.Config(**values)


def test_resume_with_another_batch_mode_or_seed_is_refused(synthetic_tfds_dir, tmp_path):
  """Issue 33: --global_batch_size or --input_mode changed on resume was accepted silently."""
  from trainer import train
  train.train_and_evaluate(_config(tmp_path, synthetic_tfds_dir))
  checkpoints = tmp_path / "run" / "checkpoints"
  before = sorted(os.listdir(checkpoints))
  shape = json.loads((checkpoints / run_shape.SHAPE_FILE).read_text())
  assert shape["global_batch_size"] == 32 and shape["input_mode"] == "in_memory"
  for change, said in (
      (dict(global_batch_size=64), ["--global_batch_size=64 differs", "(32)",
                                    "Resume with --global_batch_size=32"]),
      (dict(input_mode="stream"), ["--input_mode (here stream) differs", "(in_memory)",
                                   "Resume with --input_mode=in_memory"]),
      (dict(seed=7), ["--seed=7 differs", "Resume with --seed=42"])):
    with pytest.raises(errors.ConfigError) as raised:
      train.train_and_evaluate(_config(tmp_path, synthetic_tfds_dir, train_steps=20, **change))
    assert raised.value.exit_code == errors.EXIT_CONFIG
    message = str(raised.value)
    assert all(s in message for s in said), message
    assert "--restart_from_scratch" in message and "a new --model_dir" in message
    assert sorted(os.listdir(checkpoints)) == before, "a refused run writes nothing"
  metrics = train.train_and_evaluate(_config(tmp_path, synthetic_tfds_dir, train_steps=20))
  assert metrics["start_step"] == 10 and metrics["global_step"] == 20
  # Starting afresh on purpose takes the new shape.
  train.train_and_evaluate(_config(tmp_path, synthetic_tfds_dir, train_steps=5,
                                   global_batch_size=64, restart_from_scratch=True,
                                   checkpoint_every_steps=5))
  shape = json.loads((checkpoints / run_shape.SHAPE_FILE).read_text())
  assert shape["global_batch_size"] == 64


def test_a_shrunken_cluster_resumes(synthetic_tfds_dir, tmp_path):
  """Two workers stream to step 10; one worker (the same global batch) resumes to step 20: a
  cluster shrunk after a failure must go on. Its stream order depends on the pipeline count,
  which it says."""
  args = tiny_flags(str(tmp_path / "run"), synthetic_tfds_dir, input_mode="stream",
                    train_examples=0, train_steps=10, eval_examples=100, export="false",
                    collective_timeout_s=60)
  first = run_module("trainer.launcher", "--workers=2", "--", *args, timeout=240)
  assert first.returncode == 0, first.stdout[-3000:]
  shape_path = tmp_path / "run" / "checkpoints" / run_shape.SHAPE_FILE
  assert json.loads(shape_path.read_text())["num_workers"] == 2
  args = [a if not a.startswith("--train_steps=") else "--train_steps=20" for a in args]
  second = run_module("trainer.task", *args, env=child_env(), timeout=240)
  assert second.returncode == 0, second.stdout[-3000:]
  assert "Resuming stream-mode checkpoints with num workers 1 (the checkpoints': 2)" in \
      second.stdout, second.stdout[-3000:]
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["start_step"] == 10 and metrics["global_step"] == 20
  assert json.loads(shape_path.read_text())["num_workers"] == 1

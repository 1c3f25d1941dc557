"""--profile_steps: checked before TensorFlow loads, and a trace of exactly those steps under the
TensorBoard log directory (local, or a bucket's through its local mirror)."""

import glob
import os
import re

import pytest

from conftest import child_env, run_module, run_without_tf, tiny_flags
from trainer import config as config_lib
from trainer import errors


@pytest.mark.parametrize("overrides, expected", [
    (dict(profile_steps=""), None),
    (dict(profile_steps="4,12"), (4, 12)),
    (dict(profile_steps="1,1"), (1, 1)),
    (dict(profile_steps="20,20", train_steps=20), (20, 20)),
    (dict(profile_steps="5,500", train_steps=None, epochs=1), (5, 500)),  # checked at run time
])
def test_profile_range(overrides, expected):
  values = dict(train_steps=100)
  values.update(overrides)
  assert config_lib.profile_range(config_lib.Config(**values).training) == expected


@pytest.mark.parametrize("value, message", [
    ("5", "must be two integers START,END"),
    ("a,b", "must be two integers START,END"),
    ("1,2,3", "must be two integers START,END"),
    ("0,5", "need 1 <= START <= END"),
    ("9,3", "need 1 <= START <= END"),
    ("5,101", "END 101 is past the run's last step (--train_steps=100)"),
])
def test_bad_profile_steps_exit_2_before_tensorflow_loads(tmp_path, value, message):
  result = run_without_tf("trainer.task", *tiny_flags(str(tmp_path / "run"),
                                                      str(tmp_path / "tfds"),
                                                      train_steps=100),
                          f"--profile_steps={value}")
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert "FATAL ConfigError: --profile_steps=" in result.stdout and value in result.stdout
  assert message in result.stdout and "Traceback" not in result.stdout


def _chunks_traced(log_dir) -> list:
  """The step markers in the one trace under log_dir: the step each traced chunk ended at."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  traces = glob.glob(os.path.join(log_dir, "train", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1, traces
  space = xplane_pb2.XSpace()
  with open(traces[0], "rb") as f:
    space.ParseFromString(f.read())
  ends = []
  for plane in space.planes:
    names = {k: v.name for k, v in plane.stat_metadata.items()}
    train = {k for k, v in plane.event_metadata.items() if v.name == "train"}
    for line in plane.lines:
      for event in line.events:
        if event.metadata_id in train:
          ends += [s.int64_value for s in event.stats if names[s.metadata_id] == "step_num"]
  return sorted(ends)


@pytest.mark.slow
def test_trace_covers_exactly_the_profiled_steps(tiny):
  """Steps 4-12 with 5-step chunks and checkpoints every 10: chunks end at 3 (the trace starts),
  8, 10 and 12 (it stops), so the trace holds the chunks ending at 8, 10 and 12."""
  from trainer import train
  config = tiny(profile_steps="4,12", export=False)
  train.train_and_evaluate(config)
  assert _chunks_traced(os.path.join(config.outputs.model_dir, "logs")) == [8, 10, 12]


@pytest.mark.slow
def test_profile_past_a_run_set_in_epochs_is_an_error(tiny):
  """With --epochs the run's length is known once the data is: 512 examples / 32 = 16 steps."""
  from trainer import train
  config = tiny(train_steps=None, epochs=1, profile_steps="10,17")
  with pytest.raises(errors.ConfigError, match=r"END 17 is past the run's last step \(16\)"):
    train.train_and_evaluate(config)
  assert not glob.glob(os.path.join(config.outputs.model_dir, "checkpoints", "ckpt-*"))


@pytest.mark.slow
def test_trace_of_a_bucket_run_is_published(emulator, tmp_path, tfds_dir):
  """gs://: the trace is written to the local log mirror and uploaded with the other logs."""
  emulator.create_bucket("runs")
  result = run_module("trainer.task", *tiny_flags("gs://runs/prof", tfds_dir,
                                                  profile_steps="6,10", export=False),
                      env=child_env(**emulator.env(), TRAINER_CACHE_DIR=tmp_path / "cache"))
  assert result.returncode == 0, result.stdout[-3000:]
  names = emulator.object_names("runs", "prof/logs/")
  traces = [n for n in names if re.fullmatch(r"prof/logs/train/plugins/profile/[^/]+/[^/]+"
                                             r"\.xplane\.pb", n)]
  assert len(traces) == 1, names

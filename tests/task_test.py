"""The command line: bad input exits non-zero with a message naming the flag or file."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, run_module, run_without_tf, tiny_flags
from trainer import errors


def _task(*args, **kw):
  return run_module("trainer.task", *args, **kw)


def _task_without_tf(*args, **env):
  return run_without_tf("trainer.task", *args, **env)


def test_unknown_flag_is_an_error(tmp_path):
  result = _task_without_tf("--model_dir", str(tmp_path), "--train_step=5")
  assert result.returncode == errors.EXIT_CONFIG
  assert "train_step" in result.stdout and "train_steps" in result.stdout  # with a suggestion


def test_positional_argument_is_an_error(tmp_path):
  result = _task_without_tf(f"--model_dir={tmp_path}", "--train_steps=1", "stray")
  assert result.returncode == errors.EXIT_CONFIG and "stray" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--global_batch_size=0"], "--global_batch_size must be > 0"),
    (["--train_steps=0"], "--train_steps must be > 0"),
    (["--epochs=0"], "--epochs must be > 0"),
    (["--strategy=multi_worker_mirrored"], "needs TF_CONFIG"),
    (["--learning_rate=nan"], "--learning_rate must be a finite number"),
    (["--learning_rate=inf"], "--learning_rate must be a finite number"),
    (["--collective_timeout_s=nan"], "--collective_timeout_s must be a finite number"),
    (["--preemption_grace_s=nan"], "--preemption_grace_s must be a finite number"),
    (["--preemption_grace_s=1e300"], "--preemption_grace_s must be at most"),
    (["--weight_decay=-inf"], "--weight_decay must be a finite number"),
    (["--max_job_restarts=-1"], "--max_job_restarts must be >= 0"),
])
def test_bad_flags_fail_before_tensorflow_loads(tmp_path, args, message):
  result = _task_without_tf(*tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds")), *args)
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert message in result.stdout
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "tfds")


@pytest.mark.parametrize("args, message", [
    # Both need the dataset: its size, or whether TFDS knows the name.
    (["--train_steps=5", "--epochs=1"], "contradicts --epochs=1"),
    (["--dataset=not_a_dataset"], "--dataset='not_a_dataset'"),
])
@pytest.mark.slow
def test_bad_flags(tmp_path, tfds_dir, args, message):
  result = _task(*tiny_flags(str(tmp_path / "run"), tfds_dir), *args)
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert message in result.stdout
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_unwritable_data_dir(tmp_path):
  (tmp_path / "file").write_text("x")
  result = _task(*tiny_flags(str(tmp_path / "run"), str(tmp_path / "file" / "tfds")))
  assert result.returncode == errors.EXIT_DATA
  assert "--data_dir=" in result.stdout and "not writable" in result.stdout


@pytest.mark.slow
def test_corrupt_mnist_source(tmp_path):
  from trainer import data
  src = tmp_path / "mnist"
  shutil.copytree(data.vendored_mnist_dir(), src)
  os.chmod(src / "train-labels-idx1-ubyte.gz", 0o644)
  with open(src / "train-labels-idx1-ubyte.gz", "r+b") as f:
    f.seek(50)
    f.write(b"\x00\x01\x02")
  result = _task(*tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds")),
                 f"--mnist_source_dir={src}")
  assert result.returncode == errors.EXIT_DATA
  assert "train-labels-idx1-ubyte.gz is corrupt" in result.stdout


@pytest.mark.parametrize("tf_config, message", [
    ("{oops", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", '
     '"index": 0}}', "--strategy=one_device but TF_CONFIG describes 2 workers"),
])
def test_bad_tf_config_fails_before_tensorflow_loads(tmp_path, tf_config, message):
  result = _task_without_tf(*tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds")),
                            "--strategy=one_device", TF_CONFIG=tf_config)
  assert result.returncode == errors.EXIT_CONFIG and message in result.stdout, result.stdout
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "tfds")


def test_cpu_split_in_a_multi_worker_job_fails_before_tensorflow_loads(tmp_path):
  tf_config = ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": '
               '"worker", "index": 0}}')
  result = _task_without_tf(*tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds")),
                            "--num_cpu_devices=2", TF_CONFIG=tf_config)
  assert result.returncode == errors.EXIT_CONFIG, result.stdout
  assert "--num_cpu_devices=2 but TF_CONFIG describes 2 workers" in result.stdout


@pytest.mark.slow
def test_flagfile_and_incompatible_model_dir(tmp_path, tfds_dir):
  flagfile = tmp_path / "run.flags"
  flagfile.write_text("\n".join(tiny_flags(str(tmp_path / "run"), tfds_dir, train_steps=5,
                                           export=False)) + "\n")
  first = _task(f"--flagfile={flagfile}")
  assert first.returncode == 0, first.stdout[-3000:]
  ckpt_dir = tmp_path / "run" / "checkpoints"
  before = {p: (ckpt_dir / p).read_bytes() for p in os.listdir(ckpt_dir)}
  second = _task(f"--flagfile={flagfile}", "--model_widths=16,16", "--train_steps=10")
  assert second.returncode == errors.EXIT_INCOMPATIBLE_CHECKPOINT, second.stdout[-3000:]
  assert "different model" in second.stdout and str(tmp_path / "run") in second.stdout
  assert {p: (ckpt_dir / p).read_bytes() for p in os.listdir(ckpt_dir)} == before


@pytest.mark.parametrize("flag", ["--help", "--helpfull", "-help", "-?", "--helpshort"])
def test_help_exits_0(flag):
  result = _task_without_tf(flag)
  assert result.returncode == 0 and "--model_dir" in result.stdout, result.stdout[-2000:]


def test_help_lists_only_what_users_set():
  result = _task_without_tf("--helpfull")
  assert "--max_job_restarts" in result.stdout and "inject_nan" not in result.stdout


@pytest.mark.slow
def test_the_training_log_is_ours_unless_verbosity_asks(tmp_path, tfds_dir):
  flags = tiny_flags(str(tmp_path / "run"), tfds_dir, num_cpu_devices=2, export=False,
                     train_steps=10)
  quiet = _task(*flags)
  assert quiet.returncode == 0, quiet.stdout[-3000:]
  assert "Training steps 0 -> 10" in quiet.stdout and "Final step 10" in quiet.stdout
  assert "cross_device_ops" not in quiet.stdout and "reader.py" not in quiet.stdout
  # The log is ours from its first line: TensorFlow's native start-up notices (oneDNN, no CUDA
  # driver, a failed cuInit on a CPU machine) are held back at the default verbosity.
  first_lines = quiet.stdout.splitlines()[:5]
  assert first_lines and all(re.match(r"^[IWE]\d{4} [\d:.]+ +\d+ \w+\.py:\d+\] ", line)
                             for line in first_lines), first_lines
  assert "InitializeLog" not in quiet.stdout and "cuInit" not in quiet.stdout
  verbose = _task(*tiny_flags(str(tmp_path / "run2"), tfds_dir, num_cpu_devices=2,
                              export=False, train_steps=10), "--verbosity=1")
  assert verbose.returncode == 0 and "cross_device_ops" in verbose.stdout
  # --verbosity brings TensorFlow's native lines back (TF 2.21 writes this one on every start).
  assert "All log messages before absl::InitializeLog() is called" in verbose.stdout


@pytest.mark.slow
def test_a_local_run_loads_no_plotting_or_bucket_libraries(tmp_path, tfds_dir):
  """Start-up time: Keras would import matplotlib when installed (as it is here, for the
  notebook test), storage would import google-cloud-storage, and opening prepared data would
  import TFDS; a local run on prepared, decoded data needs none of them. The entry point runs as
  `python -m` does; an exit handler lists what the process loaded (the trainer leaves through
  os._exit, after the exit handlers)."""
  import importlib.machinery  # pylint: disable=import-outside-toplevel
  from trainer import config as config_lib  # pylint: disable=import-outside-toplevel
  from trainer import data  # pylint: disable=import-outside-toplevel
  # Installed (on sys.path: conftest.py keeps it out of this process), else this proves nothing.
  assert importlib.machinery.PathFinder.find_spec("matplotlib") is not None
  data.load(config_lib.Config(data_dir=tfds_dir, epochs=1).data)  # decoded once, as a first run does
  code = (
      "import atexit, runpy, sys\n"
      "atexit.register(lambda: print('LOADED', 'keras' in sys.modules, sorted(\n"
      "    m for m, module in sys.modules.items() if module is not None and m.startswith(\n"
      "        ('matplotlib', 'google.api_core', 'google.cloud.storage', 'trainer.storage.gcs',\n"
      "         'tensorflow_datasets')))))\n"
      "sys.argv[0] = 'trainer.task'\n"
      "runpy.run_module('trainer.task', run_name='__main__', alter_sys=True)\n")
  result = subprocess.run(
      [sys.executable, "-c", code, *tiny_flags(str(tmp_path / "run"), tfds_dir, train_steps=2)],
      env=child_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      timeout=300)
  assert result.returncode == 0, result.stdout[-3000:]
  loaded = [l for l in result.stdout.splitlines() if l.startswith("LOADED ")]
  assert loaded == ["LOADED True []"], loaded  # Keras is there, the rest is not

"""Shared fixtures: MNIST prepared once per session, tiny configs, and a subprocess runner."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """TFDS mnist prepared from the vendored files, shared by every test of the session."""
  from trainer import data
  path = str(tmp_path_factory.mktemp("tfds"))
  data.prepare("mnist", path)
  return path


@pytest.fixture
def tiny(tfds_dir, tmp_path):
  """A Config factory for runs of a few seconds on a small subset."""
  from trainer import config as config_lib

  def make(**overrides):
    values = dict(model_dir=str(tmp_path / "run"), data_dir=tfds_dir, train_steps=20,
                  global_batch_size=32, train_examples=512, eval_examples=500,
                  log_every_steps=10, checkpoint_every_steps=10, steps_per_loop=5,
                  model_widths=(8, 16), learning_rate=0.05)
    values.update(overrides)
    return config_lib.Config(**values)

  return make


def child_env(**extra):
  env = dict(os.environ)
  env.pop("TF_CONFIG", None)
  env.pop("CLUSTER_SPEC", None)
  env["PYTHONPATH"] = ROOT
  env["PYTHONUNBUFFERED"] = "1"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_module(module, *args, env=None, timeout=300, cwd=None):
  """Runs `python -m module args` and returns the CompletedProcess (stdout+stderr merged)."""
  return subprocess.run([sys.executable, "-m", module, *args], env=env or child_env(),
                        cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=timeout)


# Input errors must be reported before TensorFlow's seconds of start-up: on this PYTHONPATH
# `import tensorflow` fails, so a run that loads it cannot pass such a test.
WITHOUT_TF = os.pathsep.join([ROOT, os.path.join(ROOT, "tests", "without_tensorflow")])


def run_without_tf(module, *args, **env):
  """run_module() in a child that cannot import TensorFlow; env adds environment variables."""
  return run_module(module, *args, env=child_env(PYTHONPATH=WITHOUT_TF, **env))


def tiny_flags(model_dir, data_dir, **overrides):
  """Command-line flags equivalent to the `tiny` fixture."""
  values = dict(model_dir=model_dir, data_dir=data_dir, train_steps=20, global_batch_size=32,
                train_examples=512, eval_examples=500, log_every_steps=10,
                checkpoint_every_steps=10, steps_per_loop=5, model_widths="8,16",
                learning_rate=0.05)
  values.update(overrides)
  return [f"--{k}={v}" for k, v in values.items()]

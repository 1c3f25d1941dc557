"""Shared fixtures: MNIST (real or a tiny synthetic one) prepared once per session, tiny configs,
a subprocess runner and a GCS emulator; and how the xdist workers of `make test-fast` share the
tests (pytest_xdist_make_scheduler) and leave."""

import atexit
import gzip
import logging
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As the entry points do before TensorFlow loads (oneDNN on, INFO chatter off), so in-process
# tests run the kernels a real run does; and, as trainer.task does, no matplotlib under Keras
# (0.9 s of CPU in each test process; no test plots).
from trainer import startup  # noqa: E402  (after ROOT, before anything imports TensorFlow)
startup.set_tensorflow_environment()
startup.skip_plotting_imports()


def _leave_without_teardown() -> None:
  """An xdist worker's last exit handler: its results went to the controller long before, and
  the interpreter's teardown of TensorFlow only holds up the end of the session (0.9 s of CPU in
  each worker, the last seconds of `make test-fast`): the trick trainer.task uses
  (startup.exit_without_teardown). Registered when this file loads, so every handler registered
  later (Keras, TensorFlow, absl) has run; of those registered before, execnet's cleans up
  gateways this worker never opened, and logging's is called here."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # documented: exits without cleanup handlers or flushing stdio buffers


if os.environ.get("PYTEST_XDIST_WORKER"):
  atexit.register(_leave_without_teardown)


def pytest_ignore_collect(collection_path, config):
  """Under -m "not slow" (make test-fast), a module marked slow as a whole (`pytestmark =
  pytest.mark.slow`) is not even imported: every test of it would be deselected, after its
  import and pytest's assertion rewriting in every xdist worker (0.6 s of CPU each)."""
  if config.getoption("markexpr") != "not slow" or collection_path.suffix != ".py":
    return None
  with open(collection_path, encoding="utf-8") as f:
    whole_module_slow = "\npytestmark = pytest.mark.slow\n" in f.read()
  return True if whole_module_slow else None


# Groups of tests an xdist worker runs whole, each key a test module or a test of one (with all
# its parametrizations); pytest_xdist_make_scheduler below. A group holds
# - a module whose tests share a set-up that costs more than they do, once in a process (a
#   fork server and google.cloud.aiplatform_v1, 2.4 s of CPU; an export built with Keras; the
#   CRD schemas parsed from YAML, 0.9 s), or
# - tests that mostly wait (grace periods, retry deadlines, stalled servers, sleeping children:
#   80 s, 12 s of it CPU), in two chains, so that two workers wait while two keep both cores
#   busy, not four waiting at once and then four computing.
ONE_WORKER_GROUPS = {
    "tests/deploy_vertex_test.py": "vertex",
    "tests/predict_test.py": "predict",
    "tests/export_test.py": "export",
    "tests/k8s_manifests_test.py": "k8s",
    "tests/preemption_test.py": "waits-1",
    "tests/run_lock_test.py": "waits-1",
    "tests/launcher_test.py": "waits-2",
    "tests/storage_test.py": "waits-2",
    "tests/data_test.py::test_offline_install_without_vendored_mnist_fails_fast": "waits-2",
    "tests/data_test.py::test_mnist_download_from_a_stalled_server_is_bounded": "waits-2",
    "tests/data_test.py::test_lock_wait_is_bounded": "waits-2",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """--dist loadgroup (pytest.ini) as this suite wants it: a test goes to the next worker that
  is almost out of work (the longest wait or CPU-heavy test never queues behind others at the
  end), and each of ONE_WORKER_GROUPS goes whole to one worker, the largest first.

  xdist's own loadgroup groups by the xdist_group mark, through a suffix of the test's node id
  that pytest 9.2 no longer keeps (pytest-dev/pytest-xdist#1386): marked tests are spread like
  any others. This is its scheduler (xdist/scheduler/loadgroup.py: a work unit per scope, the
  largest first, the next one to a worker with two tests or fewer left), the scope also read
  from ONE_WORKER_GROUPS. Other --dist modes are xdist's own."""
  if config.getoption("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadGroupScheduling  # pylint: disable=import-outside-toplevel

  class ModuleGroups(LoadGroupScheduling):
    def _split_scope(self, nodeid: str) -> str:
      test = nodeid.split("[", 1)[0]
      return (ONE_WORKER_GROUPS.get(test) or ONE_WORKER_GROUPS.get(test.split("::", 1)[0])
              or super()._split_scope(nodeid))

  return ModuleGroups(config, log)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """TFDS mnist prepared from the vendored files, shared by every test of the session."""
  from trainer import data
  path = str(tmp_path_factory.mktemp("tfds"))
  data.prepare("mnist", path)
  return path


SYNTHETIC_SIZES = {"train": 1200, "test": 300}


@pytest.fixture(scope="session")
def synthetic_tfds_dir(tmp_path_factory):
  """A tiny MNIST-shaped dataset prepared as TFDS `mnist` (4 record files per split) in a second
  or two, for tests of the data path that need no real digits: class c is a bright c-th row band
  on noise, so it is learnable, and every image differs."""
  from trainer import data
  source = tmp_path_factory.mktemp("synthetic-idx")
  rng = __import__("numpy").random.default_rng(0)
  for prefix, split in (("train", "train"), ("t10k", "test")):
    count = SYNTHETIC_SIZES[split]
    labels = (rng.permutation(count) % 10).astype("uint8")
    images = rng.integers(0, 60, size=(count, 28, 28), dtype="uint8")
    for i, label in enumerate(labels):
      images[i, 2 + 2 * label:4 + 2 * label, :] = 255
    _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", 0x0803, images)
    _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 0x0801, labels)
  path = str(tmp_path_factory.mktemp("synthetic-tfds"))
  # As trainer/data/sources.py writes MNIST, without data.prepare's check of the canonical
  # files' hashes, and without the decoded cache (tests decode it as a later run would).
  from trainer.data import mnist_tfds
  mnist_tfds.write(data.tfds_builder("mnist", path), str(source), num_shards=4)
  return path


def _write_idx(path, magic: int, array) -> None:
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
    f.write(array.tobytes())


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


@pytest.fixture
def small_disk(tmp_path, request):
  """A tmpfs of 8 MiB (or the size a test passes with indirect parametrization, e.g. "1m"): a
  real file system that really fills up (needs root, as in CI)."""
  size = getattr(request, "param", "8m")
  mount_point = tmp_path / "small_disk"
  mount_point.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
  try:
    yield mount_point
  finally:
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def emulator(request):
  """A gcp-storage-emulator process (tests/gcs_emulator.py) for the test module that asks for it,
  with the buckets the module names in its EMULATOR_BUCKETS (a tuple of bucket names) created.

  One per module, as each module had its own before: a module's objects and the emulator's
  request log (Emulator.downloads) are its own. A module without EMULATOR_BUCKETS gets an empty
  emulator; a test may create more buckets with emulator.create_bucket(name). (A fixture reading
  the requesting module through request.module is pytest's documented pattern: "Fixtures can
  introspect the requesting test context", docs.pytest.org/en/stable/how-to/fixtures.html.)
  """
  from gcs_emulator import Emulator
  with Emulator() as emu:
    for bucket in getattr(request.module, "EMULATOR_BUCKETS", ()):
      emu.create_bucket(bucket)
    yield emu

"""Table tests for trainer.runtime.distribute: CPU replicas auto picks, the all-reduce, the input path."""

import json
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import child_env
from trainer.runtime import cluster
from trainer import config as config_lib
from trainer.runtime import distribute
from trainer import errors

SINGLE = cluster.ClusterInfo()
TWO_WORKERS = cluster.parse_cluster({"TF_CONFIG": json.dumps({
    "cluster": {"worker": ["localhost:1001", "localhost:1002"]},
    "task": {"type": "worker", "index": 0}})})


def _config(**kw):
  return config_lib.Config(epochs=1, **kw)


@pytest.mark.parametrize("kw, the_cluster, gpus, cores, expected", [
    ({}, SINGLE, 0, 2, 2),  # the default batch 256 on 2 cores: one replica per core
    ({}, SINGLE, 0, 1, 1),
    ({}, SINGLE, 0, 8, 4),  # 256 / 64 caps it at 4 replicas
    (dict(global_batch_size=128), SINGLE, 0, 2, 2),
    (dict(global_batch_size=96), SINGLE, 0, 2, 1),  # 48 per replica is too few
    (dict(global_batch_size=192), SINGLE, 0, 4, 3),  # 192 / 64 = 3, which divides 192
    (dict(global_batch_size=320), SINGLE, 0, 4, 4),  # 5 would exceed the cores
    (dict(global_batch_size=448), SINGLE, 0, 6, 4),  # 6 and 5 do not divide 448
    ({}, SINGLE, 1, 2, 1),  # GPUs: the CPU is not split
    ({}, TWO_WORKERS, 0, 2, 1),  # each worker is one replica
    (dict(strategy="one_device"), SINGLE, 0, 2, 1),
    (dict(strategy="mirrored"), SINGLE, 0, 2, 2),
    (dict(num_cpu_devices=1), SINGLE, 0, 2, 1),  # explicit wins
    (dict(num_cpu_devices=3), SINGLE, 0, 2, 3),
])
def test_cpu_device_count(kw, the_cluster, gpus, cores, expected):
  assert distribute.cpu_device_count(_config(**kw).runtime, _config(**kw).training.global_batch_size,
                                     the_cluster, gpus, cores) == expected


@pytest.mark.parametrize("devices, gpus, expected", [
    (2, 0, "mirrored"), (1, 0, "one_device"), (1, 2, "mirrored"), (1, 1, "one_device")])
def test_choose_kind_single_task(devices, gpus, expected):
  assert distribute.choose_kind("auto", SINGLE, gpus, devices) == expected


def test_choose_kind_multi_worker():
  assert distribute.choose_kind("auto", TWO_WORKERS, 0, 1) == "multi_worker_mirrored"


@pytest.mark.parametrize("requested, gpus, expected", [
    ("auto", 0, "ring"),  # CPU-only: NCCL cannot reduce CPU tensors
    ("auto", 1, "nccl"),  # one GPU per worker is still a GPU all-reduce
    ("auto", 8, "nccl"),
    ("ring", 0, "ring"), ("ring", 4, "ring"),  # explicit choices are kept
    ("nccl", 1, "nccl"), ("nccl", 4, "nccl"),
])
def test_choose_collective(requested, gpus, expected):
  assert distribute.choose_collective(requested, gpus) == expected


def test_nccl_without_gpus_is_an_error():
  with pytest.raises(errors.ConfigError, match="--collective_implementation=nccl needs GPUs"):
    distribute.choose_collective("nccl", 0)


@pytest.mark.parametrize("collective, implementation", [
    ("ring", tf.distribute.experimental.CommunicationImplementation.RING),
    ("nccl", tf.distribute.experimental.CommunicationImplementation.NCCL)])
def test_communication_options_carry_the_flags(collective, implementation):
  options = distribute.communication_options(
      _config(bytes_per_pack=4 << 20, collective_timeout_s=42.0).runtime, collective)
  assert options.implementation == implementation
  assert options.bytes_per_pack == 4 << 20 and options.timeout_seconds == 42.0
  assert distribute.communication_options(_config().runtime, collective).bytes_per_pack == 0


def test_mirrored_all_reduce_by_device():
  """CPUs reduce through one device; GPUs get NcclAllReduce for nccl (auto's choice there) and
  TensorFlow's default collective (RING) for ring."""
  assert isinstance(distribute.mirrored_cross_device_ops("ring", 0),
                    tf.distribute.ReductionToOneDevice)
  assert isinstance(distribute.mirrored_cross_device_ops(
      distribute.choose_collective("auto", 4), 4), tf.distribute.NcclAllReduce)
  assert distribute.mirrored_cross_device_ops("ring", 4) is None


@pytest.mark.parametrize("kind, collective, gpus, pack, expected", [
    ("one_device", "ring", 0, 0, "none (one replica)"),
    ("mirrored", "ring", 0, 0, "ReductionToOneDevice across this machine's CPU devices"),
    ("mirrored", "nccl", 4, 0, "NCCL (NcclAllReduce) across 4 GPUs"),
    ("mirrored", "ring", 2, 0, "RING (TensorFlow's collective all-reduce) across 2 GPUs"),
    ("multi_worker_mirrored", "ring", 0, 0, "RING between workers, packs of TensorFlow's choice"),
    ("multi_worker_mirrored", "nccl", 1, 1024, "NCCL between workers, packs of 1024 bytes"),
])
def test_all_reduce_description(kind, collective, gpus, pack, expected):
  assert distribute.all_reduce_description(kind, collective, gpus, pack) == expected


def test_start_up_log_names_the_all_reduce_and_an_ignored_pack_size(caplog):
  caplog.set_level("INFO")
  distribute._log_all_reduce(_config(bytes_per_pack=1024).runtime, "mirrored", "ring", 0)
  assert "All-reduce: ReductionToOneDevice across this machine's CPU devices " \
         "(--collective_implementation=auto)." in caplog.text
  assert "--bytes_per_pack=1024 applies to the all-reduce between workers; this mirrored run " \
         "ignores it." in caplog.text
  caplog.clear()
  distribute._log_all_reduce(_config(bytes_per_pack=1024).runtime, "multi_worker_mirrored", "ring", 0)
  assert "packs of 1024 bytes" in caplog.text and "ignores it" not in caplog.text


@pytest.mark.parametrize("overrides, message", [
    (dict(collective_implementation="mpi"), "--collective_implementation='mpi': use one of"),
    (dict(bytes_per_pack=-1), "--bytes_per_pack must be >= 0"),
])
def test_bad_all_reduce_flags_name_the_flag(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    _config(**overrides)


@pytest.mark.slow
def test_tensorflow_started_before_the_run_keeps_its_devices():
  """A second run in one process (a notebook) cannot split the CPU again: it must still train."""
  script = (
      "import tensorflow as tf\n"
      "from trainer import config\nfrom trainer.runtime import cluster, distribute\n"
      "tf.constant(1.0) + 1  # TensorFlow starts with one CPU device\n"
      "c = config.Config(epochs=1, num_cpu_devices=2)\n"
      "rt = distribute.create_runtime(c.runtime, c.training.global_batch_size,"
      " cluster.ClusterInfo())\n"
      "print('replicas', rt.kind, rt.num_replicas)\n"
      "print('sum', float(rt.strategy.reduce('SUM', rt.strategy.run(lambda: tf.constant(2.0)),"
      " axis=None)))\n")
  result = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "replicas mirrored 1" in result.stdout and "sum 2.0" in result.stdout
  assert "using its 1 CPU device(s) instead of 2" in result.stderr


_INPUT_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
from trainer.runtime import cluster
from trainer import config
from trainer import data
from trainer.runtime import distribute
kind = sys.argv[1]
if kind == "multi_worker_mirrored":  # one local worker: no TF_CONFIG needed
  rt = distribute.Runtime(tf.distribute.MultiWorkerMirroredStrategy(), cluster.ClusterInfo(), kind)
else:
  c = config.Config(epochs=1, strategy=kind, num_cpu_devices=2 if kind == "mirrored" else 1)
  rt = distribute.create_runtime(c.runtime, c.training.global_batch_size, cluster.ClusterInfo())
labels = np.arange(100, dtype=np.int32)
fn = data.train_dataset_fn(np.zeros((100, 2, 2, 1), np.uint8), labels, 8, 3, 0, 26)
def take(iterator):
  return [[r.numpy().tolist() for r in rt.strategy.experimental_local_results(next(iterator)[1])]
          for _ in range(26)]
ours = take(distribute.input_iterator(rt, fn))
default = take(iter(rt.strategy.distribute_datasets_from_function(fn)))
print(json.dumps({"replicas": rt.num_replicas, "ours": ours, "default": default}))
"""


@pytest.mark.parametrize("kind, replicas", [
    ("one_device", 1), ("mirrored", 2), ("multi_worker_mirrored", 1)])
@pytest.mark.slow
def test_input_iterator_feeds_replicas_like_tf_distribute(kind, replicas):
  """Our CPU input path (no MultiDeviceIterator) gives every replica the batches tf.distribute's
  default path would, for each strategy kind."""
  result = subprocess.run([sys.executable, "-c", _INPUT_SCRIPT, kind], env=child_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["replicas"] == replicas
  assert out["ours"] == out["default"]
  steps = out["ours"]
  assert all(len(step) == replicas and len(step[0]) == 8 // replicas for step in steps)
  for epoch in (steps[:13], steps[13:]):  # 100 examples / batch 8 = 13 steps, last one padded
    assert {label for step in epoch for row in step for label in row} == set(range(100))


@pytest.mark.slow
def test_multi_worker_strategy_gets_the_communication_options():
  """The options reach MultiWorkerMirroredStrategy: a one-worker strategy built the way
  create_runtime builds it all-reduces with them and reports them."""
  script = (
      "import tensorflow as tf\n"
      "from trainer import config\nfrom trainer.runtime import cluster, distribute\n"
      "c = config.Config(epochs=1, bytes_per_pack=4096, collective_timeout_s=30.0)\n"
      "s = distribute._multi_worker(cluster.ClusterInfo(), distribute.communication_options(\n"
      "    c.runtime, distribute.choose_collective(c.runtime.collective_implementation, 0)))\n"
      "o = s.extended._communication_options\n"
      "print('options', o.implementation.value, o.bytes_per_pack, o.timeout_seconds)\n"
      "print('sum', float(s.reduce('SUM', s.run(lambda: tf.constant(2.0)), axis=None)))\n")
  result = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "options RING 4096 30.0" in result.stdout and "sum 2.0" in result.stdout

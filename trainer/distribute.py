"""Chooses and creates the tf.distribute strategy: the only place that decides how to distribute."""

import dataclasses
import logging
import os

import tensorflow as tf

from trainer import cluster as cluster_lib
from trainer import cores as cores_lib
from trainer import gpu as gpu_lib

# Auto CPU replicas stop at this many examples each: smaller per-replica batches leave the
# kernels too little work to beat one multi-threaded device (not measured beyond 2 cores).
MIN_REPLICA_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Runtime:
  """The strategy plus who we are in the cluster: everything chief-only logic needs."""

  strategy: tf.distribute.Strategy
  cluster: cluster_lib.ClusterInfo
  kind: str  # one_device | mirrored | multi_worker_mirrored

  @property
  def is_chief(self) -> bool:
    return self.cluster.is_chief

  @property
  def num_workers(self) -> int:
    return max(1, self.cluster.num_workers)

  @property
  def num_replicas(self) -> int:
    return self.strategy.num_replicas_in_sync


def choose_kind(requested: str, cluster: cluster_lib.ClusterInfo, num_gpus: int,
                num_cpu_devices: int) -> str:
  """auto: multi-worker when TF_CONFIG lists several tasks, mirrored with several devices."""
  cluster_lib.check_strategy(requested, cluster, num_cpu_devices)
  if requested == "auto":
    if cluster.is_multi_worker:
      return "multi_worker_mirrored"
    if num_gpus > 1 or (num_gpus == 0 and num_cpu_devices > 1):
      return "mirrored"
    return "one_device"
  return requested


def cpu_device_count(config, cluster: cluster_lib.ClusterInfo, num_gpus: int,
                     cores: int) -> int:
  """--num_cpu_devices, or for 0 (auto) one replica per core on a single CPU-only task.

  Small ops split over several threads waste much of each core (bench/README.md has the
  measurements), so auto gives each core its own single-threaded replica, as long as each
  replica keeps MIN_REPLICA_BATCH examples.
  """
  if config.num_cpu_devices:
    return config.num_cpu_devices
  if num_gpus or cluster.is_multi_worker or config.strategy not in ("auto", "mirrored"):
    return 1
  count = min(cores, config.global_batch_size // MIN_REPLICA_BATCH)
  while count > 1 and config.global_batch_size % count:
    count -= 1
  return max(1, count)


def _split_cpu(num_cpu_devices: int, cores: int) -> int:
  """Splits the CPU; returns the logical CPU devices to use (fewer if TF already started)."""
  cpus = tf.config.list_physical_devices("CPU")
  # Each replica's ops run on their own core: with one thread pool shared by all replicas,
  # inter-op threads >= replicas lets them run side by side.
  intra = max(1, cores // num_cpu_devices)
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, num_cpu_devices))
  except RuntimeError:
    # TensorFlow already runs in this process (a second run in a notebook, say): its devices
    # and thread pools are fixed now, so train on the CPU devices it has.
    have = len(tf.config.list_logical_devices("CPU"))
    logging.warning("TensorFlow was initialized before this run: using its %d CPU device(s) "
                    "instead of %d (start a new process for one replica per core).", have,
                    num_cpu_devices)
    return min(have, num_cpu_devices)
  logging.info("CPU split into %d logical devices, %d intra-op thread(s) each.",
               num_cpu_devices, intra)
  return num_cpu_devices


def create_runtime(config, cluster: cluster_lib.ClusterInfo) -> Runtime:
  """Creates the strategy; must run before any other TensorFlow op (TF's rule)."""
  # Before the strategy: a GPU machine whose GPUs TensorFlow cannot load must not train on CPU.
  gpus = gpu_lib.usable_gpus(config.require_gpu)
  cores = cores_lib.available()
  num_cpu_devices = cpu_device_count(config, cluster, len(gpus), cores)
  kind = choose_kind(config.strategy, cluster, len(gpus), num_cpu_devices)
  if kind == "multi_worker_mirrored":
    strategy = _multi_worker(config, cluster)
  elif kind == "mirrored":
    strategy = _mirrored(gpus, num_cpu_devices, cores)
  else:
    strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  logging.info("Strategy %s with %d replica(s); this task is %s%s.", kind,
               strategy.num_replicas_in_sync, cluster.task_name,
               " (chief)" if cluster.is_chief else "")
  return Runtime(strategy=strategy, cluster=cluster, kind=kind)


def _mirrored(gpus, num_cpu_devices: int, cores: int) -> tf.distribute.Strategy:
  if gpus:
    return tf.distribute.MirroredStrategy()
  if num_cpu_devices > 1:
    num_cpu_devices = _split_cpu(num_cpu_devices, cores)
  devices = [f"/cpu:{i}" for i in range(num_cpu_devices)]
  # NCCL (the default) needs GPUs; reduce through one device on CPU.
  return tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())


def _multi_worker(config, cluster) -> tf.distribute.Strategy:
  if cluster.tf_config is not None:
    os.environ["TF_CONFIG"] = cluster.tf_config  # TF's resolver reads the normalized form.
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=tf.distribute.experimental.CommunicationImplementation.RING,
      timeout_seconds=config.collective_timeout_s)
  return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def input_iterator(runtime: Runtime, dataset_fn):
  """The training input iterator for dataset_fn, built so that deleting it never stalls.

  tf.distribute's default input path feeds replicas through a MultiDeviceIterator whose
  per-device datasets run tf.data's autotune thread, and their options cannot be set. Deleting
  the iterator waits out that thread's sleep, which doubles up to 60 s, so a run could pause
  that long after its last step. On CPUs nothing needs fetching to a device, so each local
  replica reads its own pipeline directly (bench/README.md: no pause, and more images/s).
  GPUs keep the default path, which prefetches onto them.
  """
  strategy = runtime.strategy
  devices = strategy.extended.worker_devices
  if any("GPU" in device.upper() for device in devices):
    return iter(strategy.distribute_datasets_from_function(dataset_fn))
  if runtime.kind == "mirrored":
    return iter(strategy.distribute_datasets_from_function(dataset_fn, tf.distribute.InputOptions(
        experimental_fetch_to_device=False,
        experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)))
  if len(devices) != 1:
    raise ValueError(f"{runtime.kind} with {len(devices)} local CPU replicas is not supported.")
  # One local replica (one device, or one per worker): its own pipeline, sharded with the
  # input context the strategy itself builds; the strategy's wrapper is never iterated.
  made = []

  def keep(ctx):
    made.append(dataset_fn(ctx))
    return made[-1]

  strategy.distribute_datasets_from_function(keep)
  return iter(made[0])

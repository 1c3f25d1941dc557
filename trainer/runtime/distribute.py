"""Chooses and creates the tf.distribute strategy: the only place that decides how to distribute."""

import dataclasses
import logging
import os

import tensorflow as tf

from trainer.runtime import cluster as cluster_lib
from trainer.runtime import cores as cores_lib
from trainer import config as config_lib
from trainer import errors
from trainer.runtime import gpu as gpu_lib

# Auto CPU replicas stop at this many examples each: smaller per-replica batches leave the
# kernels too little work to beat one multi-threaded device (not measured beyond 2 cores).
MIN_REPLICA_BATCH = 64

# --collective_implementation's values, as the multi-worker all-reduce's CommunicationOptions.
_IMPLEMENTATIONS = {"ring": tf.distribute.experimental.CommunicationImplementation.RING,
                    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}


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


def cpu_device_count(config: config_lib.RuntimeConfig, global_batch_size: int, cluster: cluster_lib.ClusterInfo,
                     num_gpus: int, cores: int) -> int:
  """--num_cpu_devices, or for 0 (auto) one replica per core on a single CPU-only task.

  Small ops split over several threads waste much of each core (bench/README.md has the
  measurements), so auto gives each core its own single-threaded replica, as long as each
  replica keeps MIN_REPLICA_BATCH examples.
  """
  if config.num_cpu_devices:
    return config.num_cpu_devices
  if num_gpus or cluster.is_multi_worker or config.strategy not in ("auto", "mirrored"):
    return 1
  count = min(cores, global_batch_size // MIN_REPLICA_BATCH)
  while count > 1 and global_batch_size % count:
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


def create_runtime(config: config_lib.RuntimeConfig, global_batch_size: int,
                   cluster: cluster_lib.ClusterInfo) -> Runtime:
  """Creates the strategy of a RuntimeConfig (trainer/config.py) for the run's global batch;
  must run before any other TensorFlow op (TF's rule)."""
  # Before the strategy: a GPU machine whose GPUs TensorFlow cannot load must not train on CPU.
  gpus = gpu_lib.usable_gpus(config.require_gpu)
  cores = cores_lib.available()
  num_cpu_devices = cpu_device_count(config, global_batch_size, cluster, len(gpus), cores)
  kind = choose_kind(config.strategy, cluster, len(gpus), num_cpu_devices)
  collective = choose_collective(config.collective_implementation, len(gpus))
  if kind == "multi_worker_mirrored":
    strategy = _multi_worker(cluster, communication_options(config, collective))
  elif kind == "mirrored":
    strategy = _mirrored(gpus, num_cpu_devices, cores, collective)
  else:
    strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  logging.info("Strategy %s with %d replica(s); this task is %s%s.", kind,
               strategy.num_replicas_in_sync, cluster.task_name,
               " (chief)" if cluster.is_chief else "")
  _log_all_reduce(config, kind, collective, len(gpus))
  return Runtime(strategy=strategy, cluster=cluster, kind=kind)


def choose_collective(requested: str, num_gpus: int) -> str:
  """The all-reduce implementation, "nccl" or "ring": auto is NCCL when the replicas are GPUs.

  NCCL reduces GPU tensors only; TensorFlow falls back to RING for CPU tensors
  (tf.distribute.experimental.CommunicationImplementation's docstring), so nccl without a GPU
  would silently be ring: an error instead. One GPU per worker is still a GPU all-reduce.
  """
  if requested == "auto":
    return "nccl" if num_gpus else "ring"
  if requested == "nccl" and not num_gpus:
    raise errors.ConfigError(
        "--collective_implementation=nccl needs GPUs, but TensorFlow sees none: use "
        "--collective_implementation=auto (RING on CPUs) or ring, or run on GPUs.")
  return requested


def communication_options(config: config_lib.RuntimeConfig, collective: str):
  """The multi-worker all-reduce options: implementation, --bytes_per_pack and the timeout.

  bytes_per_pack 0 lets TensorFlow choose the pack size (CommunicationOptions' docstring:
  "If it's zero, the value is determined automatically").
  """
  return tf.distribute.experimental.CommunicationOptions(
      bytes_per_pack=config.bytes_per_pack, timeout_seconds=config.collective_timeout_s,
      implementation=_IMPLEMENTATIONS[collective])


def mirrored_cross_device_ops(collective: str, num_gpus: int):
  """MirroredStrategy's all-reduce across this machine's devices (None: TensorFlow's default).

  Its default on GPUs is not NCCL, whatever MirroredStrategy's docstring says: TF 2.21 sets
  CollectiveAllReduce with the AUTO hint (mirrored_strategy.py, "set it to collective op by
  default"), and the runtime picks NcclReduce only for the hint "nccl" or ConfigProto's
  collective_nccl (tensorflow/core/common_runtime/collective_param_resolver_local.cc,
  AssignCollectiveType), which eager TensorFlow leaves off; so the default is RingReduce.
  nccl therefore asks for NcclAllReduce by name. (Read from the source; the GPU paths were not
  run here, which has no GPU.)
  """
  if not num_gpus:
    # Logical CPU devices: reduce through one device (NCCL needs GPUs).
    return tf.distribute.ReductionToOneDevice()
  if collective == "nccl":
    return tf.distribute.NcclAllReduce()
  return None


def all_reduce_description(kind: str, collective: str, num_gpus: int, bytes_per_pack: int) -> str:
  """What reduces the gradients, for the start-up log."""
  if kind == "one_device":
    return "none (one replica)"
  if kind == "mirrored":
    if not num_gpus:
      return "ReductionToOneDevice across this machine's CPU devices"
    if collective == "nccl":
      return f"NCCL (NcclAllReduce) across {num_gpus} GPUs"
    return f"RING (TensorFlow's collective all-reduce) across {num_gpus} GPUs"
  pack = f"{bytes_per_pack} bytes" if bytes_per_pack else "TensorFlow's choice"
  return f"{collective.upper()} between workers, packs of {pack}"


def _log_all_reduce(config: config_lib.RuntimeConfig, kind: str, collective: str, num_gpus: int) -> None:
  logging.info("All-reduce: %s (--collective_implementation=%s).",
               all_reduce_description(kind, collective, num_gpus, config.bytes_per_pack),
               config.collective_implementation)
  if config.bytes_per_pack and kind != "multi_worker_mirrored":
    # MirroredStrategy takes no CommunicationOptions; only the workers' all-reduce packs.
    logging.warning("--bytes_per_pack=%d applies to the all-reduce between workers; this "
                    "%s run ignores it.", config.bytes_per_pack, kind)


def _mirrored(gpus, num_cpu_devices: int, cores: int, collective: str) -> tf.distribute.Strategy:
  if gpus:
    return tf.distribute.MirroredStrategy(
        cross_device_ops=mirrored_cross_device_ops(collective, len(gpus)))
  if num_cpu_devices > 1:
    num_cpu_devices = _split_cpu(num_cpu_devices, cores)
  devices = [f"/cpu:{i}" for i in range(num_cpu_devices)]
  return tf.distribute.MirroredStrategy(
      devices, cross_device_ops=mirrored_cross_device_ops(collective, 0))


def _multi_worker(cluster, options) -> tf.distribute.Strategy:
  if cluster.tf_config is not None:
    os.environ["TF_CONFIG"] = cluster.tf_config  # TF's resolver reads the normalized form.
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


def num_input_pipelines(runtime: Runtime) -> int:
  """How many input pipelines input_iterator builds in the whole job (one per local replica on
  CPUs under MirroredStrategy, else one per worker); sharding plans are made for this many."""
  devices = runtime.strategy.extended.worker_devices
  if runtime.kind == "mirrored" and not any("GPU" in d.upper() for d in devices):
    return runtime.num_replicas
  return runtime.num_workers


def local_pipeline_ids(runtime: Runtime) -> tuple:
  """The ids (of num_input_pipelines) of the input pipelines this process builds, known before
  building any: under MultiWorkerMirroredStrategy one, from the InputContext the strategy
  itself hands input_iterator; otherwise all of them, since one process holds every pipeline."""
  if runtime.kind != "multi_worker_mirrored":
    return tuple(range(num_input_pipelines(runtime)))
  ids = []

  def probe(ctx):
    ids.append(ctx.input_pipeline_id)
    return tf.data.Dataset.range(1)

  runtime.strategy.distribute_datasets_from_function(probe)
  return tuple(sorted(set(ids)))

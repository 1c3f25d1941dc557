"""Chooses and creates the tf.distribute strategy: the only place that decides how to distribute."""

import dataclasses
import logging
import os

import tensorflow as tf

from trainer import cluster as cluster_lib


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
  if requested == "auto":
    if cluster.is_multi_worker:
      return "multi_worker_mirrored"
    if num_gpus > 1 or (num_gpus == 0 and num_cpu_devices > 1):
      return "mirrored"
    return "one_device"
  cluster_lib.check_strategy(requested, cluster)
  return requested


def _split_cpu(num_cpu_devices: int) -> None:
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices)


def create_runtime(config, cluster: cluster_lib.ClusterInfo) -> Runtime:
  """Creates the strategy; must run before any other TensorFlow op (TF's rule)."""
  gpus = tf.config.list_physical_devices("GPU")
  kind = choose_kind(config.strategy, cluster, len(gpus), config.num_cpu_devices)
  if kind == "multi_worker_mirrored":
    strategy = _multi_worker(config, cluster)
  elif kind == "mirrored":
    strategy = _mirrored(config, gpus)
  else:
    strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  logging.info("Strategy %s with %d replica(s); this task is %s%s.", kind,
               strategy.num_replicas_in_sync, cluster.task_name,
               " (chief)" if cluster.is_chief else "")
  return Runtime(strategy=strategy, cluster=cluster, kind=kind)


def _mirrored(config, gpus) -> tf.distribute.Strategy:
  if gpus:
    return tf.distribute.MirroredStrategy()
  if config.num_cpu_devices > 1:
    _split_cpu(config.num_cpu_devices)
  devices = [f"/cpu:{i}" for i in range(config.num_cpu_devices)]
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

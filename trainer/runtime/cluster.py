"""Reads the cluster layout from TF_CONFIG (or Vertex AI's CLUSTER_SPEC, or a JobSet pod's
environment) and validates it."""

import dataclasses
import json
import logging
from typing import Mapping, Optional

from trainer import errors
from trainer.runtime import indexed_pod

# Vertex AI names its worker pools; pool 0 is the chief, pool 1 the workers, 2 parameter servers,
# 3 the evaluator (cloud.google.com/vertex-ai/docs/training/distributed-training).
_VERTEX_POOLS = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps",
                 "workerpool3": "evaluator"}
# The training task types of a validated cluster. TF_CONFIG may say "master", the chief's name
# before TF 2 (Kubeflow's v1 TFJob "Master" replica, AI Platform's "master"); TF 2.21 refuses it
# (multi_worker_util._validate_cluster_spec allows only chief, worker, evaluator and ps, so
# MultiWorkerMirroredStrategy raised ValueError: exit 1), so it is read as "chief", for the
# cluster and the task alike.
_TRAINING_TASK_TYPES = ("chief", "worker")
_LEGACY_CHIEF = "master"
# The side-car evaluator reads checkpoints and takes no part in the training collectives.
EVALUATOR = "evaluator"


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
  """Who this process is in the cluster; a single process without TF_CONFIG is worker 0 of 1."""

  cluster: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  task_type: str = "worker"
  task_index: int = 0
  # The TF_CONFIG to hand to TensorFlow (normalized; e.g. built from CLUSTER_SPEC).
  tf_config: Optional[str] = None

  @property
  def num_workers(self) -> int:
    return sum(len(self.cluster.get(t, ())) for t in _TRAINING_TASK_TYPES)

  @property
  def is_multi_worker(self) -> bool:
    return self.num_workers > 1

  @property
  def is_evaluator(self) -> bool:
    return self.task_type == EVALUATOR

  @property
  def chief_task(self) -> tuple:
    return ("chief", 0) if self.cluster.get("chief") else ("worker", 0)

  @property
  def is_chief(self) -> bool:
    return (self.task_type, self.task_index) == self.chief_task

  @property
  def task_name(self) -> str:
    return f"{self.task_type}:{self.task_index}"

  def address_of(self, task_type: str, task_index: int) -> str:
    return self.cluster[task_type][task_index]

  def peers(self) -> list:
    """(task name, address) of every training task except this one."""
    out = []
    for task_type in _TRAINING_TASK_TYPES:
      for index, address in enumerate(self.cluster.get(task_type, ())):
        if (task_type, index) != (self.task_type, self.task_index):
          out.append((f"{task_type}:{index}", address))
    return out


_logged = set()


def _log_once(message: str) -> None:
  """parse_cluster runs twice in a run (flags check, then training): say it once."""
  if message not in _logged:
    _logged.add(message)
    logging.info(message)


def _load_json(text: str, name: str) -> dict:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.ConfigError(f"${name} is not valid JSON ({e}); fix or unset it.") from None
  if not isinstance(value, dict):
    raise errors.ConfigError(f"${name} must be a JSON object, got {type(value).__name__}.")
  return value


def _from_cluster_spec(spec: dict) -> dict:
  """Translates Vertex AI's CLUSTER_SPEC into the TF_CONFIG layout."""
  pools = spec.get("cluster") or {}
  if not isinstance(pools, dict):
    raise errors.ConfigError("$CLUSTER_SPEC: 'cluster' must map worker pools to address lists.")
  cluster = {}
  for pool, addresses in pools.items():
    if pool not in _VERTEX_POOLS:
      raise errors.ConfigError(f"$CLUSTER_SPEC has unknown worker pool {pool!r}.")
    cluster[_VERTEX_POOLS[pool]] = addresses
  task = spec.get("task")
  if not isinstance(task, dict):
    return {"cluster": cluster, "task": task}  # parse_cluster names what is missing
  task = dict(task)
  if isinstance(task.get("type"), str):
    task["type"] = _VERTEX_POOLS.get(task["type"], task["type"])
  return {"cluster": cluster, "task": task}


def parse_cluster(environ: Mapping[str, str]) -> ClusterInfo:
  """Validates TF_CONFIG (or CLUSTER_SPEC) before any training; errors name the variable.

  Without either, a pod of a deploy/k8s JobSet or TrainJob builds its TF_CONFIG from its own
  environment (trainer/runtime/indexed_pod.py); anything else is a single process.
  """
  name = "TF_CONFIG"
  text = environ.get("TF_CONFIG", "").strip()
  if not text and environ.get("CLUSTER_SPEC", "").strip():
    name = "CLUSTER_SPEC"
    tf_config = _from_cluster_spec(_load_json(environ["CLUSTER_SPEC"], name))
  elif text:
    tf_config = _load_json(text, name)
  elif indexed_pod.is_indexed_pod(environ):
    name = "TF_CONFIG (built from the JobSet pod's environment)"
    tf_config = indexed_pod.tf_config(environ)
    _log_once(f"TF_CONFIG built from the JobSet pod's environment: {json.dumps(tf_config)}")
  else:
    return ClusterInfo()
  cluster = tf_config.get("cluster")
  if not cluster:
    # Only a task, or nothing: TensorFlow treats this as a single worker. An evaluator needs
    # no addresses (it only reads checkpoints), so {"task": {"type": "evaluator"}} is one.
    task = tf_config.get("task")
    if isinstance(task, dict) and task.get("type") == EVALUATOR:
      return ClusterInfo(task_type=EVALUATOR, task_index=_evaluator_index(task, {}, name))
    return ClusterInfo()
  if not isinstance(cluster, dict):
    raise errors.ConfigError(f"${name}: 'cluster' must map task types to address lists.")
  cluster = _validate_cluster(cluster, name)
  task_type, task_index = _validate_task(tf_config.get("task"), cluster, name)
  return ClusterInfo(cluster=cluster, task_type=task_type, task_index=task_index,
                     tf_config=_normalized(cluster, task_type, task_index))


def _normalized(cluster: dict, task_type: str, task_index: int) -> str:
  """The TF_CONFIG TensorFlow gets: a training task's cluster without the evaluator.

  TF 2.21's MultiWorkerMirroredStrategy already leaves the evaluator out of its worker count
  and coordination service (multi_worker_util.worker_count; collective_all_reduce_strategy.py
  coordinates only "chief" and "worker"), and two workers with a dead evaluator address in
  TF_CONFIG all-reduced normally here. It is dropped anyway, as TensorFlow's own
  distribute_coordinator._split_cluster_for_evaluator does, so no training task's gRPC server
  even lists it. The evaluator's own cluster is the evaluator alone.
  """
  if task_type == EVALUATOR:
    kept = {EVALUATOR: cluster.get(EVALUATOR, ())}
  else:
    kept = {k: v for k, v in cluster.items() if k != EVALUATOR}
  return json.dumps({"cluster": {k: list(v) for k, v in kept.items()},
                     "task": {"type": task_type, "index": task_index}})


def check_strategy(requested: str, cluster: ClusterInfo, num_cpu_devices: int = 0) -> None:
  """--strategy and --num_cpu_devices must fit the cluster; checked before TensorFlow loads.

  multi_worker_mirrored over a TF_CONFIG that lists one training task is accepted: TF 2.21 runs
  MultiWorkerMirroredStrategy with one worker (a one-worker TF_CONFIG trained 20 steps,
  checkpointed, evaluated and exported here; tests/cluster_test.py runs it), as a one-node job
  given that flag by its own script would start (deploy/slurm/train.sbatch passes
  --strategy=auto, which picks mirrored over the node's devices there). The evaluator takes the
  workers' flags and uses no strategy (it evaluates on one device), so its --strategy is not
  checked.
  """
  if cluster.is_evaluator:
    return
  if num_cpu_devices > 1 and cluster.is_multi_worker:
    raise errors.ConfigError(
        f"--num_cpu_devices={num_cpu_devices} but TF_CONFIG describes {cluster.num_workers} "
        "workers, and a multi-worker job runs one replica per worker: drop --num_cpu_devices, "
        "or start more workers.")
  if requested == "multi_worker_mirrored" and not cluster.num_workers:
    raise errors.ConfigError(
        "--strategy=multi_worker_mirrored needs TF_CONFIG (or CLUSTER_SPEC) listing the "
        "workers, and neither is set: start the workers with `make cluster` (README 'Local "
        "cluster') or a platform's tool (deploy/README.md), or use --strategy=auto.")
  if requested in ("one_device", "mirrored") and cluster.is_multi_worker:
    raise errors.ConfigError(
        f"--strategy={requested} but TF_CONFIG describes {cluster.num_workers} workers: use "
        "--strategy=multi_worker_mirrored (or auto), or unset TF_CONFIG.")


def _validate_cluster(cluster: dict, name: str) -> dict:
  out = {}
  for task_type, addresses in cluster.items():
    if task_type == "ps":
      raise errors.ConfigError(
          f"${name} has parameter servers ('ps'): this trainer uses synchronous "
          "MultiWorkerMirroredStrategy; remove the ps pool.")
    if task_type not in _TRAINING_TASK_TYPES + (_LEGACY_CHIEF, EVALUATOR):
      raise errors.ConfigError(f"${name} has unknown task type {task_type!r}; "
                               "use chief, worker (or master), and evaluator.")
    if not isinstance(addresses, list):
      raise errors.ConfigError(f"${name}: cluster[{task_type!r}] must be a list of 'host:port'.")
    for index, address in enumerate(addresses):
      _check_address(address, f"{task_type}:{index}", name)
    out[task_type] = tuple(addresses)
  if len(out.get("chief", ())) > 1 or len(out.get(_LEGACY_CHIEF, ())) > 1:
    raise errors.ConfigError(f"${name}: a cluster has at most one chief/master.")
  if out.get("chief") and out.get(_LEGACY_CHIEF):
    raise errors.ConfigError(f"${name}: use either 'chief' or the legacy 'master', not both.")
  if _LEGACY_CHIEF in out:
    out["chief"] = out.pop(_LEGACY_CHIEF)
  if len(out.get(EVALUATOR, ())) > 1:
    # TensorFlow allows one (multi_worker_util._validate_cluster_spec); so does Vertex AI's
    # guide ("TensorFlow generally expects that you use no more than one evaluator").
    raise errors.ConfigError(f"${name} lists {len(out[EVALUATOR])} evaluators: use one (Vertex "
                             "AI: worker pool 3 with replicaCount 1; TFJob: Evaluator replicas 1).")
  if not any(out.get(t) for t in _TRAINING_TASK_TYPES):
    raise errors.ConfigError(f"${name}: the cluster has no chief or worker tasks.")
  _check_distinct_addresses(out, name)
  return out


def _check_address(address, task: str, name: str) -> None:
  """'host:port' with a non-empty host and a port in 1..65535 (IPv6 hosts in brackets)."""
  fix = f"fix the address of {task} in ${name} (e.g. 'worker-0.example:2222')."
  if not isinstance(address, str) or ":" not in address:
    raise errors.ConfigError(f"${name}: {task} has address {address!r}, not 'host:port'; {fix}")
  host, port = address.rsplit(":", 1)
  if not host.strip():
    raise errors.ConfigError(f"${name}: {task} has address {address!r} with an empty host; {fix}")
  # isdigit() alone would accept '²' and int() would accept ' 1' or '+1'.
  if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
    raise errors.ConfigError(f"${name}: {task} has address {address!r} whose port {port!r} is not "
                             f"a number in 1..65535; {fix}")


# Names of this machine's loopback interface: two tasks on any of them share the port space.
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def _endpoint(address: str) -> tuple:
  host, port = address.rsplit(":", 1)
  host = host.strip().lower()
  return ("localhost" if host in _LOOPBACK_HOSTS else host, int(port))


def _check_distinct_addresses(cluster: dict, name: str) -> None:
  """Two tasks on one host:port would hang start-up: each one's own port answers for the other."""
  seen = {}
  for task_type, addresses in cluster.items():
    for index, address in enumerate(addresses):
      task = f"{task_type}:{index}"
      other = seen.setdefault(_endpoint(address), (task, address))
      if other[0] != task:
        raise errors.ConfigError(
            f"${name} gives {other[0]} ({other[1]}) and {task} ({address}) the same host:port; "
            "every task needs its own port: fix the cluster addresses.")


def _validate_task(task, cluster: dict, name: str) -> tuple:
  if not isinstance(task, dict) or "type" not in task:
    raise errors.ConfigError(f"${name} has a cluster but no 'task' with 'type' and 'index': "
                             "every process must say which task it is.")
  task_type = "chief" if task["type"] == _LEGACY_CHIEF else task["type"]
  if task_type == EVALUATOR:
    return EVALUATOR, _evaluator_index(task, cluster, name)
  if not isinstance(task_type, str) or task_type not in cluster:
    raise errors.ConfigError(f"${name}: task type {task_type!r} is not in the cluster "
                             f"({', '.join(cluster)}).")
  task_index = _check_index(task.get("index", 0), name)
  if not 0 <= task_index < len(cluster[task_type]):
    raise errors.ConfigError(
        f"${name}: task index {task_index!r} is out of range for {task_type!r}, which has "
        f"{len(cluster[task_type])} task(s).")
  return task_type, task_index


def _evaluator_index(task: dict, cluster: dict, name: str) -> int:
  """The evaluator's index: 0, and in range when the cluster lists evaluators.

  The cluster may leave the evaluator out: AI Platform's TF_CONFIG "never contains evaluator as
  a key, since evaluators are not considered part of the training cluster"
  (cloud.google.com/ai-platform/training/docs/distributed-training-details), and TensorFlow
  accepts that too (multi_worker_util._validate_cluster_spec). The Kubeflow training operator
  lists it (pkg/controller.v1/tensorflow/tensorflow.go, genClusterSpec).
  """
  index = _check_index(task.get("index", 0), name)
  count = len(cluster.get(EVALUATOR, ())) or 1
  if not 0 <= index < count:
    raise errors.ConfigError(f"${name}: evaluator index {index} is out of range: a job has one "
                             "evaluator, index 0.")
  return index


def _check_index(task_index, name: str) -> int:
  # bool is a subclass of int in Python: "index": true must not pass as task 1.
  if isinstance(task_index, bool) or not isinstance(task_index, int):
    raise errors.ConfigError(f"${name}: task index {task_index!r} must be a JSON integer "
                             f"(e.g. \"index\": 0), not {type(task_index).__name__}.")
  return task_index

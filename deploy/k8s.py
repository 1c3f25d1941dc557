"""Renders a Kubeflow TFJob (kubeflow.org/v1) manifest for multi-worker training, as JSON.

Usage:
  python -m deploy.k8s --workers=N --gpus_per_worker=G --image=IMAGE --model_dir=gs://B/run
      [--chief] [--name=NAME] [--network_policy] [-- TRAINER_ARGS] | kubectl apply -f -

JSON because kubectl reads it as well as YAML and it needs no YAML library.
"""

import dataclasses
import json
import math
import re
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags

from deploy import trainer_args

# The training operator finds the TensorFlow container and its gRPC port by these names.
CONTAINER_NAME = "tensorflow"
PORT_NAME = "tfjob-port"
PORT = 2222
# deploy/Dockerfile's numeric USER: runAsNonRoot can only verify a numeric user.
RUN_AS_USER = 10001
JOB_LABEL = "app.kubernetes.io/instance"
APP_LABEL = "app.kubernetes.io/name"
APP_NAME = "mnist-dist-trainer"
DEFAULT_NAME = "mnist-dist"
# Seconds Kubernetes waits past the trainer's own SIGTERM deadline before SIGKILL.
GRACE_MARGIN_S = 30
MAX_BACKOFF_LIMIT = 10
# TFJob pods are named <name>-worker-<i>; keep that within a 63-character DNS label.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


class ManifestError(ValueError):
  """Options that cannot make a valid TFJob; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything the manifest depends on; built from flags (or directly by tests)."""

  image: str
  model_dir: str
  workers: int = 2
  gpus_per_worker: int = 1
  chief: bool = False
  name: str = DEFAULT_NAME
  namespace: str = ""
  backoff_limit: int = 3
  termination_grace_s: int = 0  # 0: the trainer's --preemption_grace_s plus a margin
  service_account: str = ""
  cpu: str = "4"
  memory: str = "16Gi"
  trainer_args: tuple = ()

  def __post_init__(self):
    validate(self)


def preemption_grace_s(o: Options) -> float:
  given = trainer_args.flag_value(o.trainer_args, "preemption_grace_s")
  return float(given) if given else float(trainer_args.trainer_default("preemption_grace_s"))


def termination_grace_s(o: Options) -> int:
  return o.termination_grace_s or math.ceil(preemption_grace_s(o)) + GRACE_MARGIN_S


def validate(o: Options) -> None:
  """Rejects manifests that would be refused by the API server or fail inside the trainer."""
  if not _NAME_RE.match(o.name):
    raise ManifestError(f"--name={o.name!r}: use lowercase letters, digits and '-', starting "
                        "with a letter, at most 40 characters.")
  if not o.image:
    raise ManifestError("--image is required (built from deploy/Dockerfile).")
  if not o.model_dir.startswith("gs://"):
    raise ManifestError(f"--model_dir={o.model_dir!r} must be a gs:// URI: pods share no disk.")
  if o.workers < 2:
    raise ManifestError(f"--workers={o.workers}: multi-worker training needs at least 2.")
  if o.gpus_per_worker < 0:
    raise ManifestError(f"--gpus_per_worker must be >= 0, got {o.gpus_per_worker}.")
  if not 0 <= o.backoff_limit <= MAX_BACKOFF_LIMIT:
    raise ManifestError(f"--backoff_limit={o.backoff_limit} must be in [0, {MAX_BACKOFF_LIMIT}]: "
                        "retries are for preemptions, not crash loops.")
  try:
    trainer_args.reject(o.trainer_args, ("model_dir",), "use this tool's --model_dir.")
    trainer_args.reject(o.trainer_args, ("strategy",), "TFJob runs multi_worker_mirrored.")
    grace = preemption_grace_s(o)
  except trainer_args.ArgsError as e:
    raise ManifestError(str(e)) from None
  except ValueError:
    raise ManifestError("--preemption_grace_s in the trainer arguments is not a number.") from None
  if termination_grace_s(o) <= grace:
    raise ManifestError(f"--termination_grace_s={o.termination_grace_s} must exceed the "
                        f"trainer's --preemption_grace_s={grace:g}, or Kubernetes kills it "
                        "before its checkpoint.")


def _labels(o: Options) -> dict:
  return {APP_LABEL: APP_NAME, JOB_LABEL: o.name}


def _container(o: Options) -> dict:
  resources = {"requests": {"cpu": o.cpu, "memory": o.memory}, "limits": {"memory": o.memory}}
  if o.gpus_per_worker:
    resources["limits"]["nvidia.com/gpu"] = o.gpus_per_worker
  # The image's ENTRYPOINT is `python -m trainer.task`; the operator sets TF_CONFIG.
  args = [f"--model_dir={o.model_dir}", "--strategy=multi_worker_mirrored", *o.trainer_args]
  return {"name": CONTAINER_NAME, "image": o.image, "args": args,
          "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
          "resources": resources,
          "securityContext": {"allowPrivilegeEscalation": False,
                              "capabilities": {"drop": ["ALL"]}}}


def _pod_template(o: Options) -> dict:
  spec = {"terminationGracePeriodSeconds": termination_grace_s(o),
          "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER,
                              "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
                              "seccompProfile": {"type": "RuntimeDefault"}},
          "containers": [_container(o)]}
  if o.service_account:
    spec["serviceAccountName"] = o.service_account
  return {"metadata": {"labels": _labels(o)}, "spec": spec}


def _replica_spec(o: Options, replicas: int) -> dict:
  # ExitCode: 1-127 (our permanent errors) fail the job, 128-255 (143: preempted or a lost
  # peer) recreate the pod, which resumes from the last checkpoint.
  return {"replicas": replicas, "restartPolicy": "ExitCode", "template": _pod_template(o)}


def tfjob(o: Options) -> dict:
  """The TFJob; --workers counts every training process, the Chief included."""
  replica_specs = {}
  if o.chief:
    replica_specs["Chief"] = _replica_spec(o, 1)
  replica_specs["Worker"] = _replica_spec(o, o.workers - 1 if o.chief else o.workers)
  metadata = {"name": o.name, "labels": _labels(o)}
  if o.namespace:
    metadata["namespace"] = o.namespace
  return {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": metadata,
          "spec": {"runPolicy": {"backoffLimit": o.backoff_limit, "cleanPodPolicy": "Running"},
                   "tfReplicaSpecs": replica_specs}}


def network_policy(name: str = DEFAULT_NAME, namespace: str = "") -> dict:
  """Admits ingress to the job's pods only from its own pods: collective gRPC has no auth."""
  same_job = {"matchLabels": {JOB_LABEL: name, APP_LABEL: APP_NAME}}
  metadata = {"name": f"{name}-collective-only", "labels": {APP_LABEL: APP_NAME, JOB_LABEL: name}}
  if namespace:
    metadata["namespace"] = namespace
  return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata,
          "spec": {"podSelector": same_job, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": same_job}],
                                "ports": [{"protocol": "TCP", "port": PORT}]}]}}


def manifest(o: Options, with_network_policy: bool = False) -> dict:
  if not with_network_policy:
    return tfjob(o)
  return {"apiVersion": "v1", "kind": "List",
          "items": [network_policy(o.name, o.namespace), tfjob(o)]}


# ---- Command line ----

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so tests can import this module next to others."""
  flags.DEFINE_integer("workers", 2, "Training processes (pods), the Chief included.")
  flags.DEFINE_integer("gpus_per_worker", 1, "nvidia.com/gpu limit per pod (0: CPU only).")
  flags.DEFINE_string("image", None, "Image built from deploy/Dockerfile.")
  flags.DEFINE_string("model_dir", None, "gs:// directory for checkpoints, logs and export.")
  flags.DEFINE_boolean("chief", False, "Make one of the --workers a Chief replica.")
  flags.DEFINE_string("name", DEFAULT_NAME, "TFJob name (also the pods' instance label).")
  flags.DEFINE_string("namespace", "", "Namespace (default: kubectl's current one).")
  flags.DEFINE_integer("backoff_limit", 3, "Pod restarts (exit 128-255) before the job fails.")
  flags.DEFINE_integer("termination_grace_s", 0,
                       "Pod grace period; 0: the trainer's --preemption_grace_s + 30.")
  flags.DEFINE_string("service_account", "", "Kubernetes service account (Workload Identity).")
  flags.DEFINE_string("cpu", "4", "CPU request per pod.")
  flags.DEFINE_string("memory", "16Gi", "Memory request and limit per pod.")
  flags.DEFINE_boolean("network_policy", False,
                       "Emit a List with the job's NetworkPolicy before the TFJob.")


def _options_from_flags(extra_args: Sequence[str]) -> Options:
  names = [f.name for f in dataclasses.fields(Options) if f.name != "trainer_args"]
  values = {name: FLAGS[name].value for name in names}
  values["image"] = values["image"] or ""
  values["model_dir"] = values["model_dir"] or ""
  return Options(**values, trainer_args=tuple(extra_args))


def main(argv: Sequence[str]) -> Optional[int]:
  try:
    o = _options_from_flags(argv[1:])
  except ManifestError as e:
    sys.stderr.write(f"deploy.k8s: error: {e}\n")
    return 2
  print(json.dumps(manifest(o, FLAGS.network_policy), indent=2))
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)

"""Renders a Kubeflow TFJob (kubeflow.org/v1) manifest for multi-worker training, as JSON.

Usage:
  python -m deploy.k8s --workers=N --gpus_per_worker=G --image=IMAGE --model_dir=gs://B/run
      [--chief] [--evaluator] [--name=NAME] [--network_policy] [--gang_scheduling]
      [--gke_accelerator=TYPE]
      [--service_account=KSA [--gcp_service_account=GSA]] [-- TRAINER_ARGS] | kubectl apply -f -

JSON because kubectl reads it as well as YAML and it needs no YAML library.

What bounds a failing job (kubeflow/training-operator, deploy/README.md "Exit codes and
restarts"): with restartPolicy ExitCode the operator deletes a pod that exited 128 or more
(143, 137, ...; up to v1.6 only 130, 137, 138 and 143) and creates a new one
(pkg/controller.v1/common/pod.go ReconcilePods, with pkg/util/train/train_util.go
IsRetryableExitCode); the pod's own restartPolicy is Never
(pkg/core/pod.go SetRestartPolicy), and runPolicy.backoffLimit only sums container restart
counts of running pods (pkg/core/job.go PastBackoffLimit), so it never counts those
recreations (kubeflow/trainer#2045). What does stop the loop: the trainer's
--max_job_restarts (exit 7, permanent) and runPolicy.activeDeadlineSeconds
(pkg/core/job.go PastActiveDeadline).
"""

import dataclasses
import json
import math
import re
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags

from deploy import option_flags
from deploy import trainer_args
from deploy.option_flags import option

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
# Exit codes restartPolicy ExitCode recreates the pod for in every operator version: v1.7 to v1.9
# retry every code >= 128 (kubeflow/training-operator pkg/util/train/train_util.go,
# IsRetryableExitCode), v1.6 and before took kubeflow/common's list, these four. Codes 1-127 fail
# the job in all of them.
OPERATOR_RETRYABLE_EXIT_CODES = (130, 137, 138, 143)
# runPolicy.ttlSecondsAfterFinished is an int32 (pkg/apis/kubeflow.org/v1/common_types.go).
MAX_INT32 = 2**31 - 1
# The trainer's --max_job_restarts: starts of the chief without a finished run, then exit 7.
DEFAULT_MAX_JOB_RESTARTS = 5
# A day of wall clock caps a job that keeps being recreated; a week keeps a finished job's
# pods (cleanPodPolicy Running keeps the finished ones) and logs around for inspection.
DEFAULT_ACTIVE_DEADLINE_S = 24 * 3600
DEFAULT_TTL_AFTER_FINISHED_S = 7 * 24 * 3600
# GKE schedules GPU pods with this node label (cloud.google.com/kubernetes-engine/docs/how-to/gpus).
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# Workload Identity: the KSA annotation naming the Google service account it acts as
# (cloud.google.com/kubernetes-engine/docs/how-to/workload-identity).
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"
# TFJob pods are named <name>-worker-<i>; keep that within a 63-character DNS label.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
# Kubernetes object names for the ServiceAccount (a DNS subdomain kept to a label here).
_KSA_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GSA_RE = re.compile(
    r"^[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9.:]*\.iam\.gserviceaccount\.com$")
_GKE_ACCELERATOR_RE = re.compile(r"^nvidia-[a-z0-9][-a-z0-9]*$")


class ManifestError(ValueError):
  """Options that cannot make a valid TFJob; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything the manifest depends on; built from flags (or directly by tests).

  Each field is also a command-line flag with the help text given here (deploy/option_flags.py).
  """

  image: str = option(help="Image built from deploy/Dockerfile.")
  model_dir: str = option(help="gs:// directory for checkpoints, logs and export.")
  workers: int = option(2, "Training processes (pods), the Chief included.")
  gpus_per_worker: int = option(1, "nvidia.com/gpu limit per pod (0: CPU only).")
  chief: bool = option(False, "Make one of the --workers a Chief replica.")
  evaluator: bool = option(
      False, "Add an Evaluator replica, a side-car that evaluates each new checkpoint (sets "
      "cleanPodPolicy None so it finishes the last one).")
  name: str = option(DEFAULT_NAME, "TFJob name (also the pods' instance label).")
  namespace: str = option("", "Namespace (default: kubectl's current one).")
  backoff_limit: int = option(
      3, "runPolicy.backoffLimit; counts nothing under restartPolicy ExitCode (see "
      "--max_job_restarts and --active_deadline_s).")
  termination_grace_s: int = option(
      0, "Pod grace period; 0: the trainer's --preemption_grace_s + 30.")
  max_job_restarts: int = option(
      DEFAULT_MAX_JOB_RESTARTS, "Passed to the trainer: after this many restarts without a "
      "finished run the chief exits 7 and the job fails (0: no cap).")
  active_deadline_s: int = option(
      DEFAULT_ACTIVE_DEADLINE_S, "runPolicy.activeDeadlineSeconds: the job fails this long "
      "after it started, restarts included.")
  ttl_after_finished_s: int = option(
      DEFAULT_TTL_AFTER_FINISHED_S, "runPolicy.ttlSecondsAfterFinished: delete the finished job "
      "after this.")
  gang_scheduling: bool = option(
      False, "runPolicy.schedulingPolicy.minAvailable = --workers (needs the operator's "
      "--gang-scheduler-name).")
  gke_accelerator: str = option(
      "", "GKE GPU type for the pods' nodeSelector, e.g. nvidia-tesla-t4.")
  service_account: str = option("", "Kubernetes service account (Workload Identity).")
  gcp_service_account: str = option(
      "", "Google service account email: also emit the --service_account ServiceAccount "
      "annotated for Workload Identity.")
  cpu: str = option("4", "CPU request per pod.")
  memory: str = option("16Gi", "Memory request and limit per pod.")
  trainer_args: tuple = ()  # after `--` on the command line, not a flag

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
  _validate_bounds(o)
  _validate_placement(o)
  try:
    trainer_args.reject(o.trainer_args, ("model_dir",), "use this tool's --model_dir.")
    trainer_args.reject(o.trainer_args, ("strategy",), "TFJob runs multi_worker_mirrored.")
    trainer_args.reject(o.trainer_args, ("max_job_restarts",),
                        "use this tool's --max_job_restarts.")
    grace = preemption_grace_s(o)
  except trainer_args.ArgsError as e:
    raise ManifestError(str(e)) from None
  except ValueError:
    raise ManifestError("--preemption_grace_s in the trainer arguments is not a number.") from None
  if termination_grace_s(o) <= grace:
    raise ManifestError(f"--termination_grace_s={o.termination_grace_s} must exceed the "
                        f"trainer's --preemption_grace_s={grace:g}, or Kubernetes kills it "
                        "before its checkpoint.")
  if o.active_deadline_s <= termination_grace_s(o):
    raise ManifestError(f"--active_deadline_s={o.active_deadline_s} must exceed the pods' grace "
                        f"period ({termination_grace_s(o)} s): the job could never run.")


def _validate_bounds(o: Options) -> None:
  """The caps that actually end a restart loop under restartPolicy ExitCode."""
  if o.max_job_restarts < 0:
    raise ManifestError(f"--max_job_restarts={o.max_job_restarts} must be >= 0 (0: no cap; "
                        "then only --active_deadline_s ends a crash loop).")
  if o.active_deadline_s <= 0:
    raise ManifestError(f"--active_deadline_s={o.active_deadline_s} must be > 0: without it "
                        "a pod that keeps exiting 137 or 143 is recreated forever.")
  if not 0 <= o.ttl_after_finished_s <= MAX_INT32:
    raise ManifestError(f"--ttl_after_finished_s={o.ttl_after_finished_s} must be in "
                        f"[0, {MAX_INT32}] (0 deletes the finished job at once).")


def _validate_placement(o: Options) -> None:
  """GKE node selection and Workload Identity; both are checked here, not at apply time."""
  if o.gke_accelerator:
    if not _GKE_ACCELERATOR_RE.match(o.gke_accelerator):
      raise ManifestError(f"--gke_accelerator={o.gke_accelerator!r}: use GKE's accelerator "
                          "name, e.g. nvidia-tesla-t4, nvidia-l4, nvidia-tesla-a100.")
    if not o.gpus_per_worker:
      raise ManifestError("--gke_accelerator needs --gpus_per_worker > 0: CPU-only pods "
                          "must not wait for GPU nodes.")
  if o.service_account and not _KSA_RE.match(o.service_account):
    raise ManifestError(f"--service_account={o.service_account!r}: a Kubernetes service "
                        "account name (lowercase letters, digits, '-').")
  if o.gcp_service_account:
    if not o.service_account:
      raise ManifestError("--gcp_service_account needs --service_account: the Kubernetes "
                          "service account that Workload Identity maps to it.")
    if not _GSA_RE.match(o.gcp_service_account):
      raise ManifestError(f"--gcp_service_account={o.gcp_service_account!r}: use the Google "
                          "service account's email, NAME@PROJECT.iam.gserviceaccount.com.")


def _labels(o: Options) -> dict:
  return {APP_LABEL: APP_NAME, JOB_LABEL: o.name}


def _container(o: Options) -> dict:
  resources = {"requests": {"cpu": o.cpu, "memory": o.memory}, "limits": {"memory": o.memory}}
  if o.gpus_per_worker:
    resources["limits"]["nvidia.com/gpu"] = o.gpus_per_worker
  # The image's ENTRYPOINT is `python -m trainer.task`; the operator sets TF_CONFIG.
  args = [f"--model_dir={o.model_dir}", "--strategy=multi_worker_mirrored",
          f"--max_job_restarts={o.max_job_restarts}", *o.trainer_args]
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
  if o.gke_accelerator:
    spec["nodeSelector"] = {GKE_ACCELERATOR_LABEL: o.gke_accelerator}
  return {"metadata": {"labels": _labels(o)}, "spec": spec}


def _replica_spec(o: Options, replicas: int) -> dict:
  # ExitCode: a signal's code (143: ours, preempted or a lost peer; 137: SIGKILL) recreates the
  # pod, which resumes from the last checkpoint; codes 1-127, our 1-7 included, fail the job
  # (pkg/util/train/train_util.go IsRetryableExitCode; OPERATOR_RETRYABLE_EXIT_CODES).
  return {"replicas": replicas, "restartPolicy": "ExitCode", "template": _pod_template(o)}


def _run_policy(o: Options) -> dict:
  # backoffLimit stays for the other restart policies; under ExitCode it counts nothing (see
  # the module docstring). activeDeadlineSeconds is measured from the job's start and fails
  # it, whatever its pods are doing.
  policy = {"backoffLimit": o.backoff_limit, "cleanPodPolicy": _clean_pod_policy(o),
            "activeDeadlineSeconds": o.active_deadline_s,
            "ttlSecondsAfterFinished": o.ttl_after_finished_s}
  if o.gang_scheduling:
    # MultiWorkerMirroredStrategy needs every worker: start none until all fit. Only takes
    # effect when the operator runs with --gang-scheduler-name (Volcano or scheduler-plugins);
    # pkg/controller.v1/common/job.go turns minAvailable into the PodGroup's minMember.
    policy["schedulingPolicy"] = {"minAvailable": o.workers}
  return policy


def _clean_pod_policy(o: Options) -> str:
  """Running: pods still running when the job ends are deleted. The job succeeds when the
  Chief (or worker 0) does (pkg/controller.v1/tensorflow/tfjob_controller.go, UpdateJobStatus),
  which would delete an evaluator still evaluating the final checkpoint; with None the
  operator leaves it be (pkg/controller.v1/common/job.go, DeletePodsAndServices) and it exits
  by itself: after the final checkpoint, or 143 after --evaluator_timeout_s. A job failed by
  activeDeadlineSeconds has every pod deleted whatever this says (same function)."""
  return "None" if o.evaluator else "Running"


def tfjob(o: Options) -> dict:
  """The TFJob; --workers counts every training process, the Chief included."""
  replica_specs = {}
  if o.chief:
    replica_specs["Chief"] = _replica_spec(o, 1)
  replica_specs["Worker"] = _replica_spec(o, o.workers - 1 if o.chief else o.workers)
  if o.evaluator:
    # The operator's "Evaluator" replica type (TFJobReplicaTypeEval), TF_CONFIG task type
    # "evaluator"; same image, arguments and pod as a worker. It is not part of gang
    # scheduling's minAvailable: training needs only the workers.
    replica_specs["Evaluator"] = _replica_spec(o, 1)
  metadata = {"name": o.name, "labels": _labels(o)}
  if o.namespace:
    metadata["namespace"] = o.namespace
  return {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": metadata,
          "spec": {"runPolicy": _run_policy(o), "tfReplicaSpecs": replica_specs}}


def service_account(o: Options) -> dict:
  """The KSA the pods run as, annotated for Workload Identity with the Google SA to act as."""
  metadata = {"name": o.service_account, "labels": {APP_LABEL: APP_NAME, JOB_LABEL: o.name},
              "annotations": {WORKLOAD_IDENTITY_ANNOTATION: o.gcp_service_account}}
  if o.namespace:
    metadata["namespace"] = o.namespace
  return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}


def workload_identity_binding_command(o: Options) -> str:
  """The IAM binding that lets KSA namespace/name act as the GSA (Workload Identity guide)."""
  project = o.gcp_service_account.split("@", 1)[1].split(".iam.", 1)[0]
  namespace = o.namespace or "NAMESPACE"
  return (f"gcloud iam service-accounts add-iam-policy-binding {o.gcp_service_account} "
          f"--role=roles/iam.workloadIdentityUser "
          f"--member=serviceAccount:{project}.svc.id.goog[{namespace}/{o.service_account}]")


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
  """The TFJob alone, or a List that creates its ServiceAccount and NetworkPolicy first."""
  items = []
  if o.gcp_service_account:
    items.append(service_account(o))
  if with_network_policy:
    items.append(network_policy(o.name, o.namespace))
  if not items:
    return tfjob(o)
  return {"apiVersion": "v1", "kind": "List", "items": [*items, tfjob(o)]}


# ---- Command line ----

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so tests can import this module next to others."""
  option_flags.define_flags(Options)
  flags.DEFINE_boolean("network_policy", False,
                       "Emit a List with the job's NetworkPolicy before the TFJob.")


def _options_from_flags(extra_args: Sequence[str]) -> Options:
  return Options(**option_flags.values_from_flags(Options, FLAGS, error=ManifestError),
                 trainer_args=tuple(extra_args))


def main(argv: Sequence[str]) -> Optional[int]:
  try:
    o = _options_from_flags(argv[1:])
  except ManifestError as e:
    sys.stderr.write(f"deploy.k8s: error: {e}\n")
    return 2
  print(json.dumps(manifest(o, FLAGS.network_policy), indent=2))
  if o.gcp_service_account:
    sys.stderr.write(f"deploy.k8s: let the KSA act as the Google service account:\n"
                     f"  {workload_identity_binding_command(o)}\n")
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)

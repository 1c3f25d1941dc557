"""The options every Kubernetes manifest is rendered from, their checks, and the pod they share.

The three APIs (deploy/k8s/__init__.py) run the same container: the image's `python -m
trainer.task` with the same arguments, security context, resources and grace period. Only how
the pods learn the cluster differs: the training operator writes TF_CONFIG for a TFJob; a JobSet
or TrainJob pod gets the names trainer/runtime/indexed_pod.py builds it from.
"""

import dataclasses
import math
import re

from deploy import trainer_args
from deploy.defaults import DEFAULT_MAX_JOB_RESTARTS
from trainer.options import option
from trainer.runtime import indexed_pod

API_TFJOB = "tfjob"
API_JOBSET = "jobset"
API_TRAINJOB = "trainjob"
APIS = (API_TFJOB, API_JOBSET, API_TRAINJOB)
# The training operator finds the TensorFlow container and its gRPC port by these names
# (Kubeflow's TFJob guide: "The pod must include a container named tensorflow").
CONTAINER_NAME = "tensorflow"
PORT_NAME = "tfjob-port"
PORT = 2222
# deploy/Dockerfile's numeric USER: runAsNonRoot can only verify a numeric user.
RUN_AS_USER = 10001
JOB_LABEL = "app.kubernetes.io/instance"
APP_LABEL = "app.kubernetes.io/name"
APP_NAME = "mnist-dist-trainer"
DEFAULT_NAME = "mnist-dist"
# Kubeflow's TFJob guide: "TFJob doesn't work in a user namespace by default because of Istio
# automatic sidecar injection. In order to get TFJob running, it needs the annotation
# sidecar.istio.io/inject: "false"" (kubeflow/website content/en/docs/components/trainer/
# legacy-v1/user-guides/tensorflow.md; the same text in kubeflow/trainer v2.3.0
# docs/legacy-v1/user-guides/tensorflow.md). The injected proxy keeps running after the trainer
# exits, so no Job pod would ever complete (kubeflow/training-operator#1778): every API's pods
# get the annotation.
ISTIO_INJECT_ANNOTATION = "sidecar.istio.io/inject"
# Kueue admits a JobSet, TrainJob or TFJob whose metadata has this label as one workload
# (kueue.sigs.k8s.io/docs/tasks/run/jobsets, .../run/trainjobs, .../run/kubeflow/tfjobs).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Seconds Kubernetes waits past the trainer's own SIGTERM deadline before SIGKILL.
GRACE_MARGIN_S = 30
MAX_BACKOFF_LIMIT = 10
DEFAULT_BACKOFF_LIMIT = 3
# runPolicy.ttlSecondsAfterFinished and JobSet's ttlSecondsAfterFinished are int32.
MAX_INT32 = 2**31 - 1
# A day of wall clock caps a job that keeps being recreated; a week keeps a finished job's
# pods and logs around for inspection.
DEFAULT_ACTIVE_DEADLINE_S = 24 * 3600
DEFAULT_TTL_AFTER_FINISHED_S = 7 * 24 * 3600
DEFAULT_RUNTIME_NAME = "mnist-dist-tensorflow"
# GKE schedules GPU pods with this node label (cloud.google.com/kubernetes-engine/docs/how-to/gpus).
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# Workload Identity: the KSA annotation naming the Google service account it acts as
# (cloud.google.com/kubernetes-engine/docs/how-to/workload-identity).
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"
# Pods are named <name>-worker-<i> (TFJob) or <name>-evaluator-0-0-<5 chars> (JobSet, whose
# webhook checks that length); keep that within a 63-character DNS label.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
# Kubernetes object names for the ServiceAccount and the runtime (a DNS subdomain kept to a label).
_KSA_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GSA_RE = re.compile(
    r"^[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9.:]*\.iam\.gserviceaccount\.com$")
_GKE_ACCELERATOR_RE = re.compile(r"^nvidia-[a-z0-9][-a-z0-9]*$")
# A label value: at most 63 characters, alphanumeric at both ends.
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


class ManifestError(ValueError):
  """Options that cannot make a valid manifest; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything the manifests depend on; built from flags (or directly by tests).

  Each field is also a command-line flag with the help text given here (trainer/options.py).
  """

  image: str = option(help="Image built from deploy/Dockerfile.")
  model_dir: str = option(help="gs:// directory for checkpoints, logs and export.")
  api: str = option(
      API_TFJOB, "What to render: tfjob (Kubeflow training-operator v1.9's TFJob), jobset "
      "(a JobSet, jobset.x-k8s.io), trainjob (a Kubeflow Trainer v2 ClusterTrainingRuntime and "
      "TrainJob). deploy/README.md says which one a cluster runs.")
  workers: int = option(2, "Training processes (pods), the Chief included.")
  gpus_per_worker: int = option(1, "nvidia.com/gpu limit per pod (0: CPU only).")
  chief: bool = option(False, "--api=tfjob: make one of the --workers a Chief replica.")
  evaluator: bool = option(
      False, "Add a side-car evaluator pod that evaluates each new checkpoint (TFJob: an "
      "Evaluator replica, with cleanPodPolicy None so it finishes the last one; JobSet: an "
      "evaluator replicated job).")
  name: str = option(DEFAULT_NAME, "Job name (also the pods' instance label).")
  namespace: str = option("", "Namespace (default: kubectl's current one).")
  backoff_limit: int = option(
      DEFAULT_BACKOFF_LIMIT, "--api=tfjob: runPolicy.backoffLimit; counts nothing under "
      "restartPolicy ExitCode (see --max_job_restarts and --active_deadline_s).")
  termination_grace_s: int = option(
      0, "Pod grace period; 0: the trainer's --preemption_grace_s + 30.")
  max_job_restarts: int = option(
      DEFAULT_MAX_JOB_RESTARTS, "Passed to the trainer: after this many restarts without a "
      "finished run the chief exits 7 and the job fails (0: no cap). JobSet and TrainJob: also "
      "failurePolicy.maxRestarts, the restarts JobSet allows (there >= 1).")
  active_deadline_s: int = option(
      DEFAULT_ACTIVE_DEADLINE_S, "TFJob: runPolicy.activeDeadlineSeconds, the job fails this "
      "long after it started, restarts included. JobSet and TrainJob: each attempt's Jobs' "
      "activeDeadlineSeconds (a restart starts a new one).")
  ttl_after_finished_s: int = option(
      DEFAULT_TTL_AFTER_FINISHED_S, "ttlSecondsAfterFinished: delete the finished job after "
      "this.")
  gang_scheduling: bool = option(
      False, "--api=tfjob: runPolicy.schedulingPolicy.minAvailable = --workers (needs the "
      "operator's --gang-scheduler-name). JobSet and TrainJob: use --kueue_queue.")
  kueue_queue: str = option(
      "", "Kueue LocalQueue to submit to (label kueue.x-k8s.io/queue-name): Kueue admits the "
      "whole job at once, when its quota fits.")
  runtime_name: str = option(
      DEFAULT_RUNTIME_NAME, "--api=trainjob: the ClusterTrainingRuntime's name, which the "
      "TrainJob's runtimeRef names.")
  cluster_runtime: bool = option(
      True, "--api=trainjob: emit the ClusterTrainingRuntime before the TrainJob "
      "(--nocluster_runtime: the cluster has it already).")
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


def validate(o: Options) -> None:
  """Rejects manifests that would be refused by the API server or fail inside the trainer."""
  if o.api not in APIS:
    raise ManifestError(f"--api={o.api!r}: use one of {', '.join(APIS)} (deploy/README.md, "
                        "'Which API on which cluster').")
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
  _validate_api_flags(o)
  _validate_bounds(o)
  _validate_placement(o)
  try:
    trainer_args.reject(o.trainer_args, ("model_dir",), "use this tool's --model_dir.")
    trainer_args.reject(o.trainer_args, ("strategy",), "the pods run multi_worker_mirrored.")
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


def preemption_grace_s(o: Options) -> float:
  given = trainer_args.flag_value(o.trainer_args, "preemption_grace_s")
  return float(given) if given else float(trainer_args.trainer_default("preemption_grace_s"))


def termination_grace_s(o: Options) -> int:
  return o.termination_grace_s or math.ceil(preemption_grace_s(o)) + GRACE_MARGIN_S


def _validate_api_flags(o: Options) -> None:
  """Flags that only one API has are errors with the others, not silently ignored."""
  if o.api != API_TFJOB:
    if o.chief:
      raise ManifestError(f"--chief is a TFJob replica type; with --api={o.api} the workers are "
                          "one Indexed Job and worker 0 is the chief: drop --chief.")
    if o.gang_scheduling:
      raise ManifestError(f"--gang_scheduling sets a TFJob's runPolicy; with --api={o.api} use "
                          "--kueue_queue=QUEUE, which admits every pod of the job at once.")
    if o.backoff_limit != DEFAULT_BACKOFF_LIMIT:
      raise ManifestError(f"--backoff_limit is a TFJob's runPolicy.backoffLimit; with "
                          f"--api={o.api} restarts are bounded by --max_job_restarts.")
    if o.max_job_restarts < 1:
      raise ManifestError(f"--max_job_restarts={o.max_job_restarts}: with --api={o.api} it is also "
                          "JobSet's failurePolicy.maxRestarts, which has no 'unlimited': give "
                          "the number of restarts to allow (>= 1).")
  if o.api != API_TRAINJOB:
    if o.runtime_name != DEFAULT_RUNTIME_NAME or not o.cluster_runtime:
      raise ManifestError("--runtime_name and --nocluster_runtime belong to --api=trainjob.")
  elif o.evaluator:
    raise ManifestError(
        "--evaluator with --api=trainjob: Trainer v2 gives the TrainJob's image and arguments "
        "to the trainer nodes only, so a shared ClusterTrainingRuntime cannot carry this job's "
        "evaluator. Use --api=jobset --evaluator, or run the evaluator as a job of its own "
        "(deploy/README.md, 'A 2-worker job with a side-car evaluator').")
  if not _KSA_RE.match(o.runtime_name):
    raise ManifestError(f"--runtime_name={o.runtime_name!r}: lowercase letters, digits and '-'.")
  if o.kueue_queue and not _LABEL_VALUE_RE.match(o.kueue_queue):
    raise ManifestError(f"--kueue_queue={o.kueue_queue!r}: a LocalQueue name (a label value: at "
                        "most 63 letters, digits, '-', '_' or '.').")


def _validate_bounds(o: Options) -> None:
  """The caps that actually end a restart loop."""
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


def labels(o: Options) -> dict:
  """The labels of the job and its pods: the app, and the job's instance."""
  return {APP_LABEL: APP_NAME, JOB_LABEL: o.name}


def metadata(o: Options, name: str) -> dict:
  """A namespaced object's metadata: name, namespace (when given), labels, Kueue's queue."""
  meta = {"name": name, "labels": labels(o)}
  if o.kueue_queue:
    meta["labels"][KUEUE_QUEUE_LABEL] = o.kueue_queue
  if o.namespace:
    meta["namespace"] = o.namespace
  return meta


def trainer_arguments(o: Options) -> list:
  """The trainer's flags; the image's ENTRYPOINT is `python -m trainer.task`."""
  return [f"--model_dir={o.model_dir}", "--strategy=multi_worker_mirrored",
          f"--max_job_restarts={o.max_job_restarts}", *o.trainer_args]


def resources(o: Options) -> dict:
  """Requests and limits; quantities as strings, their canonical form (the API server writes
  them so, and the kubernetes client's ResourceRequirements model takes only strings)."""
  out = {"requests": {"cpu": o.cpu, "memory": o.memory}, "limits": {"memory": o.memory}}
  if o.gpus_per_worker:
    out["limits"]["nvidia.com/gpu"] = str(o.gpus_per_worker)
  return out


def container(o: Options, name: str = CONTAINER_NAME, port_name: str = PORT_NAME,
              env: tuple = (), with_args: bool = True) -> dict:
  """The trainer's container; `env` is added as is (JobSet pods get their cluster names)."""
  c = {"name": name, "image": o.image}
  if with_args:
    c["args"] = trainer_arguments(o)
  if env:
    c["env"] = list(env)
  c["ports"] = [{"name": port_name, "containerPort": PORT, "protocol": "TCP"}]
  c["resources"] = resources(o)
  c["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
  return c


def pod_template(o: Options, pod_labels: dict, the_container: dict,
                 restart_policy: str = "") -> dict:
  """The pod every API runs: non-root, grace period past the trainer's checkpoint, no sidecar."""
  spec = {}
  if restart_policy:
    spec["restartPolicy"] = restart_policy
  spec.update({"terminationGracePeriodSeconds": termination_grace_s(o),
               "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER,
                                   "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
                                   "seccompProfile": {"type": "RuntimeDefault"}},
               "containers": [the_container]})
  if o.service_account:
    spec["serviceAccountName"] = o.service_account
  if o.gke_accelerator:
    spec["nodeSelector"] = {GKE_ACCELERATOR_LABEL: o.gke_accelerator}
  return {"metadata": {"labels": dict(pod_labels),
                       "annotations": {ISTIO_INJECT_ANNOTATION: "false"}},
          "spec": spec}


def downward_env() -> list:
  """The JobSet names a pod reads from its own labels (trainer/runtime/indexed_pod.py builds TF_CONFIG
  from them); JobSet puts the labels on every pod (jobset_controller.go labelAndAnnotateObject)."""
  return [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}}
          for name, label in indexed_pod.DOWNWARD_LABELS.items()]


def service_account(o: Options) -> dict:
  """The KSA the pods run as, annotated for Workload Identity with the Google SA to act as."""
  meta = {"name": o.service_account, "labels": {APP_LABEL: APP_NAME, JOB_LABEL: o.name},
          "annotations": {WORKLOAD_IDENTITY_ANNOTATION: o.gcp_service_account}}
  if o.namespace:
    meta["namespace"] = o.namespace
  return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def workload_identity_binding_command(o: Options) -> str:
  """The IAM binding that lets KSA namespace/name act as the GSA (Workload Identity guide)."""
  project = o.gcp_service_account.split("@", 1)[1].split(".iam.", 1)[0]
  namespace = o.namespace or "NAMESPACE"
  return (f"gcloud iam service-accounts add-iam-policy-binding {o.gcp_service_account} "
          f"--role=roles/iam.workloadIdentityUser "
          f"--member=serviceAccount:{project}.svc.id.goog[{namespace}/{o.service_account}]")


def network_policy(name: str = DEFAULT_NAME, namespace: str = "", api: str = API_TFJOB) -> dict:
  """Admits ingress to the job's pods only from its own pods: collective gRPC has no auth.

  A TFJob's pods carry the job's instance label; a JobSet's (and a TrainJob's, whose JobSet
  has the TrainJob's name) carry JobSet's jobset-name label, which a shared
  ClusterTrainingRuntime cannot set per job.
  """
  if api == API_TFJOB:
    same_job = {"matchLabels": {JOB_LABEL: name, APP_LABEL: APP_NAME}}
  else:
    same_job = {"matchLabels": {indexed_pod.DOWNWARD_LABELS[indexed_pod.JOBSET_NAME]: name,
                                APP_LABEL: APP_NAME}}
  meta = {"name": f"{name}-collective-only", "labels": {APP_LABEL: APP_NAME, JOB_LABEL: name}}
  if namespace:
    meta["namespace"] = namespace
  return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
          "spec": {"podSelector": same_job, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": same_job}],
                                "ports": [{"protocol": "TCP", "port": PORT}]}]}}

"""Renders the Kubernetes manifests of a multi-worker training job, as JSON.

Usage:
  python -m deploy.k8s [--api=tfjob|jobset|trainjob] --workers=N --gpus_per_worker=G \\
      --image=IMAGE --model_dir=gs://B/run [--evaluator] [--name=NAME] [--network_policy] \\
      [--kueue_queue=QUEUE] [--gke_accelerator=TYPE] \\
      [--service_account=KSA [--gcp_service_account=GSA]] [-- TRAINER_ARGS] | kubectl apply -f -

Which API a cluster serves (deploy/README.md, "Which API on which cluster"):
- tfjob: a TFJob (kubeflow.org/v1) for the Kubeflow training-operator v1.9 (deploy/k8s/tfjobs.py);
- jobset: a JobSet (jobset.x-k8s.io/v1alpha2) on any cluster with JobSet (deploy/k8s/jobsets.py);
- trainjob: a Kubeflow Trainer v2 ClusterTrainingRuntime and TrainJob (trainer.kubeflow.org/
  v1alpha1) with the plainML policy (deploy/k8s/trainjobs.py).
All three run the same pod (deploy/k8s/common.py). JSON because kubectl reads it as well as
YAML and it needs no YAML library.
"""

# The names callers and tests use, in one place.
from deploy.k8s.common import (API_JOBSET, API_TFJOB, API_TRAINJOB, APIS, APP_LABEL, APP_NAME,
                               CONTAINER_NAME, DEFAULT_ACTIVE_DEADLINE_S, DEFAULT_MAX_JOB_RESTARTS,
                               DEFAULT_NAME, DEFAULT_RUNTIME_NAME, DEFAULT_TTL_AFTER_FINISHED_S,
                               ISTIO_INJECT_ANNOTATION, JOB_LABEL, KUEUE_QUEUE_LABEL,
                               MAX_BACKOFF_LIMIT, PORT, RUN_AS_USER, ManifestError, Options,
                               network_policy, service_account,
                               workload_identity_binding_command)
from deploy.k8s.jobsets import jobset
from deploy.k8s.tfjobs import OPERATOR_RETRYABLE_EXIT_CODES, tfjob
from deploy.k8s.trainjobs import cluster_training_runtime, train_job

__all__ = ["API_JOBSET", "API_TFJOB", "API_TRAINJOB", "APIS", "APP_LABEL", "APP_NAME",
           "CONTAINER_NAME", "DEFAULT_ACTIVE_DEADLINE_S", "DEFAULT_MAX_JOB_RESTARTS",
           "DEFAULT_NAME", "DEFAULT_RUNTIME_NAME", "DEFAULT_TTL_AFTER_FINISHED_S",
           "ISTIO_INJECT_ANNOTATION", "JOB_LABEL", "KUEUE_QUEUE_LABEL", "MAX_BACKOFF_LIMIT",
           "OPERATOR_RETRYABLE_EXIT_CODES", "PORT", "RUN_AS_USER", "ManifestError", "Options",
           "cluster_training_runtime", "jobset", "manifest", "network_policy",
           "service_account", "tfjob", "train_job", "workload_identity_binding_command"]


def manifest(o: Options, with_network_policy: bool = False) -> dict:
  """The job alone, or a List that creates what it needs first: the ClusterTrainingRuntime
  (--api=trainjob), the ServiceAccount and the NetworkPolicy."""
  items = []
  if o.api == API_TRAINJOB and o.cluster_runtime:
    items.append(cluster_training_runtime(o))
  if o.gcp_service_account:
    items.append(service_account(o))
  if with_network_policy:
    items.append(network_policy(o.name, o.namespace, o.api))
  job = {API_TFJOB: tfjob, API_JOBSET: jobset, API_TRAINJOB: train_job}[o.api](o)
  if not items:
    return job
  return {"apiVersion": "v1", "kind": "List", "items": [*items, job]}

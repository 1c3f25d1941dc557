"""A JobSet (jobset.x-k8s.io/v1alpha2, kubernetes-sigs/jobset): Kubernetes' own multi-pod job.

The workers are one replicated job of one Indexed Job with --workers pods; the evaluator, when
asked, a second replicated job of one pod. JobSet puts every pod behind a headless Service named
after the JobSet and gives it the host name `<jobset>-<replicated job>-<job index>-<pod
index>`, so each pod builds the same worker list from its own environment
(trainer/runtime/indexed_pod.py) and the operator never writes TF_CONFIG.

The exit-code contract (trainer/errors.py; the local launcher's RETRYABLE_EXIT_CODES) is written
in Kubernetes' own terms, at two levels:
- Each Job's podFailurePolicy (batch/v1, Kubernetes >= 1.31 GA) judges a failed pod: a pod
  disrupted by the cluster (preemption, eviction, node drain: the DisruptionTarget condition) or
  one that exited 143 (ours: preempted or a lost peer) or 137 (SIGKILL, e.g. OOM) is counted,
  and with backoffLimit 0 one counted failure fails the Job with reason BackoffLimitExceeded;
  any other exit (1-7, the trainer's permanent codes, or a crash) fails it at once with reason
  PodFailurePolicy. podFailurePolicy requires restartPolicy Never (Kubernetes
  pkg/apis/batch/validation/validation.go: "only Never is supported when podFailurePolicy is
  specified").
- The JobSet's failurePolicy judges a failed Job by that reason: PodFailurePolicy and
  DeadlineExceeded fail the JobSet; BackoffLimitExceeded restarts it, every Job recreated, at
  most maxRestarts (= --max_job_restarts) times, after which it fails with ReachedMaxRestarts.
  The workers resume from the last checkpoint; the trainer's own --max_job_restarts count stays
  as a backstop (jobset api/jobset/v1alpha2/jobset_types.go FailurePolicy, FailurePolicyRule;
  pkg/controllers/failure_policy.go; pkg/webhooks/jobset_webhook.go validOnJobFailureReasons).
"""

from deploy.k8s import common
from deploy.k8s.common import Options
from trainer.runtime import indexed_pod

WORKER_JOB = "worker"
EVALUATOR_JOB = "evaluator"
# The JobSet's container; the podFailurePolicy's onExitCodes name it.
CONTAINER = common.CONTAINER_NAME
PORT_NAME = "collective"
# trainer/launcher.py RETRYABLE_EXIT_CODES: a rerun can succeed after these; every other
# non-zero exit is permanent (tests/deploy_k8s_test.py checks the two agree).
RETRYABLE_EXIT_CODES = (137, 143)
# batch/v1 Job failure reasons (k8s.io/api/batch/v1 types.go JobReason*), the only values
# JobSet's webhook accepts in onJobFailureReasons.
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"


def jobset(o: Options) -> dict:
  """The JobSet: the workers' replicated job, and the evaluator's with --evaluator."""
  evaluator_job = EVALUATOR_JOB if o.evaluator else ""
  replicated = [replicated_job(o, WORKER_JOB, o.workers, CONTAINER, WORKER_JOB, evaluator_job)]
  if o.evaluator:
    replicated.append(replicated_job(o, EVALUATOR_JOB, 1, CONTAINER, WORKER_JOB, evaluator_job))
  return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
          "metadata": common.metadata(o, o.name),
          "spec": spec(o, replicated)}


def spec(o: Options, replicated: list) -> dict:
  """The JobSet spec around the replicated jobs: DNS, success, failure and clean-up."""
  return {
      # enableDNSHostnames: the headless Service (named after the JobSet: GetSubdomain) that
      # makes `<pod host name>.<jobset>` resolve. publishNotReadyAddresses: DNS records exist
      # before the pods are Ready, so the workers find each other while they start. Both are
      # JobSet's defaults (pkg/webhooks/jobset_webhook.go Default), written out here.
      "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
      "replicatedJobs": replicated,
      # Every Job must complete: the workers and, with --evaluator, the evaluator, which exits
      # 0 once it has evaluated the final checkpoint.
      "successPolicy": {"operator": "All"},
      "failurePolicy": failure_policy(o),
      "ttlSecondsAfterFinished": o.ttl_after_finished_s,
  }


def failure_policy(o: Options) -> dict:
  """Permanent exits and deadlines fail the JobSet; retryable ones restart it, up to a bound.

  BlockingRecreate: a restart deletes every old Job and its pods before it creates new ones
  (jobset_types.go JobSetRestartStrategy; since JobSet v0.7), so no old pod that is still
  writing its preemption checkpoint, or still answering at the same host name, meets the new
  attempt's workers.
  """
  return {"maxRestarts": o.max_job_restarts, "restartStrategy": "BlockingRecreate",
          "rules": [{"name": "PermanentExit", "action": "FailJobSet",
                     "onJobFailureReasons": [REASON_POD_FAILURE_POLICY]},
                    {"name": "DeadlineExceeded", "action": "FailJobSet",
                     "onJobFailureReasons": [REASON_DEADLINE]},
                    {"name": "RetryableExit", "action": "RestartJobSet",
                     "onJobFailureReasons": [REASON_BACKOFF_LIMIT]}]}


def pod_failure_policy(container_name: str) -> dict:
  """Kubernetes' podFailurePolicy for the exit-code contract; rules match in order."""
  return {"rules": [
      # Disrupted by the cluster, whatever the exit code: restart.
      {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
      {"action": "Count", "onExitCodes": {"containerName": container_name, "operator": "In",
                                          "values": list(RETRYABLE_EXIT_CODES)}},
      {"action": "FailJob", "onExitCodes": {"containerName": container_name,
                                            "operator": "NotIn",
                                            "values": list(RETRYABLE_EXIT_CODES)}}]}


def replicated_job(o: Options, name: str, pods: int, container_name: str, worker_job: str,
                   evaluator_job: str = "", job_labels: dict = None, pod_labels: dict = None,
                   with_args: bool = True) -> dict:
  """One replicated job of one Indexed Job with `pods` pods, each running the trainer.

  Every pod gets the names trainer/runtime/indexed_pod.py builds TF_CONFIG from: its JobSet, replicated
  job and Job index through the downward API, the worker count, the two replicated jobs' names
  and the port as values. (A Trainer v2 runtime passes its own labels, and no arguments: the
  TrainJob gives them.)
  """
  env = [*common.downward_env(),
         {"name": indexed_pod.WORKERS, "value": str(o.workers)},
         {"name": indexed_pod.WORKER_JOB, "value": worker_job},
         {"name": indexed_pod.PORT, "value": str(common.PORT)}]
  if evaluator_job:
    env.append({"name": indexed_pod.EVALUATOR_JOB, "value": evaluator_job})
  the_container = common.container(o, container_name, PORT_NAME, tuple(env), with_args)
  job_spec = {
      "completionMode": "Indexed",
      "completions": pods,
      "parallelism": pods,
      # One counted failure fails the Job; the JobSet restarts all of them (see failure_policy).
      "backoffLimit": 0,
      "activeDeadlineSeconds": o.active_deadline_s,
      "podFailurePolicy": pod_failure_policy(container_name),
      "template": common.pod_template(o, pod_labels or common.labels(o), the_container,
                                      "Never"),
  }
  return {"name": name, "replicas": 1,
          "template": {"metadata": {"labels": dict(job_labels or common.labels(o))},
                       "spec": job_spec}}

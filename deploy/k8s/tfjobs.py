"""A Kubeflow TFJob (kubeflow.org/v1), for clusters that run the training-operator v1.9.

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

from deploy.k8s import common
from deploy.k8s.common import Options

# Exit codes restartPolicy ExitCode recreates the pod for in every operator version: v1.7 to v1.9
# retry every code >= 128 (kubeflow/training-operator pkg/util/train/train_util.go,
# IsRetryableExitCode), v1.6 and before took kubeflow/common's list, these four. Codes 1-127 fail
# the job in all of them.
OPERATOR_RETRYABLE_EXIT_CODES = (130, 137, 138, 143)


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
  return {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": common.metadata(o, o.name),
          "spec": {"runPolicy": _run_policy(o), "tfReplicaSpecs": replica_specs}}


def _replica_spec(o: Options, replicas: int) -> dict:
  # ExitCode: a signal's code (143: ours, preempted or a lost peer; 137: SIGKILL) recreates the
  # pod, which resumes from the last checkpoint; codes 1-127, our 1-7 included, fail the job
  # (pkg/util/train/train_util.go IsRetryableExitCode; OPERATOR_RETRYABLE_EXIT_CODES).
  # The operator injects TF_CONFIG into the container named "tensorflow".
  return {"replicas": replicas, "restartPolicy": "ExitCode",
          "template": common.pod_template(o, common.labels(o), common.container(o))}


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

"""Builds TF_CONFIG from the environment of a JobSet pod, as deploy/slurm_env.py does from Slurm's.

A JobSet (kubernetes-sigs/jobset, jobset.x-k8s.io/v1alpha2; also what a Kubeflow Trainer v2
TrainJob runs) creates one Indexed Job per replicated job and replica. The workers are the N pods
of one Indexed Job; the side-car evaluator, when there is one, the single pod of another. Every
name a pod needs to find its peers is in its own environment, set by deploy/k8s's manifests, so an
operator never writes TF_CONFIG:

| Variable | Set by | Value |
| --- | --- | --- |
| JOB_COMPLETION_INDEX | Kubernetes, in an Indexed Job's pods | the pod's index |
| JOBSET_NAME | manifest, downward API: label jobset.sigs.k8s.io/jobset-name | the JobSet |
| JOBSET_REPLICATED_JOB | manifest, downward API: .../replicatedjob-name | its replicated job |
| JOBSET_JOB_INDEX | manifest, downward API: .../job-index | its Job's index in it |
| TRAINER_WORKERS | manifest (a TrainJob: its trainer env, beside numNodes) | worker pods |
| TRAINER_WORKER_JOB | manifest | the workers' replicated job |
| TRAINER_EVALUATOR_JOB | manifest, with an evaluator | the evaluator's replicated job |
| TRAINER_PORT | manifest | the gRPC port every pod listens on |

Sources: Kubernetes pkg/controller/job/indexed_job_utils.go (JOB_COMPLETION_INDEX,
addCompletionIndexEnvVariable) and job_controller.go (an Indexed Job's pod gets the host name
`<job name>-<index>`); jobset api/jobset/v1alpha2/jobset_types.go (JobSetNameKey,
ReplicatedJobNameKey, JobIndexKey; Network: pods are reachable as
`<jobSet>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>`), pkg/controllers/jobset_controller.go
(labelAndAnnotateObject puts those labels on every pod; constructJob names the Job
`<jobSet>-<replicatedJob>-<jobIndex>` and sets the pod subdomain; GetSubdomain defaults it to
the JobSet's name, which is also the headless Service's name). Read at jobset v0.12.0.
"""

from typing import Mapping

from trainer import errors

# Set by Kubernetes for Indexed Jobs.
COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
# Set by deploy/k8s through the downward API (fieldRef metadata.labels[...]) from these labels.
JOBSET_NAME = "JOBSET_NAME"
REPLICATED_JOB = "JOBSET_REPLICATED_JOB"
JOB_INDEX = "JOBSET_JOB_INDEX"
DOWNWARD_LABELS = {JOBSET_NAME: "jobset.sigs.k8s.io/jobset-name",
                   REPLICATED_JOB: "jobset.sigs.k8s.io/replicatedjob-name",
                   JOB_INDEX: "jobset.sigs.k8s.io/job-index"}
# Set by deploy/k8s as plain values. WORKERS also marks a pod of ours: without it this module
# stays out of the way (an Indexed Job of independent single-process runs, say).
WORKERS = "TRAINER_WORKERS"
WORKER_JOB = "TRAINER_WORKER_JOB"
EVALUATOR_JOB = "TRAINER_EVALUATOR_JOB"
PORT = "TRAINER_PORT"

_FIX = ("deploy/k8s renders these; run the job from its manifest (python -m deploy.k8s "
        "--api=jobset or --api=trainjob).")


def is_indexed_pod(environ: Mapping[str, str]) -> bool:
  """True when the environment describes a pod of a deploy/k8s JobSet or TrainJob."""
  return bool(environ.get(WORKERS, "").strip())


def tf_config(environ: Mapping[str, str]) -> dict:
  """The TF_CONFIG of this pod: the workers are `worker` 0..N-1 (index = completion index), the
  evaluator is `evaluator` 0; every address is the pod's JobSet host name and TRAINER_PORT."""
  num_workers = _count(environ, WORKERS, minimum=1)
  port = _count(environ, PORT, minimum=1)
  if port > 65535:
    raise errors.ConfigError(f"{PORT}={port} is not a TCP port (1..65535); {_FIX}")
  jobset = _required(environ, JOBSET_NAME)
  rjob = _required(environ, REPLICATED_JOB)
  worker_job = _required(environ, WORKER_JOB)
  evaluator_job = environ.get(EVALUATOR_JOB, "").strip()
  if evaluator_job == worker_job:
    raise errors.ConfigError(f"{EVALUATOR_JOB} and {WORKER_JOB} both name {worker_job!r}: the "
                             f"evaluator needs a replicated job of its own; {_FIX}")
  job_index = _count(environ, JOB_INDEX, minimum=0)
  index = _count(environ, COMPLETION_INDEX, minimum=0)
  # One Job holds every worker (one replica of the replicated job, completions = N): a second
  # replica would be a second, unconnected set of workers writing the same checkpoints.
  if job_index != 0:
    raise errors.ConfigError(
        f"{JOB_INDEX}={job_index}: the replicated job {rjob!r} must have one replica (its Job's "
        f"completions are the workers), not several; {_FIX}")
  cluster = {"worker": [address(jobset, worker_job, i, port) for i in range(num_workers)]}
  if evaluator_job:
    cluster["evaluator"] = [address(jobset, evaluator_job, 0, port)]
  if rjob == worker_job:
    if index >= num_workers:
      raise errors.ConfigError(
          f"{COMPLETION_INDEX}={index} but {WORKERS}={num_workers}: the Job's completions and "
          f"{WORKERS} must be the same number; {_FIX}")
    return {"cluster": cluster, "task": {"type": "worker", "index": index}}
  if rjob == evaluator_job:
    if index != 0:
      raise errors.ConfigError(f"{COMPLETION_INDEX}={index} in the evaluator's Job: a job has one "
                               f"evaluator pod (completions 1); {_FIX}")
    return {"cluster": cluster, "task": {"type": "evaluator", "index": 0}}
  known = " or ".join(repr(n) for n in (worker_job, evaluator_job) if n)
  raise errors.ConfigError(f"{REPLICATED_JOB}={rjob!r} is neither the workers' nor the "
                           f"evaluator's replicated job ({known}); {_FIX}")


def host(jobset: str, rjob: str, job_index: int, pod_index: int) -> str:
  """A pod's DNS name inside its JobSet's headless Service (subdomain = the JobSet's name)."""
  return f"{jobset}-{rjob}-{job_index}-{pod_index}.{jobset}"


def address(jobset: str, rjob: str, pod_index: int, port: int) -> str:
  """host:port of pod `pod_index` of the replicated job's only Job."""
  return f"{host(jobset, rjob, 0, pod_index)}:{port}"


def _required(environ: Mapping[str, str], name: str) -> str:
  value = environ.get(name, "").strip()
  if not value:
    why = (" (Kubernetes sets it only in an Indexed Job: completionMode Indexed)"
           if name == COMPLETION_INDEX else "")
    raise errors.ConfigError(f"{WORKERS} is set, so this is a JobSet pod, but {name} is not "
                             f"set{why}; {_FIX}")
  return value


def _count(environ: Mapping[str, str], name: str, minimum: int) -> int:
  text = _required(environ, name)
  # isdigit() alone would take '²'; int() would take ' 1' or '+1'.
  if not (text.isascii() and text.isdigit()) or int(text) < minimum:
    raise errors.ConfigError(f"{name}={text!r} must be a whole number >= {minimum}; {_FIX}")
  return int(text)

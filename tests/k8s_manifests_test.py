"""Every manifest deploy.k8s renders, checked against the CRDs of named releases and the
Kubernetes client's models; the JobSet and Trainer v2 manifests' structure, exit-code contract,
and the TF_CONFIG each of their pods builds from its own environment."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags as absl_flags

import k8s_validation
from conftest import ROOT
from deploy import k8s
from deploy.k8s import jobsets
from deploy.k8s import trainjobs
from trainer.runtime import cluster
from trainer import errors
from trainer.runtime import indexed_pod
from trainer import launcher

IMAGE = "us-docker.pkg.dev/proj/repo/mnist-trainer:1"
MODEL_DIR = "gs://out-bucket/runs/k8s-1"
GSA = "trainer@my-proj.iam.gserviceaccount.com"


def options(**overrides):
  return k8s.Options(**{"image": IMAGE, "model_dir": MODEL_DIR, **overrides})


# Every flag that changes what is rendered, on every API that has it.
RENDERINGS = [
    {},
    {"chief": True, "evaluator": True, "gang_scheduling": True, "kueue_queue": "team-a"},
    {"gpus_per_worker": 0, "namespace": "ml", "service_account": "ksa",
     "gcp_service_account": GSA},
    {"api": "jobset"},
    {"api": "jobset", "evaluator": True, "workers": 8, "kueue_queue": "team-a",
     "gke_accelerator": "nvidia-l4", "gpus_per_worker": 4, "namespace": "ml",
     "service_account": "ksa", "gcp_service_account": GSA, "name": "a" * 40,
     "ttl_after_finished_s": 0, "max_job_restarts": 1,
     "trainer_args": ("--epochs=2", "--preemption_grace_s=90")},
    {"api": "trainjob"},
    {"api": "trainjob", "workers": 16, "gpus_per_worker": 0, "kueue_queue": "team-a",
     "runtime_name": "tf-cpu", "namespace": "ml", "service_account": "ksa",
     "gcp_service_account": GSA, "name": "a" * 40},
    {"api": "trainjob", "cluster_runtime": False},
]


def _id(overrides):
  return ",".join(f"{k}={v}" for k, v in overrides.items() if k != "trainer_args")[:60] or "tfjob"


@pytest.mark.parametrize("overrides", RENDERINGS, ids=_id)
def test_every_rendering_is_valid_for_every_named_release(overrides):
  listing = k8s.manifest(options(**overrides), with_network_policy=True)
  assert listing["kind"] == "List"
  assert k8s_validation.validation_errors(listing) == []
  kinds = {(item["apiVersion"], item["kind"]) for item in listing["items"]}
  assert kinds & set(k8s_validation.RELEASES), "a job kind was checked against its CRDs"


@pytest.mark.parametrize("api", k8s.APIS)
def test_the_command_line_output_is_valid(api):
  result = subprocess.run([sys.executable, "-m", "deploy.k8s", f"--api={api}", "--image", IMAGE,
                           "--model_dir", MODEL_DIR], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
  assert result.returncode == 0, result.stderr
  assert k8s_validation.validation_errors(json.loads(result.stdout)) == []


def test_the_schemas_are_the_upstream_files_the_readme_names():
  readme = (k8s_validation.SCHEMA_DIR / "README.md").read_text()
  rows = re.findall(r"^\| `([^`]+\.yaml\.gz)` \|.*\| ([0-9a-f]{40}) \| ([0-9a-f]{64}) \|$",
                    readme, re.M)
  listed = {name for files in k8s_validation.RELEASES.values() for name in files}
  assert {name for name, _, _ in rows} == listed == {
      p.name for p in k8s_validation.SCHEMA_DIR.glob("*.yaml.gz")}
  for name, _, digest in rows:
    with gzip.open(k8s_validation.SCHEMA_DIR / name) as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, name


@pytest.mark.parametrize("api, path, typo", [
    ("jobset", ["spec"], "replicatedJob"),
    ("jobset", ["spec", "failurePolicy"], "maxRestart"),
    ("jobset", ["spec", "replicatedJobs", 0, "template", "spec"], "podFailurePolicies"),
    ("jobset", ["spec", "replicatedJobs", 0, "template", "spec", "podFailurePolicy", "rules", 1,
                "onExitCodes"], "container"),
    ("jobset", ["spec", "replicatedJobs", 0, "template", "spec", "template", "spec",
                "containers", 0], "envs"),
    ("jobset", ["spec", "replicatedJobs", 0, "template", "spec", "template", "metadata"],
     "annotation"),
    ("tfjob", ["spec", "tfReplicaSpecs", "Worker", "template", "spec"], "nodeSelectors"),
    ("tfjob", ["spec", "runPolicy"], "activeDeadline"),
    ("trainjob", ["spec", "trainer"], "numNode"),
    ("trainjob", ["spec", "runtimeRef"], "group"),
])
def test_a_misspelt_field_is_an_error_not_pruned(api, path, typo):
  job = k8s.manifest(options(api=api, cluster_runtime=True))
  job = job["items"][-1] if job["kind"] == "List" else job
  node = job
  for key in path:
    node = node[key]
  node[typo] = 1
  found = k8s_validation.validation_errors(job)
  assert found and all(typo in e for e in found), found


def test_metadata_and_pod_fields_are_checked_against_the_kubernetes_models():
  job = k8s.jobset(options(api="jobset"))
  job["metadata"]["lables"] = {"a": "b"}  # the CRD says only `metadata: {type: object}`
  assert k8s_validation.validation_errors(job) == [
      "metadata/lables: dropped (unknown field) in the V1ObjectMeta round trip"]
  job = k8s.jobset(options(api="jobset"))
  pod = job["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  del pod["containers"][0]["name"]
  assert any("V1JobTemplateSpec" in e for e in k8s_validation.validation_errors(job))


def test_kubernetes_job_rules_a_schema_cannot_express_are_checked():
  job = k8s.jobset(options(api="jobset"))
  job_spec = job["spec"]["replicatedJobs"][0]["template"]["spec"]
  job_spec["template"]["spec"]["restartPolicy"] = "OnFailure"
  job_spec["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] = [143, 137]
  job_spec["podFailurePolicy"]["rules"][2]["onExitCodes"]["containerName"] = "trainer"
  job["spec"]["failurePolicy"]["rules"][0]["onJobFailureReasons"] = ["OOMKilled"]
  found = "\n".join(k8s_validation.validation_errors(job))
  assert "only restartPolicy Never is supported with podFailurePolicy" in found
  assert "exit codes must be unique and ordered" in found
  assert "containerName 'trainer' is not a container" in found
  assert "'OOMKilled' is not a recognized job failure reason" in found


# ---- The JobSet ----

def replicated_jobs(job):
  return {r["name"]: r for r in job["spec"]["replicatedJobs"]}


def test_jobset_runs_the_workers_as_one_indexed_job_and_the_evaluator_as_another():
  job = k8s.jobset(options(api="jobset", workers=3, evaluator=True, kueue_queue="team-a"))
  assert (job["apiVersion"], job["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
  assert job["spec"]["network"]["enableDNSHostnames"] is True
  # The subdomain defaults to the JobSet's name, which trainer/runtime/indexed_pod.py relies on.
  assert "subdomain" not in job["spec"]["network"]
  rjobs = replicated_jobs(job)
  assert list(rjobs) == ["worker", "evaluator"]
  for name, pods in (("worker", 3), ("evaluator", 1)):
    rjob = rjobs[name]
    assert rjob["replicas"] == 1
    spec = rjob["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == (
        "Indexed", pods, pods)
    pod = spec["template"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    [c] = pod["spec"]["containers"]
    assert c["args"] == [f"--model_dir={MODEL_DIR}", "--strategy=multi_worker_mirrored",
                         f"--max_job_restarts={k8s.DEFAULT_MAX_JOB_RESTARTS}"]
    assert "TF_CONFIG" not in {e["name"] for e in c["env"]}, "nobody writes TF_CONFIG"
  assert "evaluator" not in replicated_jobs(k8s.jobset(options(api="jobset")))


def test_the_exit_code_contract_in_kubernetes_terms():
  """Every exit code and a disruption, through the rendered podFailurePolicy and failurePolicy
  as the Job and JobSet controllers apply them: permanent codes fail the JobSet, retryable ones
  and disruptions restart it."""
  job = k8s.jobset(options(api="jobset", evaluator=True, max_job_restarts=4))
  assert jobsets.RETRYABLE_EXIT_CODES == launcher.RETRYABLE_EXIT_CODES
  assert job["spec"]["failurePolicy"]["maxRestarts"] == 4
  assert job["spec"]["failurePolicy"]["restartStrategy"] == "BlockingRecreate"
  for rjob in ("worker", "evaluator"):
    job_spec = replicated_jobs(job)[rjob]["template"]["spec"]
    assert job_spec["backoffLimit"] == 0

    def outcome(code, disrupted=False):
      reason = k8s_validation.job_failure_reason(job_spec, code, disrupted)
      return k8s_validation.jobset_action(job["spec"], reason, rjob)

    for code in errors.PERMANENT_EXIT_CODES:
      assert outcome(code) == "FailJobSet", code
    assert outcome(errors.EXIT_RETRYABLE) == outcome(137) == "RestartJobSet"
    for code in range(1, 256):
      expected = "RestartJobSet" if code in launcher.RETRYABLE_EXIT_CODES else "FailJobSet"
      assert outcome(code) == expected, code
      # Evicted or preempted by the cluster: restart, whatever the code.
      assert outcome(code, disrupted=True) == "RestartJobSet", code
  # A Job past its activeDeadlineSeconds fails the JobSet instead of restarting it for a day.
  assert k8s_validation.jobset_action(job["spec"], "DeadlineExceeded", "worker") == "FailJobSet"


def test_each_jobset_pod_builds_the_same_cluster_from_its_own_environment():
  job = k8s.jobset(options(api="jobset", workers=3, evaluator=True, name="exp-7"))
  workers = [f"exp-7-worker-0-{i}.exp-7:2222" for i in range(3)]
  seen = []
  for rjob, index in [("worker", 0), ("worker", 1), ("worker", 2), ("evaluator", 0)]:
    env = k8s_validation.pod_environment(job, rjob, index)
    assert env["JOB_COMPLETION_INDEX"] == str(index)
    info = cluster.parse_cluster(env)
    task_type = "worker" if rjob == "worker" else "evaluator"
    assert (info.task_type, info.task_index) == (task_type, index)
    assert list(info.cluster["worker"]) == workers
    assert list(info.cluster["evaluator"]) == ["exp-7-evaluator-0-0.exp-7:2222"]
    # Its own address is its host name in the JobSet's headless Service, on the container port.
    own = info.cluster[task_type][index]
    assert own == f"{env['HOSTNAME']}.exp-7:2222"
    [container] = replicated_jobs(job)[rjob]["template"]["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0]["containerPort"] == 2222
    seen.append(json.loads(info.tf_config))
  # The workers' TensorFlow cluster leaves the evaluator out; the evaluator's is itself.
  assert [c["cluster"] for c in seen[:3]] == [{"worker": workers}] * 3
  assert seen[3]["cluster"] == {"evaluator": ["exp-7-evaluator-0-0.exp-7:2222"]}
  assert cluster.parse_cluster(k8s_validation.pod_environment(job, "worker", 0)).is_chief


def test_jobset_network_policy_selects_the_jobsets_pods():
  listing = k8s.manifest(options(api="jobset", name="exp-7", evaluator=True), True)
  policy, job = listing["items"]
  selector = policy["spec"]["podSelector"]["matchLabels"]
  assert selector == {"jobset.sigs.k8s.io/jobset-name": "exp-7",
                      "app.kubernetes.io/name": "mnist-dist-trainer"}
  for rjob in replicated_jobs(job).values():
    labels = dict(rjob["template"]["spec"]["template"]["metadata"]["labels"],
                  **{"jobset.sigs.k8s.io/jobset-name": "exp-7"})  # JobSet adds this one
    assert selector.items() <= labels.items()
  assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 2222}]


def test_the_trainer_parses_the_jobset_containers_arguments():
  from trainer import config
  job = k8s.jobset(options(api="jobset", max_job_restarts=3, trainer_args=("--epochs=1",)))
  [c] = replicated_jobs(job)["worker"]["template"]["spec"]["template"]["spec"]["containers"]
  flag_values = absl_flags.FlagValues()
  config.define_flags(flag_values)
  flag_values(["trainer", *c["args"]])
  parsed = config.config_from_flags(flag_values, environ={})
  assert (parsed.runtime.max_job_restarts, parsed.outputs.model_dir, parsed.runtime.strategy, parsed.training.epochs) == (
      3, MODEL_DIR, "multi_worker_mirrored", 1)


# ---- Kubeflow Trainer v2 ----

def test_trainjob_and_its_plain_ml_runtime_fit_together():
  listing = k8s.manifest(options(api="trainjob", workers=3, kueue_queue="team-a"))
  runtime, job = listing["items"]
  assert (runtime["kind"], job["kind"]) == ("ClusterTrainingRuntime", "TrainJob")
  assert job["spec"]["runtimeRef"] == {"name": runtime["metadata"]["name"],
                                       "apiGroup": "trainer.kubeflow.org",
                                       "kind": "ClusterTrainingRuntime"}
  assert "namespace" not in runtime["metadata"], "cluster-scoped"
  # plainML: numNodes and no framework policy (kubeflow/trainer plainml.go acts only then).
  assert runtime["spec"]["mlPolicy"] == {"numNodes": 3}
  [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
  assert node["name"] == "node"
  assert node["template"]["metadata"]["labels"] == {
      "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
  [c] = node["template"]["spec"]["template"]["spec"]["containers"]
  assert c["name"] == "node" and "args" not in c, "the TrainJob gives the arguments"
  # Kueue queues the TrainJob, not the runtime.
  assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
  assert "kueue.x-k8s.io/queue-name" not in runtime["metadata"]["labels"]
  trainer = job["spec"]["trainer"]
  assert trainer["numNodes"] == 3
  assert trainer["env"] == [{"name": "TRAINER_WORKERS", "value": "3"}]
  assert trainer["args"][:2] == [f"--model_dir={MODEL_DIR}", "--strategy=multi_worker_mirrored"]
  only_job = k8s.manifest(options(api="trainjob", cluster_runtime=False))
  assert only_job["kind"] == "TrainJob"


@pytest.mark.parametrize("nodes", [2, 5])
def test_trainjob_pods_build_the_cluster_trainer_v2_gives_them(nodes):
  """The JobSet Trainer v2 makes of the runtime and a TrainJob: the TrainJob's numNodes and
  TRAINER_WORKERS win over the runtime's, and every pod lists the same workers."""
  runtime = trainjobs.cluster_training_runtime(options(api="trainjob", workers=2))
  job = trainjobs.train_job(options(api="trainjob", workers=nodes, name="tj"))
  jobset = k8s_validation.trainer_v2_jobset(runtime, job)
  assert k8s_validation.validation_errors(jobset) == []
  workers = [f"tj-node-0-{i}.tj:2222" for i in range(nodes)]
  for index in range(nodes):
    env = k8s_validation.pod_environment(jobset, "node", index)
    info = cluster.parse_cluster(env)
    assert (info.task_type, info.task_index, list(info.cluster["worker"])) == (
        "worker", index, workers)
    assert info.is_chief == (index == 0)


def test_trainer_v2_names_match_its_source():
  """The constants deploy/k8s/trainjobs.py relies on (kubeflow/trainer v2.3.0
  pkg/constants/constants.go), and the JobSet labels trainer/runtime/indexed_pod.py reads (jobset
  v0.12.0 api/jobset/v1alpha2/jobset_types.go)."""
  assert (trainjobs.ANCESTOR_LABEL, trainjobs.ANCESTOR_TRAINER, trainjobs.NODE) == (
      "trainer.kubeflow.org/trainjob-ancestor-step", "trainer", "node")
  assert indexed_pod.DOWNWARD_LABELS == {
      "JOBSET_NAME": "jobset.sigs.k8s.io/jobset-name",
      "JOBSET_REPLICATED_JOB": "jobset.sigs.k8s.io/replicatedjob-name",
      "JOBSET_JOB_INDEX": "jobset.sigs.k8s.io/job-index"}

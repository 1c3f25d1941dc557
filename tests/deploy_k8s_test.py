"""Kubeflow TFJob manifest and NetworkPolicy: structure, restart policy vs exit codes, security.

The JobSet and Trainer v2 manifests, and the CRD-schema validation of all three, are in
tests/k8s_manifests_test.py.
"""

import json
import pathlib

import pytest
from absl import flags as absl_flags

from deploy import k8s
from deploy import trainer_args
from trainer import errors
import forked_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGE = "us-docker.pkg.dev/proj/repo/mnist-trainer:1"
MODEL_DIR = "gs://out-bucket/runs/k8s-1"


# `python -m deploy.k8s`, each run forked from one process that imported absl and the trainer's
# flag definitions (tests/forked_cli.py): 0.1 s of CPU a run saved, 4 s over this module.
K8S = forked_cli.ForkServer("deploy.k8s", preload=("absl.app", "trainer.config"),
                            PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module", autouse=True)
def _k8s_fork_server():
  yield
  K8S.close()


def run_k8s(*args):
  return K8S.run(*args, timeout=60)


def render(*extra):
  result = run_k8s("--workers", "3", "--gpus_per_worker", "2", "--image", IMAGE,
                   "--model_dir", MODEL_DIR, *extra)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout)


def replicas(job):
  return job["spec"]["tfReplicaSpecs"]


def pod_spec(replica):
  return replica["template"]["spec"]


def container(replica):
  [c] = pod_spec(replica)["containers"]
  return c


def test_cli_renders_a_tfjob_with_n_gpu_workers():
  job = render("--", "--epochs=4", "--global_batch_size=256")
  assert job["apiVersion"] == "kubeflow.org/v1"
  assert job["kind"] == "TFJob"
  assert list(replicas(job)) == ["Worker"]
  worker = replicas(job)["Worker"]
  assert worker["replicas"] == 3
  c = container(worker)
  # The training operator injects TF_CONFIG into, and opens the port of, this container name.
  assert c["name"] == "tensorflow"
  assert c["image"] == IMAGE
  assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
  assert c["args"] == [f"--model_dir={MODEL_DIR}", "--strategy=multi_worker_mirrored",
                       f"--max_job_restarts={k8s.DEFAULT_MAX_JOB_RESTARTS}",
                       "--epochs=4", "--global_batch_size=256"]
  assert {"name": "tfjob-port", "containerPort": 2222, "protocol": "TCP"} in c["ports"]
  assert "command" not in c, "the image's ENTRYPOINT runs trainer.task"


def test_chief_is_one_of_the_workers():
  job = render("--chief")
  assert replicas(job)["Chief"]["replicas"] == 1
  assert replicas(job)["Worker"]["replicas"] == 2
  assert container(replicas(job)["Chief"]) == container(replicas(job)["Worker"])


def test_restart_policy_matches_the_exit_code_contract():
  job = render("--chief")
  for replica in replicas(job).values():
    # ExitCode recreates pods only for the operator's retryable codes; all others fail the job.
    assert replica["restartPolicy"] == "ExitCode"
  assert errors.EXIT_RETRYABLE in k8s.OPERATOR_RETRYABLE_EXIT_CODES
  assert not set(errors.PERMANENT_EXIT_CODES) & set(k8s.OPERATOR_RETRYABLE_EXIT_CODES)
  assert errors.EXIT_RESTARTS_EXHAUSTED in errors.PERMANENT_EXIT_CODES
  backoff = job["spec"]["runPolicy"]["backoffLimit"]
  assert 0 < backoff <= k8s.MAX_BACKOFF_LIMIT


# RunPolicy's JSON fields (kubeflow/training-operator pkg/apis/kubeflow.org/v1/common_types.go).
RUN_POLICY_FIELDS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                     "backoffLimit", "schedulingPolicy", "suspend", "managedBy"}
SCHEDULING_POLICY_FIELDS = {"minAvailable", "queue", "minResources", "priorityClass",
                            "scheduleTimeoutSeconds"}


def test_restarts_are_bounded_by_a_deadline_and_the_trainers_own_count():
  """backoffLimit counts nothing under ExitCode (kubeflow/trainer#2045): these do."""
  job = render("--max_job_restarts", "2", "--active_deadline_s", "7200",
               "--ttl_after_finished_s", "600")
  policy = job["spec"]["runPolicy"]
  assert set(policy) <= RUN_POLICY_FIELDS
  assert policy["activeDeadlineSeconds"] == 7200
  assert policy["ttlSecondsAfterFinished"] == 600
  assert "--max_job_restarts=2" in container(replicas(job)["Worker"])["args"]
  defaults = render()["spec"]["runPolicy"]
  assert defaults["activeDeadlineSeconds"] == k8s.DEFAULT_ACTIVE_DEADLINE_S > 0
  assert defaults["ttlSecondsAfterFinished"] == k8s.DEFAULT_TTL_AFTER_FINISHED_S


def test_the_trainer_parses_the_rendered_arguments():
  from trainer import config
  job = render("--max_job_restarts", "4", "--", "--epochs=1")
  flag_values = absl_flags.FlagValues()
  config.define_flags(flag_values)
  flag_values(["trainer", *container(replicas(job)["Worker"])["args"]])
  parsed = config.config_from_flags(flag_values, environ={})
  assert parsed.runtime.max_job_restarts == 4
  assert parsed.outputs.model_dir == MODEL_DIR
  assert parsed.runtime.strategy == "multi_worker_mirrored"


def test_gang_scheduling_waits_for_every_worker():
  job = render("--chief", "--gang_scheduling")
  scheduling = job["spec"]["runPolicy"]["schedulingPolicy"]
  assert set(scheduling) <= SCHEDULING_POLICY_FIELDS
  total = sum(r["replicas"] for r in replicas(job).values())
  assert scheduling == {"minAvailable": total} and total == 3
  assert "schedulingPolicy" not in render()["spec"]["runPolicy"]


def test_gke_accelerator_selects_gpu_nodes():
  job = render("--gke_accelerator", "nvidia-l4")
  for replica in replicas(job).values():
    assert pod_spec(replica)["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
  assert "nodeSelector" not in pod_spec(replicas(render())["Worker"])


def test_workload_identity_service_account_comes_first():
  gsa = "trainer@my-proj.iam.gserviceaccount.com"
  result = run_k8s("--workers", "2", "--image", IMAGE, "--model_dir", MODEL_DIR,
                   "--namespace", "ml", "--service_account", "trainer-ksa",
                   "--gcp_service_account", gsa, "--network_policy")
  assert result.returncode == 0, result.stderr
  listing = json.loads(result.stdout)
  account, policy, job = listing["items"]
  assert [account["kind"], policy["kind"], job["kind"]] == ["ServiceAccount", "NetworkPolicy",
                                                            "TFJob"]
  assert account["metadata"]["name"] == "trainer-ksa"
  assert account["metadata"]["namespace"] == "ml"
  assert account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": gsa}
  assert pod_spec(replicas(job)["Worker"])["serviceAccountName"] == "trainer-ksa"
  # The IAM binding that lets the KSA act as the GSA, ready to paste.
  assert (f"gcloud iam service-accounts add-iam-policy-binding {gsa} "
          "--role=roles/iam.workloadIdentityUser "
          "--member=serviceAccount:my-proj.svc.id.goog[ml/trainer-ksa]") in result.stderr


def test_grace_period_outlasts_the_trainers_preemption_deadline():
  default = pod_spec(replicas(render())["Worker"])["terminationGracePeriodSeconds"]
  assert default > trainer_args.trainer_default("preemption_grace_s")
  longer = render("--", "--preemption_grace_s", "90")
  assert pod_spec(replicas(longer)["Worker"])["terminationGracePeriodSeconds"] > 90


def test_pods_opt_out_of_istio_sidecar_injection():
  """Kubeflow's TFJob guide: TFJob "doesn't work in a user namespace by default because of Istio
  automatic sidecar injection", and needs sidecar.istio.io/inject: "false" on its pods."""
  job = render("--chief", "--evaluator")
  for replica in replicas(job).values():
    assert replica["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_kueue_queue_label_on_the_tfjob():
  job = render("--kueue_queue", "team-a")
  assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
  assert "kueue.x-k8s.io/queue-name" not in render()["metadata"]["labels"]


def test_pods_run_as_the_images_non_root_user():
  spec = pod_spec(replicas(render())["Worker"])
  security = spec["securityContext"]
  assert security["runAsNonRoot"] is True
  dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
  assert f"USER {security['runAsUser']}:" in dockerfile
  c = container(replicas(render())["Worker"])
  assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_cpu_only_workers_request_no_gpus():
  job = k8s.tfjob(k8s.Options(image=IMAGE, model_dir=MODEL_DIR, gpus_per_worker=0))
  assert "nvidia.com/gpu" not in container(replicas(job)["Worker"])["resources"]["limits"]


def test_network_policy_only_admits_pods_of_the_same_job():
  listing = render("--network_policy", "--name", "exp-7", "--namespace", "ml")
  assert listing["kind"] == "List"
  policy, job = listing["items"]
  assert policy["kind"] == "NetworkPolicy" and job["kind"] == "TFJob"
  assert policy["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml"
  labels = replicas(job)["Worker"]["template"]["metadata"]["labels"]
  selector = policy["spec"]["podSelector"]["matchLabels"]
  assert selector.items() <= labels.items(), "the policy must select the job's pods"
  assert selector[k8s.JOB_LABEL] == "exp-7"
  [rule] = policy["spec"]["ingress"]
  assert rule["from"] == [{"podSelector": {"matchLabels": selector}}]
  assert rule["ports"] == [{"protocol": "TCP", "port": 2222}]
  assert policy["spec"]["policyTypes"] == ["Ingress"]
  # Another job's pods do not match the selector.
  other = k8s.tfjob(k8s.Options(image=IMAGE, model_dir=MODEL_DIR, name="exp-8"))
  other_labels = replicas(other)["Worker"]["template"]["metadata"]["labels"]
  assert not selector.items() <= other_labels.items()


def test_shipped_network_policy_matches_the_default_job():
  text = (ROOT / "deploy" / "k8s" / "networkpolicy.yaml").read_text()
  # YAML in JSON flow style: comment lines, then one JSON document.
  body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
  assert json.loads(body) == k8s.network_policy(k8s.DEFAULT_NAME)
  job = render()
  assert job["metadata"]["name"] == k8s.DEFAULT_NAME


@pytest.mark.parametrize("args, message", [
    (["--workers", "1", "--image", IMAGE, "--model_dir", MODEL_DIR], "--workers=1"),
    (["--image", IMAGE, "--model_dir", "/data/run"], "gs://"),
    (["--model_dir", MODEL_DIR], "--image"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--backoff_limit", "100"], "--backoff_limit"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--termination_grace_s", "20"],
     "--preemption_grace_s"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--name", "Bad_Name"], "--name"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--", "--strategy=mirrored"], "--strategy"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--", "--model_dir=gs://x"], "--model_dir"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--gpus", "2"], "gpus"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--active_deadline_s", "0"],
     "--active_deadline_s=0 must be > 0"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--active_deadline_s", "40"],
     "must exceed the pods' grace period"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--ttl_after_finished_s", "-1"],
     "--ttl_after_finished_s=-1"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--ttl_after_finished_s", str(2**31)],
     "--ttl_after_finished_s"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--max_job_restarts", "-1"],
     "--max_job_restarts=-1"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--", "--max_job_restarts=9"],
     "use this tool's --max_job_restarts"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--gke_accelerator", "tesla-t4"],
     "--gke_accelerator='tesla-t4'"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--gke_accelerator", "nvidia-tesla-t4",
      "--gpus_per_worker", "0"], "--gke_accelerator needs --gpus_per_worker > 0"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--gcp_service_account",
      "trainer@p-123.iam.gserviceaccount.com"], "--gcp_service_account needs --service_account"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--service_account", "ksa",
      "--gcp_service_account", "trainer@gmail.com"], "NAME@PROJECT.iam.gserviceaccount.com"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--service_account", "Bad_KSA"],
     "--service_account='Bad_KSA'"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "tfjobs"], "--api='tfjobs': use one of"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--kueue_queue", "a b"], "--kueue_queue='a b'"),
    # Flags of one API are errors with another, not silently dropped.
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "jobset", "--chief"],
     "worker 0 is the chief: drop --chief"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "jobset", "--gang_scheduling"],
     "use --kueue_queue=QUEUE"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "trainjob", "--backoff_limit", "5"],
     "--backoff_limit is a TFJob's runPolicy.backoffLimit"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "jobset", "--max_job_restarts", "0"],
     "failurePolicy.maxRestarts, which has no 'unlimited'"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--runtime_name", "tf"],
     "--runtime_name and --nocluster_runtime belong to --api=trainjob"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "jobset", "--nocluster_runtime"],
     "belong to --api=trainjob"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "trainjob", "--evaluator"],
     "Use --api=jobset --evaluator"),
    (["--image", IMAGE, "--model_dir", MODEL_DIR, "--api", "trainjob", "--runtime_name", "TF"],
     "--runtime_name='TF'"),
])
def test_bad_flags_fail_with_a_clear_message(args, message):
  result = run_k8s(*args)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
  assert result.stdout == ""


# ---- The side-car evaluator: an Evaluator replica ----

def test_evaluator_is_one_more_replica_that_may_outlive_the_workers():
  job = render("--evaluator", "--gang_scheduling", "--", "--epochs=2")
  assert list(replicas(job)) == ["Worker", "Evaluator"]
  evaluator = replicas(job)["Evaluator"]
  assert evaluator["replicas"] == 1 and evaluator["restartPolicy"] == "ExitCode"
  # The operator finds the container and its port by name in every replica, this one too.
  assert container(evaluator) == container(replicas(job)["Worker"])
  policy = job["spec"]["runPolicy"]
  # The job succeeds with worker 0; Running would then delete the evaluator mid-evaluation.
  assert policy["cleanPodPolicy"] == "None"
  assert render()["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
  # Training needs the workers only: the evaluator is not part of the gang.
  assert policy["schedulingPolicy"] == {"minAvailable": 3}


def test_the_trainer_reads_the_tf_config_the_operator_writes_for_the_evaluator():
  """genClusterSpec (training-operator release-1.9, pkg/controller.v1/tensorflow/tensorflow.go)
  lists every replica type, lowercased, as <job>-<type>-<i>.<namespace>.svc:<port>, in every
  pod's TF_CONFIG; the task type is the lowercased replica type."""
  from trainer.runtime import cluster
  job = render("--evaluator", "--namespace", "ml")
  name, port = job["metadata"]["name"], k8s.PORT
  spec = {rtype.lower(): [f"{name}-{rtype.lower()}-{i}.ml.svc:{port}"
                          for i in range(replica["replicas"])]
          for rtype, replica in replicas(job).items()}
  def tf_config(task_type):
    return {"TF_CONFIG": json.dumps({"cluster": spec, "task": {"type": task_type, "index": 0},
                                     "environment": "cloud"})}
  evaluator = cluster.parse_cluster(tf_config("evaluator"))
  assert evaluator.is_evaluator and evaluator.num_workers == 3
  worker = cluster.parse_cluster(tf_config("worker"))
  assert worker.is_chief and worker.num_workers == 3
  assert "evaluator" not in json.loads(worker.tf_config)["cluster"]

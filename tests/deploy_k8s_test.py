"""Kubeflow TFJob manifest and NetworkPolicy: structure, restart policy vs exit codes, security."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from deploy import k8s
from trainer import errors

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGE = "us-docker.pkg.dev/proj/repo/mnist-trainer:1"
MODEL_DIR = "gs://out-bucket/runs/k8s-1"


def run_k8s(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "deploy.k8s", *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


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
  assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
  assert c["args"] == [f"--model_dir={MODEL_DIR}", "--strategy=multi_worker_mirrored",
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
    # ExitCode retries 128-255 and fails the job on 1-127.
    assert replica["restartPolicy"] == "ExitCode"
  assert 128 <= errors.EXIT_RETRYABLE <= 255
  assert all(1 <= code <= 127 for code in errors.PERMANENT_EXIT_CODES)
  backoff = job["spec"]["runPolicy"]["backoffLimit"]
  assert 0 < backoff <= k8s.MAX_BACKOFF_LIMIT


def test_grace_period_outlasts_the_trainers_preemption_deadline():
  default = pod_spec(replicas(render())["Worker"])["terminationGracePeriodSeconds"]
  assert default > k8s.trainer_args.trainer_default("preemption_grace_s")
  longer = render("--", "--preemption_grace_s", "90")
  assert pod_spec(replicas(longer)["Worker"])["terminationGracePeriodSeconds"] > 90


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
])
def test_bad_flags_fail_with_a_clear_message(args, message):
  result = run_k8s(*args)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
  assert result.stdout == ""

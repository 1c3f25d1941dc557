"""A rendered JobSet's 2 workers and evaluator, run as its pods would run, and trained.

No Kubernetes here, so the test plays the cluster's part for the three pods of
`python -m deploy.k8s --api=jobset --workers=2 --evaluator`:
- each pod is a network namespace this test creates (and deletes), with its own address on a
  bridge in one more namespace of its own, and its own host name (a UTS namespace): so every
  trainer listens on the same port, 2222, as pods do; addresses exist only inside them;
- the JobSet's headless-Service DNS is an /etc/hosts of the pods' names `<jobset>-<replicated
  job>-0-<index>.<jobset>` (`ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts);
- each process gets exactly the environment its pod's container would (tests/k8s_validation.py
  pod_environment: the rendered env list with the downward-API values JobSet's labels give,
  JOB_COMPLETION_INDEX, HOSTNAME) on top of the image's (deploy/Dockerfile: PYTHONUNBUFFERED;
  PATH and PYTHONPATH stand in for the installed package), and the rendered arguments, with
  --model_dir pointed at a local directory that stands in for the bucket.
Nobody writes TF_CONFIG: each trainer builds it from that environment (trainer/runtime/indexed_pod.py).
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import k8s_validation
from conftest import ROOT, tiny_flags
from deploy import k8s

pytestmark = pytest.mark.slow

# A private /24 that exists only inside the namespaces below (never on this machine's network).
SUBNET = "10.231.77"
NAME = "tfjs"


@contextlib.contextmanager
def pod_network(hostnames):
  """One network namespace per pod on a bridge; yields [(namespace, address)]; removes all."""
  prefix = f"k8spod{os.getpid()}-"
  switch = prefix + "sw"
  created, etc_dirs = [], []

  def ip(*args):
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode:
      raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

  try:
    try:
      ip("netns", "add", switch)
    except (RuntimeError, OSError) as e:
      pytest.skip(f"cannot create a network namespace here (needs root and iproute2): {e}")
    created.append(switch)
    ip("-n", switch, "link", "add", "br0", "type", "bridge")
    ip("-n", switch, "link", "set", "br0", "up")
    pods = []
    for i, _ in enumerate(hostnames):
      ns, address = f"{prefix}{i}", f"{SUBNET}.{10 + i}"
      ip("netns", "add", ns)
      created.append(ns)
      ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns",
         switch)
      ip("-n", switch, "link", "set", f"p{i}", "master", "br0")
      ip("-n", switch, "link", "set", f"p{i}", "up")
      ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
      ip("-n", ns, "link", "set", "eth0", "up")
      ip("-n", ns, "link", "set", "lo", "up")
      pods.append((ns, address))
    hosts = "127.0.0.1 localhost\n" + "".join(
        f"{address} {name} {name.split('.')[0]}\n" for (_, address), name in zip(pods, hostnames))
    for ns, _ in pods:
      etc = pathlib.Path("/etc/netns") / ns
      etc.mkdir(parents=True)
      etc_dirs.append(etc)
      (etc / "hosts").write_text(hosts)
    yield pods
  finally:
    for ns in reversed(created):
      subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    for etc in etc_dirs:
      shutil.rmtree(etc, ignore_errors=True)


def start_pod(namespace, env, args, log_path):
  """The trainer in the pod's network namespace, with the pod's host name, env and args."""
  command = ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c",
             'hostname "$0" && exec "$@"', env["HOSTNAME"], sys.executable, "-m", "trainer.task",
             *args]
  log = open(log_path, "w")
  proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  return proc, log


def test_a_jobset_with_two_workers_and_an_evaluator_trains_as_its_pods(tmp_path, tfds_dir):
  model_dir = tmp_path / "bucket" / "run"
  steps = 30
  trainer_args = tuple(a for a in tiny_flags("unused", tfds_dir, train_steps=steps,
                                             collective_timeout_s=120, evaluator_timeout_s=300,
                                             export=False)
                       if not a.startswith("--model_dir="))
  jobset = k8s.jobset(k8s.Options(api="jobset", name=NAME, workers=2, evaluator=True,
                                  image="mnist-trainer:test", model_dir="gs://bucket/run",
                                  gpus_per_worker=0, trainer_args=trainer_args))
  assert k8s_validation.validation_errors(jobset) == []
  pods = [("worker", 0), ("worker", 1), ("evaluator", 0)]
  envs = [k8s_validation.pod_environment(jobset, rjob, index) for rjob, index in pods]
  image_env = {"PATH": os.environ["PATH"], "PYTHONPATH": ROOT, "HOME": str(tmp_path),
               "PYTHONUNBUFFERED": "1"}
  hostnames = [f"{env['HOSTNAME']}.{NAME}" for env in envs]  # the headless Service's names
  procs, logs = [], []
  with pod_network(hostnames) as network:
    try:
      for (rjob, index), env, (ns, _) in zip(pods, envs, network):
        replicated = {r["name"]: r for r in jobset["spec"]["replicatedJobs"]}[rjob]
        [container] = replicated["template"]["spec"]["template"]["spec"]["containers"]
        args = [f"--model_dir={model_dir}" if a.startswith("--model_dir=") else a
                for a in container["args"]]
        proc, log = start_pod(ns, {**image_env, **env}, args, tmp_path / f"{rjob}-{index}.log")
        procs.append(proc)
        logs.append(log)
      deadline = time.monotonic() + 500
      for proc in procs:
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
      for proc in procs:
        if proc.poll() is None:
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
      for log in logs:
        log.close()
  outputs = [(tmp_path / f"{rjob}-{index}.log").read_text() for rjob, index in pods]
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-4000:]
  # Each trainer built the cluster from its pod's environment, by the pods' host names.
  workers = [f"{NAME}-worker-0-{i}.{NAME}:2222" for i in range(2)]
  for out, (rjob, index) in zip(outputs, pods):
    [built] = re.findall(r"TF_CONFIG built from the JobSet pod's environment: (.*)$", out, re.M)
    assert json.loads(built) == {
        "cluster": {"worker": workers, "evaluator": [f"{NAME}-evaluator-0-0.{NAME}:2222"]},
        "task": {"type": rjob, "index": index}}
  assert "this task is worker:1." in outputs[1]
  assert "Strategy multi_worker_mirrored with 2 replica(s)" in outputs[0]
  weights = [re.findall(rf"Final step {steps} weights_sha256 (\w+)", out) for out in outputs[:2]]
  assert weights[0] and weights[0] == weights[1], "both workers finished with equal weights"
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert (metrics["num_workers"], metrics["global_step"]) == (2, steps)
  assert metrics["weights_sha256"] == weights[0][0]
  assert re.search(rf"Evaluated the final checkpoint \(step {steps}\)", outputs[2]), (
      outputs[2][-3000:])
  history = json.loads((model_dir / "eval_metrics.json").read_text())["history"]
  assert history[-1]["step"] == steps
  assert history[-1]["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
  # The namespaces and their hosts files are gone.
  left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
  assert f"k8spod{os.getpid()}-" not in left

"""Table tests for trainer.runtime.cluster: every TF_CONFIG / CLUSTER_SPEC / JobSet-pod layout we accept
or reject, and real runs of the layouts TensorFlow itself would have refused or we did."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, run_module, run_without_tf, tiny_flags
from trainer.runtime import cluster
from trainer import errors
from trainer.runtime import indexed_pod
from trainer import launcher

W2 = ["localhost:1001", "localhost:1002"]


def env(cfg):
  return {"TF_CONFIG": json.dumps(cfg)}


@pytest.mark.parametrize("environ, task, is_chief, num_workers", [
    ({}, "worker:0", True, 0),
    ({"TF_CONFIG": ""}, "worker:0", True, 0),
    (env({"task": {"type": "worker", "index": 0}}), "worker:0", True, 0),
    (env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 0}}),
     "worker:0", True, 2),
    (env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 1}}),
     "worker:1", False, 2),
    (env({"cluster": {"chief": ["h:1"], "worker": W2}, "task": {"type": "chief", "index": 0}}),
     "chief:0", True, 3),
    (env({"cluster": {"chief": ["h:1"], "worker": W2}, "task": {"type": "worker", "index": 0}}),
     "worker:0", False, 3),
    # The legacy "master" is the chief (TF 2.21 refuses the name itself).
    (env({"cluster": {"master": ["h:1"], "worker": W2}, "task": {"type": "master", "index": 0}}),
     "chief:0", True, 3),
    (env({"cluster": {"master": ["h:1"], "worker": W2}, "task": {"type": "worker", "index": 1}}),
     "worker:1", False, 3),
    (env({"cluster": {"chief": ["h:1"], "worker": W2, "evaluator": ["h:9"]},
          "task": {"type": "worker", "index": 1}}), "worker:1", False, 3),
    ({"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["h:1"], "workerpool1": W2},
                                  "task": {"type": "workerpool0", "index": 0}})},
     "chief:0", True, 3),
    ({"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["h:1"], "workerpool1": W2},
                                  "task": {"type": "workerpool1", "index": 1}})},
     "worker:1", False, 3),
])
def test_accepted_layouts(environ, task, is_chief, num_workers):
  info = cluster.parse_cluster(environ)
  assert info.task_name == task
  assert info.is_chief == is_chief
  assert info.num_workers == num_workers


@pytest.mark.parametrize("environ", [
    # As the Kubeflow training operator writes it: the evaluator is in every task's cluster.
    env({"cluster": {"chief": ["c:1"], "worker": W2, "evaluator": ["e:1"]},
         "task": {"type": "evaluator", "index": 0}}),
    # As AI Platform writes it: the cluster "never contains evaluator as a key".
    env({"cluster": {"chief": ["c:1"], "worker": W2}, "task": {"type": "evaluator", "index": 0}}),
    # Vertex AI's CLUSTER_SPEC: worker pool 3.
    {"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["c:1"], "workerpool1": W2,
                                             "workerpool3": ["e:1"]},
                                 "task": {"type": "workerpool3", "index": 0}})},
    # A lone evaluator (e.g. its own Slurm job) needs no addresses.
    env({"task": {"type": "evaluator", "index": 0}}),
])
def test_an_evaluator_is_accepted_and_is_no_training_task(environ):
  info = cluster.parse_cluster(environ)
  assert info.is_evaluator and info.task_name == "evaluator:0"
  assert not info.is_chief
  if info.cluster:
    assert info.num_workers == 3 and info.chief_task == ("chief", 0)
    assert [name for name, _ in info.peers()] == ["chief:0", "worker:0", "worker:1"]
    cluster.check_strategy("multi_worker_mirrored", info)  # the workers' flags fit it too


def test_training_tasks_leave_the_evaluator_out_of_their_collectives():
  info = cluster.parse_cluster(env({"cluster": {"worker": W2, "evaluator": ["e:1"]},
                                    "task": {"type": "worker", "index": 1}}))
  assert not info.is_evaluator and info.num_workers == 2
  assert info.peers() == [("worker:0", "localhost:1001")]
  # What TensorFlow's MultiWorkerMirroredStrategy reads (trainer/runtime/distribute.py).
  assert json.loads(info.tf_config) == {"cluster": {"worker": W2},
                                        "task": {"type": "worker", "index": 1}}
  spec = cluster.parse_cluster({"CLUSTER_SPEC": json.dumps({
      "cluster": {"workerpool0": ["c:1"], "workerpool1": W2, "workerpool3": ["e:1"]},
      "task": {"type": "workerpool0", "index": 0}})})
  assert spec.is_chief and "evaluator" not in json.loads(spec.tf_config)["cluster"]


def test_tf_config_wins_over_cluster_spec_and_is_normalized():
  info = cluster.parse_cluster({
      "TF_CONFIG": json.dumps({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 1}}),
      "CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["x:1"]},
                                  "task": {"type": "workerpool0", "index": 0}})})
  assert info.task_name == "worker:1"
  assert json.loads(info.tf_config)["cluster"] == {"worker": W2}


def test_cluster_spec_becomes_tf_config():
  info = cluster.parse_cluster({"CLUSTER_SPEC": json.dumps(
      {"cluster": {"workerpool0": ["c:1"], "workerpool1": W2}, "environment": "cloud",
       "task": {"type": "workerpool1", "index": 0, "trial": ""}})})
  assert json.loads(info.tf_config) == {"cluster": {"chief": ["c:1"], "worker": W2},
                                        "task": {"type": "worker", "index": 0}}


def test_peers_excludes_self():
  info = cluster.parse_cluster(env({"cluster": {"chief": ["c:1"], "worker": W2},
                                    "task": {"type": "worker", "index": 0}}))
  assert info.peers() == [("chief:0", "c:1"), ("worker:1", "localhost:1002")]


@pytest.mark.parametrize("environ, message", [
    ({"TF_CONFIG": "{not json"}, r"\$TF_CONFIG is not valid JSON"),
    ({"TF_CONFIG": "[1, 2]"}, "must be a JSON object"),
    (env({"cluster": {"worker": W2}}), "no 'task'"),
    (env({"cluster": {"worker": W2}, "task": {"type": "chief", "index": 0}}),
     "'chief' is not in the cluster"),
    (env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 2}}),
     "index 2 is out of range"),
    (env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": -1}}),
     "out of range"),
    (env({"cluster": {"worker": W2, "evaluator": ["e:1", "e:2"]},
          "task": {"type": "evaluator", "index": 0}}), "lists 2 evaluators: use one"),
    (env({"cluster": {"worker": W2, "evaluator": ["e:1"]},
          "task": {"type": "evaluator", "index": 1}}), "evaluator index 1 is out of range"),
    (env({"cluster": {"worker": W2}, "task": {"type": "evaluator", "index": True}}),
     "task index True must be a JSON integer"),
    (env({"cluster": {"worker": W2, "ps": ["p:1"]}, "task": {"type": "worker", "index": 0}}),
     "parameter servers"),
    (env({"cluster": {"worker": "h:1"}, "task": {"type": "worker", "index": 0}}),
     "list of 'host:port'"),
    (env({"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}),
     "at most one chief"),
    (env({"cluster": {"gpu_box": ["a:1"]}, "task": {"type": "gpu_box", "index": 0}}),
     "unknown task type"),
    ({"CLUSTER_SPEC": "nope"}, r"\$CLUSTER_SPEC is not valid JSON"),
    ({"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool9": ["a:1"]},
                                  "task": {"type": "workerpool9", "index": 0}})},
     "unknown worker pool"),
    # Ports and hosts: a clear message naming the task, not a ValueError from int().
    (env({"cluster": {"worker": ["localhost:notaport", "localhost:1002"]},
          "task": {"type": "worker", "index": 1}}),
     r"worker:0 has address 'localhost:notaport' whose port 'notaport' is not a number"),
    (env({"cluster": {"worker": ["localhost:0", "localhost:1002"]},
          "task": {"type": "worker", "index": 1}}), "port '0' is not a number in 1..65535"),
    (env({"cluster": {"worker": ["localhost:65536"]}, "task": {"type": "worker", "index": 0}}),
     "port '65536' is not a number in 1..65535"),
    (env({"cluster": {"worker": ["localhost:+1"]}, "task": {"type": "worker", "index": 0}}),
     "port '\\+1' is not a number"),
    (env({"cluster": {"worker": [":1001", "h:1002"]}, "task": {"type": "worker", "index": 1}}),
     "worker:0 has address ':1001' with an empty host"),
    (env({"cluster": {"worker": ["h:1", 7]}, "task": {"type": "worker", "index": 0}}),
     "worker:1 has address 7, not 'host:port'"),
    # This task is a worker, but the evaluator's address is checked like every other.
    (env({"cluster": {"worker": W2, "evaluator": ["e:x"]}, "task": {"type": "worker", "index": 0}}),
     "evaluator:0 has address 'e:x'"),
    # Indexes: JSON true is a Python int, "1" a string; neither names a task.
    (env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": True}}),
     "task index True must be a JSON integer"),
    (env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": "1"}}),
     "task index '1' must be a JSON integer"),
    (env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 1.0}}),
     "must be a JSON integer"),
    (env({"cluster": {"worker": W2}, "task": {"type": ["worker"], "index": 0}}),
     "task type \\['worker'\\] is not in the cluster"),
    ({"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["c:1"]},
                                  "task": {"type": ["workerpool0"], "index": 0}})},
     r"\$CLUSTER_SPEC: task type"),
    ({"CLUSTER_SPEC": json.dumps({"cluster": ["c:1"], "task": {"type": "workerpool0"}})},
     r"\$CLUSTER_SPEC: 'cluster' must map worker pools"),
])
def test_rejected_layouts(environ, message):
  with pytest.raises(errors.ConfigError, match=message):
    cluster.parse_cluster(environ)


def test_master_becomes_chief_in_the_tf_config_tensorflow_reads():
  """TF 2.21's multi_worker_util._validate_cluster_spec allows only chief, worker, evaluator and
  ps: a "master" reached MultiWorkerMirroredStrategy and failed there with exit 1."""
  cluster_def = {"master": ["m:1"], "worker": W2, "evaluator": ["e:1"]}
  for task, expected in [("master", "chief"), ("worker", "worker")]:
    info = cluster.parse_cluster(env({"cluster": cluster_def, "task": {"type": task, "index": 0}}))
    assert json.loads(info.tf_config) == {"cluster": {"chief": ["m:1"], "worker": W2},
                                          "task": {"type": expected, "index": 0}}
    assert info.chief_task == ("chief", 0) and "master" not in info.cluster
  evaluator = cluster.parse_cluster(env({"cluster": cluster_def,
                                         "task": {"type": "evaluator", "index": 0}}))
  assert [name for name, _ in evaluator.peers()] == ["chief:0", "worker:0", "worker:1"]


@pytest.mark.parametrize("requested, environ, message", [
    ("multi_worker_mirrored", {}, "needs TF_CONFIG .or CLUSTER_SPEC. listing the workers, and "
     "neither is set"),
    ("one_device", env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 0}}),
     "describes 2 workers"),
    ("mirrored", env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 1}}),
     "describes 2 workers"),
])
def test_strategy_that_does_not_fit_the_cluster(requested, environ, message):
  with pytest.raises(errors.ConfigError, match=message):
    cluster.check_strategy(requested, cluster.parse_cluster(environ))


def test_cpu_devices_do_not_fit_a_multi_worker_job():
  two = cluster.parse_cluster(env({"cluster": {"worker": W2}, "task": {"type": "worker",
                                                                      "index": 0}}))
  for requested in ("auto", "multi_worker_mirrored"):
    with pytest.raises(errors.ConfigError, match="--num_cpu_devices=2 but TF_CONFIG describes 2"):
      cluster.check_strategy(requested, two, num_cpu_devices=2)
  cluster.check_strategy("auto", two, num_cpu_devices=1)  # one device per worker is what it is
  cluster.check_strategy("auto", cluster.parse_cluster({}), num_cpu_devices=2)


@pytest.mark.parametrize("requested, environ", [
    ("auto", {}), ("one_device", {}), ("mirrored", {}),
    ("auto", env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 0}})),
    ("multi_worker_mirrored",
     env({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 0}})),
    # One worker listed: TF 2.21 runs MultiWorkerMirroredStrategy with it (a real run below);
    # a one-node Slurm job is this.
    ("multi_worker_mirrored",
     env({"cluster": {"worker": ["node9:8888"]}, "task": {"type": "worker", "index": 0}})),
    ("multi_worker_mirrored",
     env({"cluster": {"chief": ["h:1"]}, "task": {"type": "chief", "index": 0}})),
    # The evaluator takes the workers' flags and uses no strategy, with or without addresses.
    ("multi_worker_mirrored", env({"task": {"type": "evaluator", "index": 0}})),
    ("one_device", env({"cluster": {"worker": W2, "evaluator": ["e:1"]},
                        "task": {"type": "evaluator", "index": 0}})),
])
def test_strategy_that_fits_the_cluster(requested, environ):
  cluster.check_strategy(requested, cluster.parse_cluster(environ))


@pytest.mark.parametrize("cluster_def, first, second", [
    ({"worker": ["localhost:1001", "localhost:1001"]}, "worker:0", "worker:1"),
    ({"chief": ["h:1"], "worker": ["h:1", "h:2"]}, "chief:0", "worker:0"),
    # Loopback by another name is the same port; hosts compare case-insensitively.
    ({"worker": ["localhost:1001", "127.0.0.1:1001"]}, "worker:0", "worker:1"),
    ({"worker": ["[::1]:1001", "LOCALHOST:1001"]}, "worker:0", "worker:1"),
    ({"worker": ["Host-A:5", "h:6"], "evaluator": ["host-a:5"]}, "worker:0", "evaluator:0"),
])
def test_duplicate_addresses_are_rejected(cluster_def, first, second):
  # Start-up hung on these: the task's own port answered the rendezvous for its twin.
  for name, environ in [
      ("TF_CONFIG", env({"cluster": cluster_def, "task": {"type": "worker", "index": 1}})),
      ("CLUSTER_SPEC", {"CLUSTER_SPEC": json.dumps({
          "cluster": {pool: cluster_def[t] for pool, t in
                      [("workerpool0", "chief"), ("workerpool1", "worker"),
                       ("workerpool3", "evaluator")] if t in cluster_def},
          "task": {"type": "workerpool1", "index": 1}})})]:
    with pytest.raises(errors.ConfigError) as raised:
      cluster.parse_cluster(environ)
    message = str(raised.value)
    assert f"${name} gives {first} (" in message and f"and {second} (" in message, message
    assert "same host:port" in message


def test_distinct_ports_on_one_host_are_accepted():
  info = cluster.parse_cluster(env({"cluster": {"chief": ["localhost:1000"], "worker": W2,
                                                "evaluator": ["127.0.0.1:1003"]},
                                    "task": {"type": "worker", "index": 1}}))
  assert info.task_name == "worker:1" and info.num_workers == 3


@pytest.mark.parametrize("tf_config, message", [
    ({"cluster": {"worker": ["localhost:notaport", "localhost:2"]},
      "task": {"type": "worker", "index": 0}}, "port 'notaport' is not a number"),
    ({"cluster": {"worker": ["localhost:1", "127.0.0.1:1"]},
      "task": {"type": "worker", "index": 0}}, "the same host:port"),
    ({"cluster": {"worker": W2}, "task": {"type": "worker", "index": True}},
     "must be a JSON integer"),
])
def test_bad_tf_config_exits_2_before_tensorflow_loads(tmp_path, tf_config, message):
  result = run_without_tf("trainer.task", *tiny_flags(str(tmp_path / "run"),
                                                      str(tmp_path / "tfds")),
                          TF_CONFIG=json.dumps(tf_config))
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert "FATAL ConfigError: $TF_CONFIG" in result.stdout and message in result.stdout
  assert "Traceback" not in result.stdout


def test_an_evaluator_without_a_checkpoint_dir_exits_2_before_tensorflow_loads(tmp_path):
  flags = [a for a in tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds"))
           if not a.startswith("--model_dir")]
  result = run_without_tf("trainer.task", *flags,
                          TF_CONFIG=json.dumps({"cluster": {"worker": W2, "evaluator": ["e:1"]},
                                                "task": {"type": "evaluator", "index": 0}}))
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert "FATAL ConfigError: TF_CONFIG makes this process the evaluator" in result.stdout
  assert "pass the training job's --model_dir (or --checkpoint_dir)" in result.stdout
  assert "Traceback" not in result.stdout


# ---- A JobSet pod's environment (trainer/runtime/indexed_pod.py) ----

def pod(rjob="worker", index=0, workers=2, evaluator="evaluator", **extra):
  environ = {"JOB_COMPLETION_INDEX": str(index), "JOBSET_NAME": "js",
             "JOBSET_REPLICATED_JOB": rjob, "JOBSET_JOB_INDEX": "0",
             "TRAINER_WORKERS": str(workers), "TRAINER_WORKER_JOB": "worker",
             "TRAINER_PORT": "2222"}
  if evaluator:
    environ["TRAINER_EVALUATOR_JOB"] = evaluator
  environ.update(extra)
  return {k: v for k, v in environ.items() if v is not None}


def test_a_jobset_pod_builds_its_tf_config():
  workers = ["js-worker-0-0.js:2222", "js-worker-0-1.js:2222", "js-worker-0-2.js:2222"]
  assert indexed_pod.tf_config(pod(index=2, workers=3)) == {
      "cluster": {"worker": workers, "evaluator": ["js-evaluator-0-0.js:2222"]},
      "task": {"type": "worker", "index": 2}}
  info = cluster.parse_cluster(pod(index=1, workers=3))
  assert info.task_name == "worker:1" and info.num_workers == 3 and not info.is_chief
  assert json.loads(info.tf_config)["cluster"] == {"worker": workers}
  evaluator = cluster.parse_cluster(pod(rjob="evaluator", workers=3))
  assert evaluator.is_evaluator and evaluator.num_workers == 3
  alone = cluster.parse_cluster(pod(evaluator=""))
  assert "evaluator" not in alone.cluster and alone.is_chief


def test_tf_config_and_cluster_spec_win_over_the_pod_environment():
  given = {"cluster": {"worker": W2}, "task": {"type": "worker", "index": 1}}
  assert cluster.parse_cluster({**pod(), **env(given)}).task_name == "worker:1"
  assert list(cluster.parse_cluster({**pod(), **env(given)}).cluster["worker"]) == W2
  # An Indexed Job that is not ours (no TRAINER_WORKERS) is a single process.
  assert cluster.parse_cluster({"JOB_COMPLETION_INDEX": "3"}) == cluster.ClusterInfo()


@pytest.mark.parametrize("environ, message", [
    (pod(JOB_COMPLETION_INDEX=None), "JOB_COMPLETION_INDEX is not set"),
    (pod(JOBSET_NAME=""), "JOBSET_NAME is not set"),
    (pod(TRAINER_WORKER_JOB=None), "TRAINER_WORKER_JOB is not set"),
    (pod(TRAINER_WORKERS="two"), "TRAINER_WORKERS='two' must be a whole number >= 1"),
    (pod(TRAINER_WORKERS="0"), "TRAINER_WORKERS='0' must be a whole number >= 1"),
    (pod(TRAINER_PORT="70000"), "TRAINER_PORT=70000 is not a TCP port"),
    (pod(JOB_COMPLETION_INDEX="-1"), "JOB_COMPLETION_INDEX='-1' must be a whole number >= 0"),
    (pod(index=2, workers=2), "JOB_COMPLETION_INDEX=2 but TRAINER_WORKERS=2"),
    (pod(JOBSET_JOB_INDEX="1"), "must have one replica"),
    (pod(rjob="evaluator", index=1), "a job has one evaluator pod"),
    (pod(rjob="launcher"), "JOBSET_REPLICATED_JOB='launcher' is neither"),
    (pod(evaluator="worker"), "the evaluator needs a replicated job of its own"),
])
def test_a_broken_pod_environment_names_the_variable(environ, message):
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    cluster.parse_cluster(environ)


def test_a_broken_pod_environment_exits_2_before_tensorflow_loads(tmp_path):
  result = run_without_tf("trainer.task", *tiny_flags(str(tmp_path / "run"), str(tmp_path)),
                          **pod(JOB_COMPLETION_INDEX="5"))
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert "FATAL ConfigError: JOB_COMPLETION_INDEX=5 but TRAINER_WORKERS=2" in result.stdout
  assert "Traceback" not in result.stdout


# ---- Real runs (slow): layouts TensorFlow 2.21 refused, or we did ----

@pytest.mark.slow
def test_a_one_worker_tf_config_trains_with_multi_worker_mirrored(tmp_path, tfds_dir):
  """What a one-node Slurm job starts: exit 2 ("needs TF_CONFIG") before; TF runs it."""
  [port] = launcher.free_ports(1)
  result = run_module("trainer.task", *tiny_flags(str(tmp_path / "run"), tfds_dir),
                      "--strategy=multi_worker_mirrored", env=child_env(TF_CONFIG=json.dumps(
                          {"cluster": {"worker": [f"localhost:{port}"]},
                           "task": {"type": "worker", "index": 0}})))
  assert result.returncode == 0, result.stdout[-3000:]
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert (metrics["strategy"], metrics["num_workers"], metrics["global_step"]) == (
      "multi_worker_mirrored", 1, 20)


@pytest.mark.slow
def test_a_master_and_a_worker_train_together(tmp_path, tfds_dir):
  """A TF_CONFIG with a "master" task: exit 1 inside TensorFlow before, trains now."""
  ports = launcher.free_ports(2)
  cluster_def = {"master": [f"localhost:{ports[0]}"], "worker": [f"localhost:{ports[1]}"]}
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, collective_timeout_s=120)
  procs = []
  for task in ("master", "worker"):
    environ = child_env(TF_CONFIG=json.dumps({"cluster": cluster_def,
                                              "task": {"type": task, "index": 0}}),
                        TF_NUM_INTRAOP_THREADS=1, OMP_NUM_THREADS=1)
    procs.append(subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=environ,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  weights = [re.findall(r"Final step 20 weights_sha256 (\w+)", out) for out in outputs]
  assert weights[0] and weights[0] == weights[1], "identical weights on both tasks"
  assert "this task is chief:0 (chief)" in outputs[0]
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["num_workers"] == 2 and metrics["weights_sha256"] == weights[0][0]

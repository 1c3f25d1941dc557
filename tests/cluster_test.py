"""Table tests for trainer.cluster: every TF_CONFIG / CLUSTER_SPEC layout we accept or reject."""

import json

import pytest

from conftest import run_without_tf, tiny_flags
from trainer import cluster
from trainer import errors

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
    (env({"cluster": {"master": ["h:1"], "worker": W2}, "task": {"type": "master", "index": 0}}),
     "master:0", True, 3),
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
  # What TensorFlow's MultiWorkerMirroredStrategy reads (trainer/distribute.py).
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


@pytest.mark.parametrize("requested, environ, message", [
    ("multi_worker_mirrored", {}, "needs TF_CONFIG"),
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

"""Table tests for trainer.cluster: every TF_CONFIG / CLUSTER_SPEC layout we accept or reject."""

import json

import pytest

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
    (env({"cluster": {"worker": W2, "evaluator": ["e:1"]},
          "task": {"type": "evaluator", "index": 0}}), "evaluator"),
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

"""Tests for trainer.runtime.cores: the cores a process may use, from affinity, cgroup files and env."""

import os

import pytest

from trainer.runtime import cores
from trainer import launcher


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs of quota: 2 cores can be busy
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, unlimited
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),  # no cgroup files at all
])
def test_cgroup_quota(tmp_path, files, expected):
  for name, text in files.items():
    _write(str(tmp_path / name), text)
  assert cores.cgroup_quota(str(tmp_path)) == expected


def test_quota_caps_the_cores(tmp_path):
  _write(str(tmp_path / "cpu.max"), "100000 100000\n")
  assert cores.available({}, cgroup_root=str(tmp_path)) == 1
  unlimited = tmp_path / "none"
  unlimited.mkdir()
  assert cores.available({}, cgroup_root=str(unlimited)) == len(os.sched_getaffinity(0))


def test_the_launchers_share_caps_the_cores():
  machine = cores.available({})
  assert 1 <= machine <= len(os.sched_getaffinity(0))
  assert cores.available({"TF_NUM_INTRAOP_THREADS": "1"}) == 1
  # A share larger than the machine, or junk, does not add cores.
  assert cores.available({"TF_NUM_INTRAOP_THREADS": "512"}) == machine
  assert cores.available({"TF_NUM_INTRAOP_THREADS": "x"}) == machine


def test_launcher_divides_the_usable_cores_not_the_hosts():
  assert launcher.default_threads(1, {"TF_NUM_INTRAOP_THREADS": "1"}) == 1
  assert launcher.default_threads(2, {"TF_NUM_INTRAOP_THREADS": "1"}) == 1  # never 0
  assert launcher.default_threads(1, {}) == cores.available({})

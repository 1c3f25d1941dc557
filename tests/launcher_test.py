"""The local launcher's process handling, with real child processes (no TensorFlow)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from trainer import launcher

_STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker stuck where SIGTERM cannot help
open(os.path.join(sys.argv[1], f"ready-{os.getpid()}"), "w").close()
time.sleep(600)
"""

_POLITE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
open(os.path.join(sys.argv[1], f"ready-{os.getpid()}"), "w").close()
time.sleep(600)
"""


def _cluster(tmp_path, source):
  (tmp_path / "child.py").write_text(source)
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  cluster = launcher.Cluster(2, [str(tmp_path)], env=env, module="child")
  deadline = time.monotonic() + 60
  # Each child marks itself ready once its SIGTERM handler is installed.
  while len(list(tmp_path.glob("ready-*"))) < 2:
    assert time.monotonic() < deadline, "children never started"
    time.sleep(0.05)
  return cluster


def test_workers_that_ignore_sigterm_are_killed_after_the_grace(tmp_path):
  cluster = _cluster(tmp_path, _STUBBORN)
  start = time.monotonic()
  cluster.stop(grace_s=2.0)
  codes = cluster.wait()
  elapsed = time.monotonic() - start
  assert codes == [-signal.SIGKILL, -signal.SIGKILL]
  assert launcher.exit_code(codes) == 128 + signal.SIGKILL
  assert 2.0 <= elapsed < 30, elapsed


def test_workers_that_exit_on_sigterm_are_not_held_for_the_grace(tmp_path):
  cluster = _cluster(tmp_path, _POLITE)
  start = time.monotonic()
  cluster.stop(grace_s=300.0)
  codes = cluster.wait()
  assert codes == [143, 143] and launcher.exit_code(codes) == 143
  assert time.monotonic() - start < 60, "wait() must return once the workers are gone"


# Worker 1 fails with exit 3 once told to; worker 0 ignores SIGTERM and will be SIGSTOPped, the
# way a hung peer looks to the launcher.
_ONE_FAILS = """
import json, os, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
if index == 0:
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(sys.argv[1], f"ready-{index}-{os.getpid()}"), "w").close()
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
  if index == 1 and os.path.exists(os.path.join(sys.argv[1], "fail")):
    sys.exit(3)
  time.sleep(0.05)
"""


def _stop_worker0_then_fail_worker1(tmp_path, pids):
  os.kill(pids[0], signal.SIGSTOP)
  (tmp_path / "fail").write_text("")


def test_first_failure_stops_a_hung_worker_and_sets_the_exit_code(tmp_path, capsys):
  cluster = _cluster(tmp_path, _ONE_FAILS)
  _stop_worker0_then_fail_worker1(tmp_path, [p.pid for p in cluster.procs])
  start = time.monotonic()
  codes = cluster.wait(failure_grace_s=2.0)
  elapsed = time.monotonic() - start
  assert codes == [-signal.SIGKILL, 3]
  assert cluster.failures[0] == (1, 3)
  assert launcher.exit_code([c for _, c in cluster.failures]) == 3
  # The hung worker gets SETTLE_S to stop on its own, then SIGTERM (ignored while stopped... it
  # gets SIGCONT too), then SIGKILL after the grace.
  assert launcher.SETTLE_S + 2.0 <= elapsed < launcher.SETTLE_S + 30, elapsed
  out = capsys.readouterr().out
  assert "[launcher] worker:1 failed first (exit 3); worker:0 get" in out, out
  assert "worker:0 still running" in out, out
  assert "SIGKILL to worker:0" in out, out


def test_launch_exits_with_the_first_failure_not_the_first_worker(tmp_path):
  # The whole launcher in a child process, with its own signal handlers; worker 0 ends up killed
  # (exit 137) but the launcher must report worker 1's 3, the cause.
  (tmp_path / "child.py").write_text(_ONE_FAILS)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  code = ("import os, sys; from trainer import launcher; "
          f"sys.exit(launcher.launch(2, [{str(tmp_path)!r}], 1, 2.0, module='child'))")
  proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob("ready-*"))) < 2:
    assert time.monotonic() < deadline and proc.poll() is None, "children never started"
    time.sleep(0.05)
  worker0 = int(next(tmp_path.glob("ready-0-*")).name.split("-")[2])
  _stop_worker0_then_fail_worker1(tmp_path, [worker0])
  try:
    out, _ = proc.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    os.kill(worker0, signal.SIGKILL)
    pytest.fail("the launcher kept waiting for a stopped worker after another one failed")
  assert proc.returncode == 3, out
  assert "worker:1 failed first (exit 3)" in out and "exit codes: [-9, 3]" in out, out

"""The local launcher's process handling, with real child processes (no TensorFlow)."""

import os
import signal
import time

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

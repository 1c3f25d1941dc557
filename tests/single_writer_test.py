"""One writer per checkpoint directory, with real trainer processes, real signals and real files.

The gs:// case runs against the real GCS emulator behind the fault proxy, which enforces
preconditions as GCS does; each run talks through its own proxy, so the test sees exactly which
requests each one made.
"""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, tiny_flags
from gcs_emulator import FaultProxy
from trainer.storage import lock as run_lock

pytestmark = pytest.mark.slow
BUCKET = "single-writer"
EMULATOR_BUCKETS = (BUCKET,)  # for conftest's emulator
STALE_S = 2  # the bucket lock's stale window for these runs ($TRAINER_LOCK_STALE_S)


class _Run:
  """A trainer process whose output goes to a file the test can search while it runs."""

  def __init__(self, tmp_path, name, args, env):
    self.log = tmp_path / f"{name}.log"
    with open(self.log, "w") as out:
      self.proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=env,
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

  def text(self) -> str:
    return self.log.read_text(errors="replace")

  def wait_for(self, pattern: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, self.text(), re.M):
      assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-4000:]}"
      assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s:\n{self.text()[-4000:]}"
      time.sleep(0.05)

  def finish(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"still running after {timeout}s:\n{self.text()[-4000:]}")

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGCONT)
      self.proc.kill()
      self.proc.wait(timeout=30)


@pytest.fixture
def runs():
  started = []
  yield started
  for run in started:
    run.kill()


def test_a_paused_bucket_owner_stops_before_its_next_write(emulator, runs, tmp_path, tfds_dir):
  # Issue 33 #1: A is paused after its first checkpoint; B (the same command, another machine)
  # takes the locks over once they went stale; A, continued, must not write another object.
  uri = f"gs://{BUCKET}/paused"
  args = tiny_flags(uri, tfds_dir, train_steps=100000, checkpoint_every_steps=10,
                    log_every_steps=100, export=False)
  with FaultProxy(emulator.host) as proxy_a, FaultProxy(emulator.host) as proxy_b:
    def env(proxy, cache):
      return child_env(**proxy.env(), TRAINER_CACHE_DIR=tmp_path / cache,
                       **{run_lock.STALE_ENV: STALE_S})
    a = _Run(tmp_path, "a", args, env(proxy_a, "cache-a"))
    runs.append(a)
    a.wait_for(r"Uploaded checkpoint ckpt-\d+ to")
    a.proc.send_signal(signal.SIGSTOP)
    b = _Run(tmp_path, "b", args, env(proxy_b, "cache-b"))
    runs.append(b)
    b.wait_for(rf"Took over {re.escape(uri)}/checkpoints/\.trainer-lock")
    b.wait_for(r"Uploaded checkpoint ckpt-\d+ to")  # B publishes: it holds both locks
    continued = time.monotonic()
    a.proc.send_signal(signal.SIGCONT)
    assert a.finish(timeout=60) == 2, a.text()[-4000:]
    out = a.text()
    assert f"Took over {uri}/.trainer-lock" in b.text()
    assert re.search(rf"FATAL ConfigError: Lost the lock {re.escape(uri)}/(checkpoints/)?"
                     r"\.trainer-lock of --(model|checkpoint)_dir=.*another run took it over "
                     r"\(host \S+, pid " + str(b.proc.pid), out), out[-3000:]
    # What A's proxy forwarded after SIGCONT with a 2xx answer: at most its own staging object
    # (an upload in flight when it was paused, whose compose the bucket then refused).
    published = [(method, name) for method, name in proxy_a.writes(since=continued)
                 if ".trainer-lock.staging-" not in (name or "")]
    assert published == [], published
  b.kill()


def test_two_runs_sharing_a_checkpoint_dir_are_refused(runs, tmp_path, tfds_dir):
  # Issue 33 #2: another --model_dir, the same --checkpoint_dir.
  shared = tmp_path / "shared-checkpoints"
  a = _Run(tmp_path, "a", tiny_flags(str(tmp_path / "a"), tfds_dir, train_steps=100000,
                                     checkpoint_dir=shared, export=False), child_env())
  runs.append(a)
  a.wait_for(r"Saved checkpoint ")
  b = _Run(tmp_path, "b", tiny_flags(str(tmp_path / "b"), tfds_dir, train_steps=30,
                                     checkpoint_dir=shared, learning_rate=0.01, export=False),
           child_env())
  assert b.finish(timeout=120) == 2, b.text()[-3000:]
  assert (f"FATAL ConfigError: --checkpoint_dir={shared} is in use by another run "
          f"(host ") in b.text() and f"pid {a.proc.pid}," in b.text(), b.text()[-3000:]
  assert "Restored" not in b.text() and "Saved checkpoint" not in b.text()
  assert a.proc.poll() is None, "A goes on"
  assert not (tmp_path / "b" / run_lock.LOCK_NAME).exists(), "B released what it took"


def test_a_run_whose_lock_files_were_deleted_stops_before_its_next_checkpoint(runs, tmp_path,
                                                                              tfds_dir):
  # Issue 33 #3: A is paused right after checkpoint 100; an operator deletes the lock files;
  # B takes the dir and trains 100 -> 130 with checkpoints every 7 steps (never a multiple of
  # 100); A, continued, reaches step 200 and must stop there without writing ckpt-200.
  model_dir = tmp_path / "run"
  a = _Run(tmp_path, "a", tiny_flags(str(model_dir), tfds_dir, train_steps=100000,
                                     checkpoint_every_steps=100, log_every_steps=100,
                                     steps_per_loop=10, export=False), child_env())
  runs.append(a)
  a.wait_for(r"Saved checkpoint .*ckpt-100$")
  a.proc.send_signal(signal.SIGSTOP)
  (model_dir / run_lock.LOCK_NAME).unlink()  # "cleaning up", as the operator did
  (model_dir / "checkpoints" / run_lock.LOCK_NAME).unlink(missing_ok=True)
  b = _Run(tmp_path, "b", tiny_flags(str(model_dir), tfds_dir, train_steps=130,
                                     checkpoint_every_steps=7, export=False), child_env())
  assert b.finish(timeout=120) == 0, b.text()[-3000:]
  assert re.search(r"Restored .*ckpt-100$", b.text(), re.M), b.text()[-3000:]
  stopped_at = len(a.text())
  a.proc.send_signal(signal.SIGCONT)
  assert a.finish(timeout=60) == 2, a.text()[-3000:]
  after = a.text()[stopped_at:]
  assert re.search(r"FATAL ConfigError: Lost the lock .*\.trainer-lock of --(model|checkpoint)_dir"
                   r"=.*: the lock file was deleted while this run held it", after), after
  assert "Saved checkpoint" not in after, after
  assert not glob.glob(str(model_dir / "checkpoints" / "ckpt-200*")), "A wrote no checkpoint"
  assert os.path.exists(model_dir / "metrics.json"), "B's outputs stay"

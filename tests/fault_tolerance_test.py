"""Preemption, crashes, corrupt checkpoints, divergence and deterministic resume on real processes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, run_module, tiny_flags
from trainer import errors
from trainer import train

pytestmark = pytest.mark.slow


def _final(output):
  """{worker: (step, weights_sha256)} from the trainers' final log lines."""
  found = re.findall(r"(?:\[(worker:\d)\] )?.*Final step (\d+) weights_sha256 (\w+)", output)
  return {w or "worker:0": (int(s), h) for w, s, h in found}


def _launch(args, tmp_path, name, workers=2):
  log = open(tmp_path / f"{name}.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "trainer.launcher", f"--workers={workers}",
                           "--", *args], env=child_env(), cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  return proc, log


def _wait_for(path, pattern, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    text = path.read_text()
    if re.search(pattern, text):
      return text
    time.sleep(0.3)
  pytest.fail(f"{pattern!r} never appeared in {path}:\n{path.read_text()[-3000:]}")


def _finish(proc, log, timeout):
  try:
    code = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("launcher hung")
  finally:
    log.close()
  return code


def _worker_pids(text):
  return [int(p) for p in re.findall(r"\[launcher\] worker:\d pid (\d+)", text)]


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:  # A zombie is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"
  except FileNotFoundError:
    return False


def _long_args(model_dir, tfds_dir, **kw):
  values = dict(train_steps=200, log_every_steps=5, checkpoint_every_steps=100,
                collective_timeout_s=20, preemption_grace_s=20, deterministic=True)
  values.update(kw)
  return tiny_flags(model_dir, tfds_dir, **values)


def test_sigterm_on_cluster_saves_and_rerun_loses_nothing(tmp_path, tfds_dir):
  model_dir = str(tmp_path / "run")
  args = _long_args(model_dir, tfds_dir)
  proc, log = _launch(args, tmp_path, "first")
  text = _wait_for(tmp_path / "first.log", r"\[worker:1\].*step 15/200", timeout=240)
  pids = _worker_pids(text)
  for pid in pids:  # What Kubernetes and Vertex AI do: SIGTERM every pod.
    os.kill(pid, signal.SIGTERM)
  code = _finish(proc, log, timeout=120)
  out = (tmp_path / "first.log").read_text()
  assert code == errors.EXIT_RETRYABLE, out[-4000:]
  assert "[launcher] exit codes: [143, 143]" in out
  saved = set(re.findall(r"\[(worker:\d)\].*Preempted: checkpoint saved at step (\d+)", out))
  assert {w for w, _ in saved} == {"worker:0", "worker:1"}
  assert len({s for _, s in saved}) == 1, f"both workers agree on the step: {saved}"
  stop = int(saved.pop()[1])
  assert 15 <= stop < 200
  logged = [int(s) for s in re.findall(r"\[worker:0\].*step (\d+)/200", out)]
  assert stop >= max(logged), "the checkpoint holds every step that was trained"
  assert not any(_alive(pid) for pid in pids)

  rerun = run_module("trainer.launcher", "--workers=2", "--", *args, timeout=400)
  assert rerun.returncode == 0, rerun.stdout[-4000:]
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["start_step"] == stop and metrics["global_step"] == 200
  final = _final(rerun.stdout)
  assert final["worker:0"] == final["worker:1"]


def test_sigkill_one_worker_then_relaunch(tmp_path, tfds_dir):
  model_dir = str(tmp_path / "run")
  args = _long_args(model_dir, tfds_dir, train_steps=300, checkpoint_every_steps=20,
                    collective_timeout_s=10)
  proc, log = _launch(args, tmp_path, "first")
  text = _wait_for(tmp_path / "first.log", r"Saved checkpoint .*ckpt-40", timeout=240)
  start = time.monotonic()
  os.kill(_worker_pids(text)[1], signal.SIGKILL)
  code = _finish(proc, log, timeout=120)
  assert time.monotonic() - start < 60, "the survivor exits within a bounded time"
  out = (tmp_path / "first.log").read_text()
  assert code != 0 and re.search(r"\[worker:0\].*lost contact with its peers|"
                                 r"\[worker:0\].*Lost task", out), out[-4000:]
  rerun = run_module("trainer.launcher", "--workers=2", "--", *args, timeout=400)
  assert rerun.returncode == 0, rerun.stdout[-4000:]
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  saved = [int(n) for n in re.findall(r"\[worker:0\].*Saved checkpoint .*ckpt-(\d+)", out)]
  reached = max(int(n) for n in re.findall(r"\[worker:0\].*step (\d+)/300", out))
  assert metrics["global_step"] == 300
  assert metrics["start_step"] == max(saved) >= 40, "resumed from the newest checkpoint"
  assert reached - metrics["start_step"] <= 20, "at most one checkpoint interval is lost"


def test_nan_stops_both_workers_at_the_same_step(tmp_path, tfds_dir):
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, train_steps=60,
                    collective_timeout_s=30)
  result = run_module("trainer.launcher", "--workers=2", "--", *args, timeout=300,
                      env=child_env(TRAINER_INJECT_NAN_AT_STEP=23))
  assert result.returncode == errors.EXIT_DIVERGED, result.stdout[-4000:]
  assert "[launcher] exit codes: [5, 5]" in result.stdout
  steps = re.findall(r"\[(worker:\d)\].*Loss became nan by step (\d+)", result.stdout)
  assert sorted(set(steps)) == [("worker:0", "25"), ("worker:1", "25")]
  ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
  assert "ckpt-20.index" in ckpts and not any("ckpt-25" in c or "ckpt-30" in c for c in ckpts)


def test_corrupt_newest_checkpoint_falls_back(tiny, caplog):
  config = tiny(train_steps=20, checkpoint_every_steps=10, export=False)
  train.train_and_evaluate(config)
  ckpt_dir = os.path.join(config.outputs.model_dir, "checkpoints")
  data_file = os.path.join(ckpt_dir, "ckpt-20.data-00000-of-00001")
  with open(data_file, "r+b") as f:  # flip bytes in the middle of the newest checkpoint
    f.seek(os.path.getsize(data_file) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))
  with caplog.at_level("ERROR"):
    metrics = train.train_and_evaluate(config.replace(train_steps=30))
  assert metrics["start_step"] == 10 and metrics["global_step"] == 30
  assert any("ckpt-20.data-00000-of-00001 is damaged" in r.getMessage() for r in caplog.records)


def test_torn_checkpoint_without_index_is_skipped(tiny, caplog):
  config = tiny(train_steps=20, checkpoint_every_steps=10, export=False)
  train.train_and_evaluate(config)
  os.remove(os.path.join(config.outputs.model_dir, "checkpoints", "ckpt-20.index"))
  with caplog.at_level("WARNING"):
    metrics = train.train_and_evaluate(config.replace(train_steps=30))
  assert metrics["start_step"] == 10
  assert any("incomplete (no ckpt-20.index" in r.getMessage() for r in caplog.records)


def test_deterministic_interrupted_equals_uninterrupted(tmp_path, tfds_dir):
  straight_dir = str(tmp_path / "straight")
  # Long enough that SIGTERM at step 35 lands well before the end on a fast machine (a SIGTERM
  # after the last chunk lets the run finish, exit 0).
  args = lambda d: _long_args(d, tfds_dir, train_steps=600, checkpoint_every_steps=1000)
  straight = run_module("trainer.task", *args(straight_dir), timeout=300)
  assert straight.returncode == 0, straight.stdout[-3000:]

  resumed_dir = str(tmp_path / "resumed")
  log = open(tmp_path / "interrupted.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *args(resumed_dir)],
                          env=child_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  _wait_for(tmp_path / "interrupted.log", r"step 35/600", timeout=240)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == errors.EXIT_RETRYABLE
  log.close()
  stopped = int(re.search(r"checkpoint saved at step (\d+)",
                          (tmp_path / "interrupted.log").read_text()).group(1))
  assert 35 <= stopped < 600
  resumed = run_module("trainer.task", *args(resumed_dir), timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert json.loads(open(os.path.join(resumed_dir, "metrics.json")).read())["start_step"] == stopped
  assert _final(resumed.stdout) == _final(straight.stdout), "bitwise-identical final weights"


def test_stopped_peer_is_named(tmp_path, tfds_dir):
  """A SIGSTOPped worker still accepts connections; the survivor must name it anyway."""
  args = _long_args(str(tmp_path / "run"), tfds_dir, train_steps=2000, collective_timeout_s=10)
  proc, log = _launch(args, tmp_path, "stopped")
  text = _wait_for(tmp_path / "stopped.log", r"\[worker:1\].*step 15/2000", timeout=240)
  pids = _worker_pids(text)
  os.kill(pids[1], signal.SIGSTOP)
  try:
    out = _wait_for(tmp_path / "stopped.log", r"\[worker:0\].*(lost contact|made no progress)",
                    timeout=120)
  finally:
    os.kill(pids[1], signal.SIGKILL)
  _finish(proc, log, timeout=120)
  line = [l for l in out.splitlines() if re.search(r"\[worker:0\].*(lost contact|made no "
                                                    r"progress)", l)][0]
  assert "worker:1" in line and "unknown" not in line, line

"""Real multi-process clusters on 127.0.0.1: launcher, identical weights, lost peers, 2 devices."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, run_module, tiny_flags
from trainer.runtime import cores
from trainer import errors
from trainer import launcher

pytestmark = pytest.mark.slow


def _fingerprints(output):
  return dict(re.findall(r"\[(worker:\d)\].*Final step \d+ weights_sha256 (\w+)", output))


def _steps(output):
  return dict(re.findall(r"\[(worker:\d)\].*Final step (\d+) weights_sha256", output))


def test_two_workers_via_launcher(tmp_path, tfds_dir):
  model_dir = tmp_path / "run"
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  args = tiny_flags(str(model_dir), tfds_dir, train_steps=24, global_batch_size=32,
                    checkpoint_every_steps=12, collective_timeout_s=120)
  result = run_module("trainer.launcher", "--workers=2", "--", *args,
                      env=child_env(TMPDIR=tmp), timeout=400)
  out = result.stdout
  assert result.returncode == 0, out[-4000:]
  assert "[launcher] exit codes: [0, 0]" in out
  assert re.search(r"^\[worker:0\] ", out, re.M) and re.search(r"^\[worker:1\] ", out, re.M)
  assert _steps(out) == {"worker:0": "24", "worker:1": "24"}
  prints = _fingerprints(out)
  assert len(prints) == 2 and prints["worker:0"] == prints["worker:1"], "identical weights"
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["num_workers"] == 2 and metrics["num_replicas"] == 2
  assert metrics["strategy"] == "multi_worker_mirrored"
  assert metrics["weights_sha256"] == prints["worker:0"]
  assert sorted(os.listdir(model_dir)) == ["checkpoints", "export", "logs", "metrics.json"]
  ckpts = sorted(f for f in os.listdir(model_dir / "checkpoints") if f.endswith(".index"))
  assert ckpts == ["ckpt-12.index", "ckpt-24.index"]
  assert os.listdir(tmp) == [], "non-chief temp checkpoint dirs are removed"


def _start_worker(addresses, index, args, log_path, env_extra=None):
  env = launcher.worker_env(child_env(**(env_extra or {})), addresses, index, threads=1)
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=env, cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  return proc, log


def _wait(proc, timeout):
  start = time.monotonic()
  try:
    code = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"process still running after {timeout}s: it hangs")
  return code, time.monotonic() - start


def test_missing_peer_at_startup_exits_retryable(tmp_path, tfds_dir):
  addresses = [f"localhost:{p}" for p in launcher.free_ports(2)]
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, collective_timeout_s=8)
  proc, log = _start_worker(addresses, 0, args, tmp_path / "w0.log")
  code, elapsed = _wait(proc, timeout=120)
  log.close()
  out = (tmp_path / "w0.log").read_text()
  assert code == errors.EXIT_RETRYABLE, out[-3000:]
  assert f"worker:1 ({addresses[1]})" in out, out[-3000:]
  assert elapsed < 90
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _wait_for(path, pattern, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if re.search(pattern, path.read_text()):
      return
    time.sleep(0.5)
  pytest.fail(f"{pattern!r} never appeared in {path}:\n{path.read_text()[-3000:]}")


def test_peer_killed_mid_run(tmp_path, tfds_dir):
  addresses = [f"localhost:{p}" for p in launcher.free_ports(2)]
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, train_steps=100000, log_every_steps=5,
                    checkpoint_every_steps=1000, collective_timeout_s=10)
  procs = [_start_worker(addresses, i, args, tmp_path / f"w{i}.log") for i in range(2)]
  try:
    _wait_for(tmp_path / "w0.log", r"step 10/100000", timeout=180)
    os.killpg(procs[1][0].pid, signal.SIGKILL)
    code, elapsed = _wait(procs[0][0], timeout=120)
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      log.close()
  out = (tmp_path / "w0.log").read_text()
  assert code == errors.EXIT_RETRYABLE, out[-3000:]
  assert "worker:1" in out.split("step 10/100000", 1)[1], out[-3000:]
  assert elapsed < 60, f"survivor took {elapsed:.0f}s"


@pytest.mark.skipif(cores.available({}) < 2, reason="needs 2 cores")
def test_auto_one_replica_per_core(tmp_path, tfds_dir):
  model_dir = tmp_path / "run"
  result = run_module("trainer.task", *tiny_flags(str(model_dir), tfds_dir,
                                                  global_batch_size=128),
                      env=child_env(TF_NUM_INTRAOP_THREADS="2"))
  assert result.returncode == 0, result.stdout[-3000:]
  assert "CPU split into 2 logical devices, 1 intra-op thread(s) each" in result.stdout
  assert "Strategy mirrored with 2 replica(s)" in result.stdout
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["num_replicas"] == 2 and metrics["global_step"] == 20
  assert (model_dir / "export" / "saved_model.pb").exists()


def test_batch_not_divisible_by_replicas(tmp_path, tfds_dir):
  result = run_module("trainer.task", *tiny_flags(str(tmp_path / "run"), tfds_dir,
                                                  global_batch_size=33),
                      "--num_cpu_devices=2", "--strategy=mirrored")
  assert result.returncode == errors.EXIT_CONFIG
  assert "--global_batch_size=33 is not divisible by the 2 replicas" in result.stdout


def test_launcher_ctrl_c_leaves_no_process(tmp_path, tfds_dir):
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, train_steps=100000, log_every_steps=5,
                    checkpoint_every_steps=1000, collective_timeout_s=30)
  log_path = tmp_path / "launcher.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "trainer.launcher", "--workers=2",
                             "--shutdown_grace_s=300", "--", *args], env=child_env(), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not re.search(r"\[worker:1\].*step 10/100000", log_path.read_text()):
      assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
      time.sleep(0.3)
    pids = [int(p) for p in re.findall(r"worker:\d pid (\d+)", log_path.read_text())]
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the launcher
    # Well inside the 300 s grace: the launcher returns once its workers have exited.
    code, _ = _wait(proc, timeout=90)
  out = log_path.read_text()
  assert code == errors.EXIT_RETRYABLE, out[-3000:]
  assert "[launcher] exit codes: [143, 143]" in out
  for pid in pids:
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"

"""The local launcher's process handling and restarts, with real child processes (no TensorFlow)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, run_module, run_without_tf, tiny_flags
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
  cluster.stop(grace_s=1.0)
  codes = cluster.wait()
  elapsed = time.monotonic() - start
  assert codes == [-signal.SIGKILL, -signal.SIGKILL]
  assert launcher.exit_code(codes) == 128 + signal.SIGKILL
  assert 1.0 <= elapsed < 30, elapsed


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


def test_first_failure_stops_a_hung_worker_and_sets_the_exit_code(tmp_path, capsys,
                                                                  monkeypatch):
  monkeypatch.setattr(launcher, "SETTLE_S", 1.0)  # 10 s in a real job; the sequence is the same
  cluster = _cluster(tmp_path, _ONE_FAILS)
  _stop_worker0_then_fail_worker1(tmp_path, [p.pid for p in cluster.procs])
  start = time.monotonic()
  codes = cluster.wait(failure_grace_s=1.0)
  elapsed = time.monotonic() - start
  assert codes == [-signal.SIGKILL, 3]
  assert cluster.failures[0] == (1, 3)
  assert launcher.exit_code([c for _, c in cluster.failures]) == 3
  # The hung worker gets SETTLE_S to stop on its own, then SIGTERM (ignored while stopped... it
  # gets SIGCONT too), then SIGKILL after the grace.
  assert launcher.SETTLE_S + 1.0 <= elapsed < launcher.SETTLE_S + 30, elapsed
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
          "launcher.SETTLE_S = 1.0; "  # 10 s in a real job; the sequence is the same
          f"sys.exit(launcher.launch(2, [{str(tmp_path)!r}], 1, 1.0, module='child'))")
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


# ---- --max_restarts: which exits relaunch the job, and how often ----

# Attempt 1: worker 1 is SIGKILLed (an OOM kill, say) and worker 0 then stops the way a trainer
# that lost its peer does (exit 143); attempt 2 succeeds. CODES_ENV overrides attempt 1's codes.
_FLAKY = """
import glob, json, os, signal, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = f"{task['type']}-{task['index']}"
attempt = len(glob.glob(os.path.join(sys.argv[1], f"start-{name}-*"))) + 1
open(os.path.join(sys.argv[1], f"start-{name}-{os.getpid()}"), "w").close()
codes = os.environ.get("CHILD_CODES")
if codes:  # the same exit in every attempt: {"worker-0": 143, ...}
  sys.exit(json.loads(codes).get(name, 0))
if attempt > 1:
  sys.exit(0)
if name == "worker-1":
  open(os.path.join(sys.argv[1], "dying"), "w").close()
  os.kill(os.getpid(), signal.SIGKILL)
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(sys.argv[1], "dying")) and time.monotonic() < deadline:
  time.sleep(0.05)
time.sleep(0.3)  # a trainer notices a lost peer later than the peer dies
sys.exit(143)
"""


def _launch_in_child(tmp_path, source, timeout=120, codes=None, **kwargs):
  """launcher.launch() in its own process (it installs signal handlers), stub children."""
  (tmp_path / "child.py").write_text(source)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  if codes:
    env["CHILD_CODES"] = json.dumps(codes)
  call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
  code = ("import sys; from trainer import launcher; "
          f"sys.exit(launcher.launch(2, [{str(tmp_path)!r}], 1, 2.0, module='child', {call}))")
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return result.returncode, result.stdout


def _attempts(tmp_path, name="worker-0"):
  return len(list(tmp_path.glob(f"start-{name}-*")))


def test_max_restarts_relaunches_the_whole_job_after_a_sigkill(tmp_path):
  code, out = _launch_in_child(tmp_path, _FLAKY, max_restarts=2)
  assert code == 0, out
  assert _attempts(tmp_path, "worker-0") == _attempts(tmp_path, "worker-1") == 2
  assert ("[launcher] restart 1 of at most 2: worker:1 exited 137, killed by SIGKILL, a "
          "retryable exit; relaunching every process") in out, out
  assert out.count("[launcher] exit codes:") == 2 and "exit codes: [0, 0]" in out


def test_without_max_restarts_a_sigkill_ends_the_job(tmp_path):
  code, out = _launch_in_child(tmp_path, _FLAKY)
  assert code == 137, out
  assert _attempts(tmp_path) == 1 and "restart" not in out


def test_a_permanent_exit_ends_the_job_at_once(tmp_path):
  code, out = _launch_in_child(tmp_path, _FLAKY, codes={"worker-1": 5}, max_restarts=2)
  assert code == 5, out
  assert _attempts(tmp_path) == 1
  assert "worker:1 exited 5, a permanent exit: no restart, the job ends with 5" in out, out


def test_restarts_are_bounded_by_max_restarts(tmp_path):
  code, out = _launch_in_child(tmp_path, _FLAKY, codes={"worker-0": 143, "worker-1": 143},
                               max_restarts=2)
  assert code == 143, out
  assert _attempts(tmp_path) == 3, "the first start and 2 restarts"
  assert "restart 2 of at most 2" in out and "restart 3" not in out
  assert "all 2 restart(s) are used (--max_restarts=2): the job ends with 143" in out, out


def test_an_evaluator_is_started_and_stopped_like_a_worker(tmp_path):
  code, out = _launch_in_child(tmp_path, _FLAKY, codes={"evaluator-0": 3}, evaluator=True)
  assert code == 3, out
  assert re.search(r"\[launcher\] evaluator:0 pid \d+ on localhost:\d+", out), out
  assert "exit codes: [0, 0, 3]" in out, out
  # Every task's TF_CONFIG lists the evaluator, as the training operator writes it.
  env = launcher.worker_env({}, ["localhost:1", "localhost:2"], 0, 1, "localhost:3", "evaluator")
  assert json.loads(env["TF_CONFIG"]) == {
      "cluster": {"worker": ["localhost:1", "localhost:2"], "evaluator": ["localhost:3"]},
      "task": {"type": "evaluator", "index": 0}}


@pytest.mark.parametrize("args, message", [
    (["--max_restarts=-1", "--", "--model_dir=x"],
     "--max_restarts must be >= 0, got -1: give how many times to relaunch"),
    (["--evaluator", "--", "--epochs=1"],
     "--evaluator needs the trainer's --model_dir (or --checkpoint_dir) after `--`"),
    (["--workers=0"], "--workers must be >= 1, got 0."),
])
def test_bad_launcher_flags_exit_2_before_anything_starts(args, message):
  result = run_without_tf("trainer.launcher", *args)
  assert result.returncode == 2, result.stdout
  assert f"FATAL {message}" in result.stdout, result.stdout
  assert "pid" not in result.stdout


def test_the_evaluator_finds_checkpoints_through_any_of_these():
  for args, environ in [(["--model_dir=gs://b/r"], {}), (["--checkpoint_dir", "/c"], {}),
                        (["--flagfile=f.txt"], {}), ([], {"AIP_MODEL_DIR": "gs://b/m"})]:
    assert launcher.check_flags(2, 0, True, args, environ) == "", (args, environ)


# ---- Every process dies with the launcher; every wait is bounded (issue 33 #4, #11) ----

# Worker 0 holds the run lock of argv[1] as a chief does; each task marks itself ready and then
# runs until killed, unless the test asked for a quick run ("relaunch").
_HOLDS_THE_LOCK = """
import json, os, sys, time
from trainer.storage import lock as run_lock
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = f"{task['type']}-{task['index']}"
if name == "worker-0":
  run_lock.acquire(sys.argv[1], sys.argv[1])
open(os.path.join(sys.argv[1], f"ready-{name}-{os.getpid()}"), "w").close()
if not os.path.exists(os.path.join(sys.argv[1], "relaunch")):
  time.sleep(600)
"""


def _launcher_in_child(tmp_path, source, args=(), setup="pass"):
  """launcher.launch() with 2 workers and an evaluator in its own process; its output in a file."""
  (tmp_path / "child.py").write_text(source)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  code = (f"import sys; from trainer import launcher; {setup}; sys.exit(launcher.launch(2, "
          f"{[str(tmp_path), *args]!r}, 1, 2.0, module='child', evaluator=True))")
  with open(tmp_path / "launcher.log", "a") as log:  # the child keeps its own descriptor
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)


def _ready_pids(tmp_path, count, proc):
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob("ready-*"))) < count:
    assert time.monotonic() < deadline and proc.poll() is None, "children never started"
    time.sleep(0.05)
  return {p.name.rsplit("-", 1)[0][len("ready-"):]: int(p.name.rsplit("-", 1)[1])
          for p in tmp_path.glob("ready-*")}


def _gone(pid) -> bool:
  """No such process, or a zombie nobody reaped yet (in a container, PID 1 may never)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
  except FileNotFoundError:
    return True


def test_a_killed_launchers_workers_and_evaluator_die_with_it_and_a_relaunch_works(tmp_path):
  proc = _launcher_in_child(tmp_path, _HOLDS_THE_LOCK)
  pids = _ready_pids(tmp_path, 3, proc)
  assert set(pids) == {"worker-0", "worker-1", "evaluator-0"}
  try:
    proc.kill()  # kill -9: the launcher cannot stop anything itself
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids.values()):
      assert time.monotonic() < deadline, {n: p for n, p in pids.items() if not _gone(p)}
      time.sleep(0.05)
  finally:
    for pid in pids.values():
      if not _gone(pid):
        os.kill(pid, signal.SIGKILL)
  # The same job again: worker 0 gets the lock the dead one held, and everything finishes.
  for ready in tmp_path.glob("ready-*"):
    ready.unlink()
  (tmp_path / "relaunch").write_text("")
  again = _launcher_in_child(tmp_path, _HOLDS_THE_LOCK)
  assert again.wait(timeout=60) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
  assert "exit codes: [0, 0, 0]" in (tmp_path / "launcher.log").read_text()


def test_a_cluster_off_the_main_thread_is_refused(tmp_path):
  import threading
  raised = []
  thread = threading.Thread(target=lambda: raised.append(
      pytest.raises(RuntimeError, launcher.Cluster, 1, [str(tmp_path)], module="child")))
  thread.start()
  thread.join()
  assert "main thread" in str(raised[0].value)


# The workers finish once told to ("finish"); the evaluator never does.
_EVALUATOR_HANGS = """
import json, os, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]
open(os.path.join(sys.argv[1], f"ready-{task['type']}-{task['index']}-{os.getpid()}"), "w").close()
while task["type"] == "evaluator" or not os.path.exists(os.path.join(sys.argv[1], "finish")):
  time.sleep(0.05)
"""


def test_a_stopped_evaluator_gets_a_bounded_time_after_the_workers_finished(tmp_path):
  proc = _launcher_in_child(tmp_path, _EVALUATOR_HANGS, args=["--evaluator_timeout_s=1.5"],
                            setup="launcher.EVALUATOR_MARGIN_S = 1.0")
  pids = _ready_pids(tmp_path, 3, proc)
  os.kill(pids["evaluator-0"], signal.SIGSTOP)
  (tmp_path / "finish").write_text("")
  start = time.monotonic()
  try:
    code = proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    os.kill(pids["evaluator-0"], signal.SIGKILL)
    pytest.fail("the launcher kept waiting for a stopped evaluator after the workers finished")
  out = (tmp_path / "launcher.log").read_text()
  assert code == launcher.EXIT_EVALUATOR_OVERDUE == 143, out
  assert ("[launcher] evaluator:0 still running 2s after the workers finished "
          "(--evaluator_timeout_s + 1s): stopping it (SIGTERM and SIGCONT now, SIGKILL after "
          "2s); the job exits 143") in out, out
  assert time.monotonic() - start < 2.5 + 2.0 + 10, "the limit, the grace, and no more"


def test_the_evaluators_limit_follows_its_timeout_flag():
  margin = launcher.EVALUATOR_MARGIN_S
  assert launcher.evaluator_limit(["--evaluator_timeout_s=30"]) == 30 + margin
  assert launcher.evaluator_limit(["--evaluator_timeout_s", "45", "--epochs=1"]) == 45 + margin
  assert launcher.evaluator_limit(["--flagfile=f"]) == 3600 + margin  # the trainer's default
  assert launcher.evaluator_limit(["--evaluator_timeout_s=x"]) == 3600 + margin


# ---- Real trainers (slow: TensorFlow in every process) ----

@pytest.mark.slow
def test_two_workers_and_an_evaluator(tmp_path, tfds_dir):
  model_dir = tmp_path / "run"
  args = tiny_flags(str(model_dir), tfds_dir, train_steps=30, collective_timeout_s=120,
                    evaluator_timeout_s=300, export=False)
  result = run_module("trainer.launcher", "--workers=2", "--evaluator", "--", *args,
                      timeout=600)
  out = result.stdout
  assert result.returncode == 0, out[-4000:]
  assert "[launcher] exit codes: [0, 0, 0]" in out
  # The workers trained alone: their TF_CONFIG listed the evaluator, their collectives did not.
  assert "Strategy multi_worker_mirrored with 2 replica(s)" in out
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["num_workers"] == 2 and metrics["global_step"] == 30
  assert re.search(r"^\[evaluator:0\] .*Evaluated the final checkpoint \(step 30\)", out, re.M)
  history = json.loads((model_dir / "eval_metrics.json").read_text())["history"]
  assert history[-1]["step"] == 30
  assert history[-1]["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_a_sigkilled_worker_is_relaunched_and_loses_at_most_one_checkpoint_interval(
    tmp_path, tfds_dir):
  model_dir = tmp_path / "run"
  interval, total = 20, 400
  args = tiny_flags(str(model_dir), tfds_dir, train_steps=total, log_every_steps=5,
                    checkpoint_every_steps=interval, collective_timeout_s=10, export=False)
  log_path = tmp_path / "launcher.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "trainer.launcher", "--workers=2",
                             "--max_restarts=2", "--", *args], env=child_env(), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while max(_logged_steps(log_path.read_text(), total), default=0) < 50:
      assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
      time.sleep(0.1)
    worker1 = int(re.findall(r"\[launcher\] worker:1 pid (\d+)", log_path.read_text())[0])
    os.kill(worker1, signal.SIGKILL)
    # Worker 0 trains no step without its peer, so this holds every step trained before the kill.
    killed_at = log_path.stat().st_size
    try:
      code = proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail("the launcher never finished")
  out = log_path.read_text()
  assert code == 0, out[-4000:]
  assert ("[launcher] restart 1 of at most 2: worker:1 exited 137, killed by SIGKILL, a "
          "retryable exit; relaunching every process") in out, out[-4000:]
  assert out.count("[launcher] exit codes:") == 2 and out.endswith("exit codes: [0, 0]\n")
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["global_step"] == total, "the full step count"
  # The restart resumed from the newest checkpoint: it recomputed at most one interval.
  last_logged = max(_logged_steps(out[:killed_at], total))
  start = metrics["start_step"]
  assert start >= 40 and start % interval == 0, start
  assert last_logged - start <= interval, (last_logged, start)
  assert f"Restored {model_dir}/checkpoints/ckpt-{start}" in out[killed_at:]


def _logged_steps(text, total):
  return [int(s) for s in re.findall(rf"\[worker:0\].*step (\d+)/{total} ", text)]

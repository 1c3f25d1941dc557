"""Runs one measurement as a fresh subprocess and reads what it left: wall time from fork to
exit, peak RSS, how busy the rest of the machine was, and the trainer's log and metrics.json."""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's prefix: I1203 10:39:38.237121 140162449767296 train.py:276] (local time, no year)
_ABSL_TIME = re.compile(r"[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) ")
_EVAL = re.compile(r"eval at step (\d+): test_accuracy ([\d.]+)")


def absl_time(line: str, near: float):
  """The epoch time of an absl log line's prefix (the year taken from `near`), else None."""
  m = _ABSL_TIME.search(line)
  if not m:
    return None
  month, day, hour, minute, second, micro = (int(g) for g in m.groups())
  year = datetime.datetime.fromtimestamp(near).year
  for y in (year, year - 1, year + 1):  # a run across New Year
    t = datetime.datetime(y, month, day, hour, minute, second, micro).timestamp()
    if abs(t - near) < 180 * 86400:
      return t
  return None


def eval_points(log: str, started: float) -> list:
  """[(step, test_accuracy, seconds since `started`)] of the trainer's 'eval at step' lines."""
  points = []
  for line in log.splitlines():
    m = _EVAL.search(line)
    t = absl_time(line, started) if m else None
    if m:
      points.append((int(m.group(1)), float(m.group(2)),
                     None if t is None else t - started))
  return points


def json_lines(log: str, tag: str) -> list:
  """Objects a probe printed as lines 'TAG {json}'."""
  prefix = tag + " "
  return [json.loads(l[len(prefix):]) for l in log.splitlines() if l.startswith(prefix)]


def last_line(log: str) -> str:
  lines = [l for l in log.strip().splitlines() if l.strip()]
  return lines[-1][:300] if lines else "no output"


def _busy_jiffies() -> int:
  with open("/proc/stat") as f:
    parts = [int(v) for v in f.readline().split()[1:]]
  return sum(parts) - parts[3] - parts[4]  # all but idle and iowait


def _cores() -> int:
  return len(os.sched_getaffinity(0))


def others_busy(window_s: float) -> float:
  """Share of all cores busy over window_s while we run nothing (so: other processes)."""
  before = _busy_jiffies()
  time.sleep(window_s)
  return (_busy_jiffies() - before) / os.sysconf("SC_CLK_TCK") / (window_s * _cores())


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15, window_s: float = 0.5) -> float:
  """Waits up to max_wait_s for other processes to leave the CPU idle; returns seconds waited."""
  tic = time.monotonic()
  while time.monotonic() - tic < max_wait_s and others_busy(window_s) > threshold:
    pass
  return time.monotonic() - tic


def child_env() -> dict:
  env = dict(os.environ)
  for name in ("TF_CONFIG", "CLUSTER_SPEC", "AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR",
               "AIP_TENSORBOARD_LOG_DIR"):
    env.pop(name, None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  # The trainer's default, explicit so the Keras reference runs with the same kernels.
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  return env


def run(module: str, args: list, log_path: str, timeout_s: float,
        quiet_wait_s: float = 0.0) -> dict:
  """`python -m module args` with its output in log_path.

  Returns returncode ("timeout" when killed), started (time.time() just before the fork),
  wall_s (fork to exit), max_rss_mb (the child's peak RSS, from wait4; for the launcher that is
  the launcher process itself), others_cpu (share of the machine other processes used meanwhile)
  and waited_s (the wait for a quiet machine before it).
  """
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  waited = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else 0.0
  busy0 = _busy_jiffies()
  with open(log_path, "w") as log:
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=child_env(), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    code, usage = _wait(proc, started + timeout_s)
    wall = time.time() - started
  busy_s = (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
  ours_s = usage.ru_utime + usage.ru_stime if usage else 0.0
  with open(log_path) as f:
    text = f.read()
  return {"returncode": code, "started": started, "wall_s": round(wall, 3),
          "max_rss_mb": round(usage.ru_maxrss / 1024, 1) if usage else None,
          "others_cpu": round(max(0.0, busy_s - ours_s) / (wall * _cores()), 3),
          "waited_s": round(waited, 1), "log": text}


def _wait(proc, deadline: float) -> tuple:
  """Reaps the child with wait4 (for its rusage), polling so the deadline holds."""
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      proc.returncode = os.waitstatus_to_exitcode(status)
      return proc.returncode, usage
    if time.time() > deadline:
      proc.terminate()  # the launcher forwards SIGTERM to its workers
      try:
        proc.wait(timeout=45)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      return "timeout", None
    time.sleep(0.01)


def fresh_dir(path: str) -> str:
  """An empty directory: the trainer resumes from any checkpoint it finds, so never reuse one."""
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  return path


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None

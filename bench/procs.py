"""Runs measurements in fresh subprocesses and records how busy the rest of the machine was."""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EVAL_LINE = re.compile(r"eval at step (\d+): test_accuracy ([\d.]+) test_loss ([\d.naninf]+) "
                        r"\(([\d.]+)s into training\)")


def parse_eval_lines(log: str) -> list:
  """[(step, test_accuracy, seconds into training)] from the trainer's eval log lines."""
  return [(int(m.group(1)), float(m.group(2)), float(m.group(4)))
          for m in _EVAL_LINE.finditer(log)]


def first_reaching(evals: list, threshold: float):
  """The first (step, accuracy, seconds) whose accuracy reaches threshold, else None."""
  for point in evals:
    if point[1] >= threshold:
      return point
  return None


def _busy_jiffies() -> int:
  with open("/proc/stat") as f:
    parts = [int(v) for v in f.readline().split()[1:]]
  # idle and iowait are the only fields that are not CPU work (steal is work done for others).
  return sum(parts) - parts[3] - parts[4]


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def others_busy_fraction(window_s: float = 1.0) -> float:
  """Share of all cores busy over a short window while we run nothing (so: other processes)."""
  before = _busy_jiffies()
  time.sleep(window_s)
  busy_s = (_busy_jiffies() - before) / os.sysconf("SC_CLK_TCK")
  return busy_s / (window_s * len(os.sched_getaffinity(0)))


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15, window_s: float = 2.0) -> float:
  """Waits (up to max_wait_s) until other processes leave the CPU idle; returns seconds waited."""
  tic = time.monotonic()
  while time.monotonic() - tic < max_wait_s:
    if others_busy_fraction(window_s) <= threshold:
      break
  return time.monotonic() - tic


class CpuMonitor:
  """Fraction of the machine used by processes other than our children during a block."""

  def __enter__(self):
    self._wall = time.monotonic()
    self._busy = _busy_jiffies()
    self._ours = _children_cpu_s()
    self._load = os.getloadavg()[0]
    return self

  def __exit__(self, *exc):
    wall = time.monotonic() - self._wall
    busy_s = (_busy_jiffies() - self._busy) / os.sysconf("SC_CLK_TCK")
    ours_s = _children_cpu_s() - self._ours
    cores = len(os.sched_getaffinity(0))
    self.wall_s = wall
    self.ours_cpu_fraction = ours_s / (wall * cores) if wall else 0.0
    self.others_cpu_fraction = max(0.0, (busy_s - ours_s) / (wall * cores)) if wall else 0.0
    self.loadavg = (self._load, os.getloadavg()[0])
    return False

  def summary(self) -> dict:
    return {"wall_s": round(self.wall_s, 2), "ours_cpu": round(self.ours_cpu_fraction, 3),
            "others_cpu": round(self.others_cpu_fraction, 3),
            "loadavg_1m": [round(v, 2) for v in self.loadavg]}


def child_env() -> dict:
  env = dict(os.environ)
  for name in ("TF_CONFIG", "CLUSTER_SPEC", "AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR",
               "AIP_TENSORBOARD_LOG_DIR"):
    env.pop(name, None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  # The trainer's default; explicit so the reference probes run with the same kernels.
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  return env


def run_module(module: str, args: list, log_path: str, timeout: float,
               quiet_wait_s: float = 0.0) -> tuple:
  """Runs `python -m module args`, logging to log_path; returns (returncode, log, cpu summary).

  Waits up to quiet_wait_s for other processes to go quiet first: on a shared 2-core machine
  one concurrent test run halves a measurement.
  """
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  waited = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else 0.0
  with open(log_path, "w") as log, CpuMonitor() as cpu:
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=child_env(), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
      code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      code = "timeout"
      _stop(proc)
  with open(log_path) as f:
    return code, f.read(), {**cpu.summary(), "waited_for_quiet_s": round(waited, 1)}


def _stop(proc) -> None:
  # SIGTERM first: the launcher forwards it to its workers, which live in their own sessions.
  proc.terminate()
  try:
    proc.wait(timeout=45)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


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

"""Local cluster rehearsal: `python -m trainer.launcher --workers=N -- <trainer flags>` on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from trainer import cores

FLAGS = flags.FLAGS
# After one worker fails, the others get this long to exit by themselves before SIGTERM.
SETTLE_S = 10.0
flags.DEFINE_integer("workers", 2, "Number of worker processes.")
flags.DEFINE_integer("threads_per_worker", 0,
                     "Intra-op threads per worker (0: the cores this process may use, after "
                     "affinity and the container's CPU quota, divided by --workers).")
flags.DEFINE_float("shutdown_grace_s", 30.0,
                   "After Ctrl-C, SIGTERM or a worker's failure, seconds the other workers get "
                   "to checkpoint before SIGKILL.")


def free_ports(count: int) -> list:
  """Ports the OS just handed out; held open together so they are distinct."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket()
      s.bind(("127.0.0.1", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def default_threads(num_workers: int, environ) -> int:
  """Each worker's share of the cores this process may use (not of every core on the host)."""
  return max(1, cores.available(environ) // num_workers)


def worker_env(base_env, addresses, index: int, threads: int) -> dict:
  """The environment of worker `index`: its TF_CONFIG and a fair share of the cores."""
  env = dict(base_env)
  env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                 "task": {"type": "worker", "index": index}})
  env.pop("CLUSTER_SPEC", None)
  for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
    env[name] = str(threads)
  env["TF_NUM_INTEROP_THREADS"] = "2"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _pump(name: str, stream, lock) -> None:
  for line in iter(stream.readline, b""):
    with lock:
      sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
      sys.stdout.flush()


class Cluster:
  """N trainer processes, each in its own session so only we decide how they stop."""

  def __init__(self, num_workers: int, trainer_args, threads_per_worker: int = 0,
               env=None, module: str = "trainer.task"):
    self.addresses = [f"localhost:{p}" for p in free_ports(num_workers)]
    threads = threads_per_worker or default_threads(num_workers, env or os.environ)
    self._lock = threading.Lock()
    self._kill_at = None  # monotonic time after which wait() SIGKILLs remaining workers
    self._stop_at = None  # after a first failure: when wait() SIGTERMs the workers still running
    self._failed = []  # indexes of workers that exited non-zero, in the order seen
    self._stopping = False  # stop() was called: exits from now on are what we asked for
    self.procs, self._pumps = [], []
    for i in range(num_workers):
      proc = subprocess.Popen(
          [sys.executable, "-m", module, *trainer_args],
          env=worker_env(env or os.environ, self.addresses, i, threads),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
      pump = threading.Thread(target=_pump, args=(f"worker:{i}", proc.stdout, self._lock),
                              daemon=True)
      pump.start()
      self.procs.append(proc)
      self._pumps.append(pump)

  def wait(self, failure_grace_s: float = 30.0) -> list:
    """Exit codes of all workers; after stop(), SIGKILLs whatever outlives the grace period.

    The first worker to fail stops the others (stop(failure_grace_s)): a synchronous job cannot
    go on without it, and a survivor that is hung or SIGSTOPped would otherwise keep the
    launcher waiting forever. self.failures lists (worker, code) in the order they were seen.

    Polls rather than blocking in Popen.wait(): a signal handler that runs while the main
    thread is inside wait() cannot see children exit (wait() holds Popen's lock, so poll()
    in the handler says 'running'), which made every Ctrl-C last the whole grace period.
    """
    while True:
      running = False
      for i, p in enumerate(self.procs):
        code = p.poll()
        if code is None:
          running = True
        elif code and i not in self._failed:
          self._on_failure(i, code, failure_grace_s)
      if not running:
        break
      if self._stop_at is not None and time.monotonic() >= self._stop_at:
        self._stop_at = None
        others = self._running_names()
        self._say(f"{others} still running {SETTLE_S:.0f}s after the first failure: SIGTERM "
                  f"(and SIGCONT, in case one is stopped) now, SIGKILL after {failure_grace_s:.0f}s")
        self.stop(failure_grace_s)
      if self._kill_at is not None and time.monotonic() >= self._kill_at:
        self._say(f"grace over: SIGKILL to {self._running_names()}")
        self.signal_all(signal.SIGKILL)
        self._kill_at = None
      time.sleep(0.1)
    for pump in self._pumps:
      pump.join(timeout=5)
    return [p.returncode for p in self.procs]

  @property
  def failures(self) -> list:
    return [(i, self.procs[i].returncode) for i in self._failed]

  def _on_failure(self, index: int, code: int, grace_s: float) -> None:
    self._failed.append(index)
    if len(self._failed) > 1 or self._stopping:
      return  # the others are already being stopped
    others = self._running_names()
    if not others:
      return
    # The others usually stop by themselves within seconds (a NaN or a lost peer ends every
    # worker at the same step); only those still running after SETTLE_S are stopped.
    self._say(f"worker:{index} failed first (exit {_describe(code)}); {others} get "
              f"{SETTLE_S:.0f}s to stop on their own")
    self._stop_at = time.monotonic() + SETTLE_S

  def _running_names(self) -> str:
    return ", ".join(f"worker:{i}" for i, p in enumerate(self.procs) if p.poll() is None)

  def _say(self, message: str) -> None:
    with self._lock:
      print(f"[launcher] {message}", flush=True)

  def signal_all(self, signum) -> None:
    for p in self.procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signum)
        except ProcessLookupError:
          pass

  def stop(self, grace_s: float) -> None:
    """SIGTERM now (workers checkpoint and exit 143); wait() SIGKILLs the rest after grace_s."""
    self._stopping = True
    self.signal_all(signal.SIGTERM)
    # A SIGSTOPped worker keeps SIGTERM pending until it runs again.
    self.signal_all(signal.SIGCONT)
    if self._kill_at is None:
      self._kill_at = time.monotonic() + grace_s


def _describe(code: int) -> str:
  """A Popen return code as the shell shows it: 3, or 137 for killed by signal 9."""
  if code > 0:
    return str(code)
  try:
    name = signal.Signals(-code).name
  except ValueError:  # real-time signals have no name
    name = f"signal {-code}"
  return f"{128 - code}, killed by {name}"


def exit_code(codes) -> int:
  """0 when every worker succeeded, else the first failure's code (negative signals -> 128+n)."""
  for code in codes:
    if code:
      return 128 - code if code < 0 else code
  return 0


def launch(num_workers: int, trainer_args, threads_per_worker: int, shutdown_grace_s: float,
           module: str = "trainer.task", env=None) -> int:
  """Runs the workers until all have exited; returns the launcher's exit code."""
  cluster = Cluster(num_workers, trainer_args, threads_per_worker, env=env, module=module)
  for i, (proc, address) in enumerate(zip(cluster.procs, cluster.addresses)):
    print(f"[launcher] worker:{i} pid {proc.pid} on {address}", flush=True)

  def on_signal(signum, frame):
    print(f"[launcher] signal {signum}: stopping workers (grace {shutdown_grace_s:.0f}s)",
          flush=True)
    cluster.stop(shutdown_grace_s)

  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGTERM, on_signal)
  codes = cluster.wait(shutdown_grace_s)
  print(f"[launcher] exit codes: {codes}", flush=True)
  # The first failure is the cause; the others' codes are mostly our SIGTERM or SIGKILL.
  return exit_code([code for _, code in cluster.failures])


def main(argv):
  if FLAGS.workers < 1:
    sys.stderr.write(f"FATAL --workers must be >= 1, got {FLAGS.workers}.\n")
    sys.exit(2)
  sys.exit(launch(FLAGS.workers, argv[1:], FLAGS.threads_per_worker, FLAGS.shutdown_grace_s))


if __name__ == "__main__":
  app.run(main)

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
flags.DEFINE_integer("workers", 2, "Number of worker processes.")
flags.DEFINE_integer("threads_per_worker", 0,
                     "Intra-op threads per worker (0: the cores this process may use, after "
                     "affinity and the container's CPU quota, divided by --workers).")
flags.DEFINE_float("shutdown_grace_s", 30.0,
                   "After Ctrl-C or SIGTERM, seconds the workers get to checkpoint before SIGKILL.")


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

  def wait(self) -> list:
    """Exit codes of all workers; after stop(), SIGKILLs whatever outlives the grace period.

    Polls rather than blocking in Popen.wait(): a signal handler that runs while the main
    thread is inside wait() cannot see children exit (wait() holds Popen's lock, so poll()
    in the handler says 'running'), which made every Ctrl-C last the whole grace period.
    """
    while any(p.poll() is None for p in self.procs):
      if self._kill_at is not None and time.monotonic() >= self._kill_at:
        self.signal_all(signal.SIGKILL)
        self._kill_at = None
      time.sleep(0.1)
    for pump in self._pumps:
      pump.join(timeout=5)
    return [p.returncode for p in self.procs]

  def signal_all(self, signum) -> None:
    for p in self.procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signum)
        except ProcessLookupError:
          pass

  def stop(self, grace_s: float) -> None:
    """SIGTERM now (workers checkpoint and exit 143); wait() SIGKILLs the rest after grace_s."""
    self.signal_all(signal.SIGTERM)
    if self._kill_at is None:
      self._kill_at = time.monotonic() + grace_s


def exit_code(codes) -> int:
  """0 when every worker succeeded, else the first failure's code (negative signals -> 128+n)."""
  for code in codes:
    if code:
      return 128 - code if code < 0 else code
  return 0


def main(argv):
  trainer_args = argv[1:]
  if FLAGS.workers < 1:
    sys.stderr.write(f"FATAL --workers must be >= 1, got {FLAGS.workers}.\n")
    sys.exit(2)
  cluster = Cluster(FLAGS.workers, trainer_args, FLAGS.threads_per_worker)
  for i, (proc, address) in enumerate(zip(cluster.procs, cluster.addresses)):
    print(f"[launcher] worker:{i} pid {proc.pid} on {address}", flush=True)

  def on_signal(signum, frame):
    print(f"[launcher] signal {signum}: stopping workers (grace {FLAGS.shutdown_grace_s:.0f}s)",
          flush=True)
    cluster.stop(FLAGS.shutdown_grace_s)

  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGTERM, on_signal)
  codes = cluster.wait()
  print(f"[launcher] exit codes: {codes}", flush=True)
  sys.exit(exit_code(codes))


if __name__ == "__main__":
  app.run(main)

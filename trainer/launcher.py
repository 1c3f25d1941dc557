"""Local cluster rehearsal: `python -m trainer.launcher --workers=N -- <trainer flags>` on 127.0.0.1.

--evaluator adds a side-car evaluator process; --max_restarts=K relaunches the whole job after a
retryable exit, at most K times, as torchrun --max-restarts does. Every process dies with the
launcher (even by kill -9), and every wait is bounded."""

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

from trainer import cli
from trainer import config as config_lib
from trainer.runtime import cores

FLAGS = flags.FLAGS
# After one worker fails, the others get this long to exit by themselves before SIGTERM.
SETTLE_S = 10.0
# Exits after which a relaunch can succeed: 143, the trainer's retryable code and SIGTERM's, and
# 137, SIGKILL's (kill -9, the OOM killer), which a trainer cannot report; all others are
# permanent (trainer/errors.py). Unlike the Kubeflow operator, which retries every code >= 128
# (v1.7-v1.9 pkg/util/train/train_util.go IsRetryableExitCode): Ctrl-C (130) stops the launcher
# itself, and a crash by signal (139, 134) is a bug a relaunch would repeat.
RETRYABLE_EXIT_CODES = (137, 143)
# After the last worker, the evaluator has --evaluator_timeout_s plus this long (for a hung or
# SIGSTOPped one; its own timeout is for a checkpoint that never comes), then it is stopped: 143.
EVALUATOR_MARGIN_S = 60.0
EXIT_EVALUATOR_OVERDUE = 143  # trainer/errors.py EXIT_RETRYABLE, as for the evaluator's timeout

# Runs in each child before the trainer: asks the kernel to SIGKILL it when the launcher dies
# (prctl(2) PR_SET_PDEATHSIG = 1: kept across execve(2) of a binary without set-ID bits or
# capabilities; sent when the creating thread exits, hence the main-thread rule in Cluster),
# exits if the launcher (pid argv[1]) is already gone, then becomes `python ARGS...`. Not
# Popen's preexec_fn: unsafe once the launcher has threads (Python's subprocess docs).
_DIE_WITH_LAUNCHER = """
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
  if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
  if os.getppid() != int(sys.argv[1]):
    os._exit(128 + signal.SIGKILL)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


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


def worker_env(base_env, addresses, index: int, threads: int, evaluator: str = "",
               task_type: str = "worker") -> dict:
  """The environment of task `task_type:index`: its TF_CONFIG and a fair share of the cores.
  With an evaluator (its address), every task's TF_CONFIG lists it, as the Kubeflow training
  operator writes TF_CONFIG (pkg/controller.v1/tensorflow/tensorflow.go, genClusterSpec); the
  training tasks leave it out of their collectives (trainer/runtime/cluster.py)."""
  env = dict(base_env)
  cluster = {"worker": list(addresses)}
  if evaluator:
    cluster["evaluator"] = [evaluator]
  env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})
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
  """N trainer processes (and an evaluator), each in its own session so only we decide how they
  stop, and each killed by the kernel if the launcher dies. The evaluator is waited for and
  stopped like a worker, and gets at most evaluator_limit() after the last worker exited.
  Create it on the main thread: the kernel's parent-death signal follows the thread that
  started a child, and the main thread lives as long as the launcher."""

  def __init__(self, num_workers: int, trainer_args, threads_per_worker: int = 0,
               env=None, module: str = "trainer.task", evaluator: bool = False):
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("launcher.Cluster must be created on the main thread: its children "
                         "are killed when the thread that started them exits (PR_SET_PDEATHSIG)")
    self.names = [f"worker:{i}" for i in range(num_workers)] + (["evaluator:0"] if evaluator
                                                                 else [])
    # Aligned with names; the evaluator's address is never listened on (it only reads
    # checkpoints), but TF_CONFIG names one for it as the platforms do.
    self.addresses = [f"localhost:{p}" for p in free_ports(len(self.names))]
    threads = threads_per_worker or default_threads(num_workers, env or os.environ)
    self._lock = threading.Lock()
    self._kill_at = None  # monotonic time after which wait() SIGKILLs remaining workers
    self._stop_at = None  # after a first failure: when wait() SIGTERMs the workers still running
    self._failed = []  # indexes of workers that exited non-zero, in the order seen
    self._stopping = False  # stop() was called: exits from now on are what we asked for
    self._num_workers = num_workers
    self._evaluator_limit_s = evaluator_limit(trainer_args)
    self._evaluator_due = None  # monotonic time by which the evaluator must have exited
    self.evaluator_overdue = False  # it had not, and was stopped
    self.procs, self._pumps = [], []
    workers = self.addresses[:num_workers]
    evaluator_address = self.addresses[-1] if evaluator else ""
    for name in self.names:
      task_type, index = name.split(":")
      proc = subprocess.Popen(
          [sys.executable, "-c", _DIE_WITH_LAUNCHER, str(os.getpid()), "-m", module,
           *trainer_args],
          env=worker_env(env or os.environ, workers, int(index), threads, evaluator_address,
                         task_type),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
      pump = threading.Thread(target=_pump, args=(name, proc.stdout, self._lock), daemon=True)
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
      codes = [p.poll() for p in self.procs]
      # Exits seen in the same poll came in an unknown order; a 143 (or death by SIGTERM) is
      # most often a survivor that lost its peer, so the others come first as the likelier cause.
      failed = sorted((i for i, code in enumerate(codes) if code and i not in self._failed),
                      key=lambda i: codes[i] in (143, -signal.SIGTERM))
      for i in failed:
        self._on_failure(i, codes[i], failure_grace_s)
      if None not in codes:
        break
      self._bound_the_evaluator(codes, failure_grace_s)
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

  def _bound_the_evaluator(self, codes, grace_s: float) -> None:
    """Once every worker exited and nothing is being stopped yet, the evaluator's time runs."""
    if len(codes) == self._num_workers or self._stopping or self._stop_at is not None:
      return
    if None in codes[:self._num_workers] or codes[-1] is not None:
      return
    now = time.monotonic()
    if self._evaluator_due is None:
      self._evaluator_due = now + self._evaluator_limit_s
    elif now >= self._evaluator_due:
      self.evaluator_overdue = True
      self._say(f"evaluator:0 still running {self._evaluator_limit_s:.0f}s after the workers "
                f"finished (--evaluator_timeout_s + {EVALUATOR_MARGIN_S:.0f}s): stopping it "
                f"(SIGTERM and SIGCONT now, SIGKILL after {grace_s:.0f}s); the job exits "
                f"{EXIT_EVALUATOR_OVERDUE}")
      self.stop(grace_s)

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
    self._say(f"{self.names[index]} failed first (exit {_describe(code)}); {others} get "
              f"{SETTLE_S:.0f}s to stop on their own")
    self._stop_at = time.monotonic() + SETTLE_S

  def _running_names(self) -> str:
    return ", ".join(name for name, p in zip(self.names, self.procs) if p.poll() is None)

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


def evaluator_limit(trainer_args) -> float:
  """Seconds the evaluator may outlive the workers: the trainer's --evaluator_timeout_s (its
  default when the flags do not say, e.g. in a --flagfile) plus EVALUATOR_MARGIN_S."""
  timeout = config_lib.default("evaluator_timeout_s")
  args = list(trainer_args)
  for i, arg in enumerate(args):
    value = None
    if arg.startswith("--evaluator_timeout_s="):
      value = arg.split("=", 1)[1]
    elif arg == "--evaluator_timeout_s" and i + 1 < len(args):
      value = args[i + 1]
    if value is not None:
      try:
        timeout = float(value)
      except ValueError:
        pass  # the evaluator itself exits 2 naming the flag
  return timeout + EVALUATOR_MARGIN_S


def exit_code(codes) -> int:
  """0 when every worker succeeded, else the first failure's code (negative signals -> 128+n)."""
  for code in codes:
    if code:
      return 128 - code if code < 0 else code
  return 0


def launch(num_workers: int, trainer_args, threads_per_worker: int, shutdown_grace_s: float,
           module: str = "trainer.task", env=None, evaluator: bool = False,
           max_restarts: int = 0) -> int:
  """Runs the job until every process has exited; returns the launcher's exit code.

  After a retryable exit (RETRYABLE_EXIT_CODES) the whole job is relaunched, at most
  max_restarts times, and resumes from its newest checkpoint: torchrun's --max-restarts, whose
  agent stops every worker of the group and restarts them all (pytorch/pytorch
  torch/distributed/elastic/agent/server/api.py, SimpleElasticAgent._invoke_run). Unlike
  torchrun, a permanent exit (bad flags, bad data, NaN) ends the job at once, and so does a
  SIGINT or SIGTERM to the launcher.
  """
  stopped = []  # signals the launcher got: the user wants the job to end, not to be relaunched
  current = []  # the cluster of the attempt running now

  def on_signal(signum, frame):
    print(f"[launcher] signal {signum}: stopping workers (grace {shutdown_grace_s:.0f}s)",
          flush=True)
    stopped.append(signum)
    if current:
      current[-1].stop(shutdown_grace_s)

  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGTERM, on_signal)
  restarts = 0
  while True:
    cluster = Cluster(num_workers, trainer_args, threads_per_worker, env=env, module=module,
                      evaluator=evaluator)
    current.append(cluster)
    if stopped:  # a signal that came while the processes were being started
      cluster.stop(shutdown_grace_s)
    code, cause = _run(cluster, shutdown_grace_s)
    if code == 0 or stopped or not _relaunch(code, cause, restarts, max_restarts):
      return code
    restarts += 1


def _run(cluster: Cluster, shutdown_grace_s: float) -> tuple:
  """Waits for one attempt; (its exit code, the name of the process that failed first)."""
  for name, proc, address in zip(cluster.names, cluster.procs, cluster.addresses):
    print(f"[launcher] {name} pid {proc.pid} on {address}", flush=True)
  codes = cluster.wait(shutdown_grace_s)
  print(f"[launcher] exit codes: {codes}", flush=True)
  # The first failure is the cause; the others' codes are mostly our SIGTERM or SIGKILL.
  failures = cluster.failures
  if cluster.evaluator_overdue:
    return EXIT_EVALUATOR_OVERDUE, "evaluator:0 did not finish after the workers"
  if not failures:
    return 0, ""
  first, raw = failures[0]
  return exit_code([raw]), f"{cluster.names[first]} exited {_describe(raw)}"


def _relaunch(code: int, cause: str, restarts: int, max_restarts: int) -> bool:
  """Whether the job starts again after an attempt that failed with `code`; logs the reason."""
  if code not in RETRYABLE_EXIT_CODES:
    if max_restarts:
      _log(f"{cause}, a permanent exit: no restart, the job ends with {code}")
    return False
  if restarts >= max_restarts:
    if max_restarts:
      _log(f"{cause}, retryable, but all {max_restarts} restart(s) are used "
           f"(--max_restarts={max_restarts}): the job ends with {code}")
    return False
  _log(f"restart {restarts + 1} of at most {max_restarts}: {cause}, a retryable exit; "
       "relaunching every process, which resumes from the newest checkpoint")
  return True


def _log(message: str) -> None:
  print(f"[launcher] {message}", flush=True)


def check_flags(num_workers: int, max_restarts: int, evaluator: bool, trainer_args,
                environ) -> str:
  """'' when the launcher's flags are usable, else the message to exit 2 with."""
  if num_workers < 1:
    return f"--workers must be >= 1, got {num_workers}."
  if max_restarts < 0:
    return (f"--max_restarts must be >= 0, got {max_restarts}: give how many times to relaunch "
            "the job after a retryable exit (0: never).")
  if evaluator and not _finds_checkpoints(trainer_args, environ):
    return ("--evaluator needs the trainer's --model_dir (or --checkpoint_dir) after `--`: the "
            "evaluator reads the workers' checkpoints there, e.g. python -m trainer.launcher "
            "--workers=2 --evaluator -- --model_dir=runs/mnist-cluster")
  return ""


def _finds_checkpoints(trainer_args, environ) -> bool:
  """The trainer flags (or Vertex AI's variables) name the checkpoint dir
  (cli.evaluator_finds_checkpoints); a --flagfile may, and the evaluator checks that itself."""
  given = {arg.lstrip("-").split("=", 1)[0] for arg in trainer_args if arg.startswith("-")}
  return "flagfile" in given or cli.evaluator_finds_checkpoints(given, environ)


def _define_flags() -> None:
  """Flags exist only when the launcher is the program (importing it defines none)."""
  flags.DEFINE_integer("workers", 2, "Number of worker processes.")
  flags.DEFINE_integer("threads_per_worker", 0,
                       "Intra-op threads per worker (0: the cores this process may use, after "
                       "affinity and the container's CPU quota, divided by --workers).")
  flags.DEFINE_float("shutdown_grace_s", 30.0,
                     "After Ctrl-C, SIGTERM or a worker's failure, seconds the other workers get "
                     "to checkpoint before SIGKILL.")
  flags.DEFINE_boolean("evaluator", False, "Also start a side-car evaluator (TF_CONFIG task "
                       "type evaluator) that evaluates each new checkpoint; needs --model_dir or "
                       "--checkpoint_dir in the trainer flags.")
  flags.DEFINE_integer("max_restarts", 0, "Relaunch the whole job after a retryable exit (143, "
                       "or a process killed by SIGKILL: 137) at most this many times; it resumes "
                       "from the newest checkpoint. Any other failure ends the job at once with "
                       "its code.")


def main(argv):
  problem = check_flags(FLAGS.workers, FLAGS.max_restarts, FLAGS.evaluator, argv[1:], os.environ)
  if problem:
    sys.stderr.write(f"FATAL {problem}\n")
    sys.exit(2)
  sys.exit(launch(FLAGS.workers, argv[1:], FLAGS.threads_per_worker, FLAGS.shutdown_grace_s,
                  evaluator=FLAGS.evaluator, max_restarts=FLAGS.max_restarts))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)

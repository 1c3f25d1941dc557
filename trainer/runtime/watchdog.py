"""Every bounded wait: the start-up rendezvous, the collective watchdog, a deadline without the GIL."""

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from trainer import errors
# Standard library only (no bucket client), so the reporter child below can import it too.
from trainer.storage import retries as storage_retries

# Phase names the training loop arms (trainer/train.py): after a checkpoint the chief may still
# be uploading it while the other workers already wait in the next collective.
CHECKPOINT_PHASE = "checkpoint"
TRAIN_PHASE = "train"


def unreachable_peers(peers, timeout_s: float = 1.0) -> list:
  """Names of peers whose collective port no longer accepts connections."""
  lost = []
  for name, address in peers:
    host, port = address.rsplit(":", 1)
    try:
      with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass
    except OSError:
      lost.append(f"{name} ({address})")
  return lost


def rendezvous(own_address: str, peers, timeout_s: float, task_name: str) -> None:
  """Waits until every peer's port accepts connections, or raises naming the missing ones.

  MultiWorkerMirroredStrategy's constructor then waits for the peers inside TensorFlow while
  holding the GIL (measured: no Python thread ran while it waited), so a peer that is missing
  there is bounded by Watchdog.phase(holds_gil=True), not by the watchdog thread; waiting here
  first turns the common case, a peer not started yet, into a message that names it. Our own
  port answers meanwhile (a bare listen backlog, closed before TensorFlow binds the port).
  """
  listener = None
  try:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("", int(own_address.rsplit(":", 1)[1])))
    listener.listen(64)
  except OSError as e:
    logging.warning("Cannot listen on %s before start-up (%s); polling peers only.",
                    own_address, e)
    listener = None
  deadline = time.monotonic() + timeout_s
  try:
    missing = unreachable_peers(peers, timeout_s=0.5)
    while missing and time.monotonic() < deadline:
      time.sleep(0.5)
      missing = unreachable_peers(peers, timeout_s=0.5)
  finally:
    if listener is not None:
      listener.close()
  if missing:
    raise errors.RetryableError(
        f"{task_name}: peer(s) {', '.join(missing)} did not start within "
        f"--collective_timeout_s={timeout_s:.0f}s. Check that every task of TF_CONFIG was "
        "launched and can reach the others; the platform may retry.")


def hard_exit(message: str, code: int) -> None:
  # os._exit: a thread stuck in a collective op cannot be unwound by an exception.
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  logging.error(message)
  logging.shutdown()
  os._exit(code)


def _timeout_message(task_name: str, phase: str, waited_s: float, lost: list, note) -> str:
  if lost:
    who = ", ".join(lost)
  elif note:
    who = f"none unreachable; {note}, or a peer is stuck"
  else:
    who = "none unreachable; a peer is stuck or too slow"
  return (f"FATAL: {task_name} made no progress in phase '{phase}' for {waited_s:.0f}s "
          f"(--collective_timeout_s). Lost task(s): {who}. Exiting {errors.EXIT_RETRYABLE} so "
          "the platform restarts the job; rerun the same command to resume from the last "
          "checkpoint.")


class Watchdog:
  """Exits 143 when a phase that waits on peers makes no progress for timeout_s.

  TensorFlow's collectives can block forever when a peer is missing at start-up or dies
  mid-run; a cluster operator needs a bounded failure that names the lost task instead.

  Storage time is not peer silence: this task's own storage retries extend the running phase
  (storage_retrying, which the watchdog hands to trainer/storage/retries.py as a listener while
  it runs), and on a worker that is not the chief (is_chief=False) the phases in which the chief
  may be preflighting or uploading (start-up until the first training chunk, and the phase right
  after a checkpoint) get the storage retry deadline on top of timeout_s.
  """

  def __init__(self, peers, timeout_s: float, task_name: str, is_chief: bool = True):
    self._peers = list(peers)
    self._timeout_s = timeout_s
    self._task_name = task_name
    self._chief_storage_s, self._storage_setting = (
        (0.0, "") if is_chief or not self._peers
        else (storage_retries.retry_deadline_s(), storage_retries.RETRY_DEADLINE_ENV))
    # Why the chief may be away from the collectives right now (None: it is not).
    self._chief_busy = ("the chief may still be starting up (storage preflight, checkpoint "
                        "download)")
    self._lock = threading.Lock()
    self._phase = None
    self._armed_at = None
    self._deadline = None
    self._note = None  # what slow storage explains, for the message
    self._stop = threading.Event()
    self._thread = None
    if self._peers:
      self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
      self._thread.start()
      storage_retries.add_listener(self.storage_retrying)

  def arm(self, phase: str, timeout_s: float = None) -> None:
    with self._lock:
      allowed = timeout_s or self._timeout_s
      self._note = None
      if self._chief_storage_s and self._chief_busy:
        allowed += self._chief_storage_s
        self._note = (f"{self._chief_busy} (this phase allowed {self._storage_setting}="
                      f"{self._chief_storage_s:.0f}s on top for the chief's storage retries)")
      self._phase = phase
      self._armed_at = time.monotonic()
      self._deadline = self._armed_at + allowed

  def disarm(self) -> None:
    with self._lock:
      if self._phase == CHECKPOINT_PHASE:
        self._chief_busy = "the chief may still be uploading the checkpoint"
      elif self._phase == TRAIN_PHASE:
        self._chief_busy = None  # a finished chunk means the chief is back in the collectives
      self._phase = None
      self._deadline = None

  def extend(self, reason: str, seconds: float) -> None:
    """Something known to be slow (not a peer) may take `seconds` more in the armed phase.

    The deadline moves to at least `seconds` plus a full timeout from now, so the peers still
    get timeout_s once it is done; if it fires anyway, the message names `reason`.
    """
    with self._lock:
      if self._deadline is None:
        return
      self._deadline = max(self._deadline, time.monotonic() + seconds + self._timeout_s)
      self._note = reason

  def storage_retrying(self, what: str, remaining_s: float) -> None:
    """Storage's retry listener (trainer/storage/retries.py): this task's storage is retrying
    `what` for up to remaining_s more; slow storage is not a silent peer."""
    self.extend(f"storage was slow in this phase ({what} was retrying)", remaining_s)

  @contextlib.contextmanager
  def phase(self, name: str, timeout_s: float = None, holds_gil: bool = False):
    """`with watchdog.phase(name):` arms on entry and disarms on exit; not nestable.

    holds_gil: the phase blocks in C code that keeps the GIL (creating MultiWorkerMirroredStrategy),
    where this watchdog's thread cannot run; then a _GilFreeDeadline enforces the same deadline.
    """
    self.arm(name, timeout_s)
    guard = None
    if holds_gil and self._peers:
      with self._lock:
        seconds, note = self._deadline - self._armed_at, self._note
      guard = _GilFreeDeadline(seconds, {"task_name": self._task_name, "phase": name,
                                         "peers": self._peers, "note": note})
    try:
      yield self
    finally:
      if guard is not None:
        guard.cancel()
      self.disarm()

  def close(self) -> None:
    self._stop.set()
    storage_retries.remove_listener(self.storage_retrying)

  def _run(self) -> None:
    while not self._stop.wait(0.5):
      with self._lock:
        phase, armed_at, deadline, note = self._phase, self._armed_at, self._deadline, self._note
      if deadline is not None and time.monotonic() > deadline:
        hard_exit(_timeout_message(self._task_name, phase, time.monotonic() - armed_at,
                                    unreachable_peers(self._peers), note), errors.EXIT_RETRYABLE)


# ------------------------------------------------------------- deadlines the GIL cannot stop

# Seconds between the reporter's message and the libc timer's _exit: time to check the peers.
_REPORT_S = 2.0
# The reporter SIGKILLs the trainer this much later if it is still there (no libc timer).
_KILL_AFTER_S = 3.0
_CLOCK_MONOTONIC = 1
_SIGEV_THREAD = 2


class _Timespec(ctypes.Structure):
  _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
  _fields_ = [("interval", _Timespec), ("value", _Timespec)]


class _SigEvent(ctypes.Structure):
  # Linux struct sigevent (64 bytes): sigval, signo, notify, then a union whose SIGEV_THREAD
  # member is (function, attributes).
  _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
              ("function", ctypes.c_void_p), ("attributes", ctypes.c_void_p),
              ("_pad", ctypes.c_char * 32)]


def _libc_timer_functions():
  """(timer_create, timer_settime, timer_delete, _exit) from libc, or None where unsupported."""
  # The layout above, and passing sigval's int in a register, hold on little-endian 64-bit Linux.
  if not sys.platform.startswith("linux") or sys.byteorder != "little" or (
      ctypes.sizeof(ctypes.c_void_p) != 8):
    return None
  for name in (None, "librt.so.1"):  # glibc < 2.34 has the timer functions in librt
    try:
      lib = ctypes.CDLL(name, use_errno=True)
      create, settime, delete, exit_function = (lib.timer_create, lib.timer_settime,
                                                lib.timer_delete, lib._exit)
    except (OSError, AttributeError):
      continue
    create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    delete.argtypes = [ctypes.c_void_p]
    return create, settime, delete, exit_function
  return None


def _start_exit_timer(seconds: float, code: int):
  """Makes a libc timer thread call _exit(code) in `seconds`; returns its cancel(), or None."""
  functions = _libc_timer_functions()
  if functions is None:
    return None
  create, settime, delete, exit_function = functions
  event = _SigEvent(value=code, notify=_SIGEV_THREAD,
                    function=ctypes.cast(exit_function, ctypes.c_void_p).value)
  timer = ctypes.c_void_p()
  if create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
    logging.warning("timer_create failed (errno %d): no exit timer.", ctypes.get_errno())
    return None
  spec = _ITimerSpec(value=_Timespec(int(seconds), int(seconds % 1 * 1e9)))
  if settime(timer, 0, ctypes.byref(spec), None) != 0:
    logging.warning("timer_settime failed (errno %d): no exit timer.", ctypes.get_errno())
    delete(timer)
    return None
  return lambda: delete(timer)


def _start_reporter(args: dict):
  """The child process that prints the FATAL message at the deadline; None if it cannot start."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  try:
    # -S: the reporter needs only the standard library and trainer modules built on it alone.
    return subprocess.Popen(
        [sys.executable, "-S", "-m", "trainer.runtime.watchdog", json.dumps(args)],
        stdin=subprocess.PIPE, env=env)
  except OSError as e:
    logging.warning("Cannot start the watchdog reporter (%s): a timeout will exit silently.", e)
    return None


class _GilFreeDeadline:
  """Exits 143 at a deadline even while a C call holds the GIL and no Python thread can run.

  Measured with TensorFlow 2.21: MultiWorkerMirroredStrategy's constructor waited minutes for a
  peer that never joined with no Python thread running, and TensorFlow had installed its own
  SIGTERM handler, so neither the Watchdog thread nor SIGTERM ended it. Neither helper here needs
  this process's GIL: a child process prints the message at the deadline, and a libc timer
  thread calls _exit(143) _REPORT_S later. Where that timer is unavailable, the child SIGKILLs
  this process instead (exit 137).
  """

  def __init__(self, seconds: float, report: dict):
    self._deadline = time.monotonic() + seconds
    self._report = report
    self._cancel_timer = _start_exit_timer(seconds + _REPORT_S, errors.EXIT_RETRYABLE)
    self._reporter = _start_reporter(dict(report, deadline=self._deadline, parent=os.getpid(),
                                          timer=self._cancel_timer is not None, seconds=seconds))

  def cancel(self) -> None:
    if time.monotonic() >= self._deadline:
      # The reporter has announced the exit (or is about to): keep its word.
      hard_exit(f"FATAL: phase '{self._report['phase']}' ended after its deadline; exiting "
                 f"{errors.EXIT_RETRYABLE} as announced.", errors.EXIT_RETRYABLE)
    if self._cancel_timer is not None:
      self._cancel_timer()
      self._cancel_timer = None
    if self._reporter is not None:
      self._reporter.stdin.close()  # EOF: the reporter exits quietly
      try:
        self._reporter.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._reporter.kill()
        self._reporter.wait(timeout=5)
      self._reporter = None


def _parent_done(timeout_s: float) -> bool:
  """True once stdin (the trainer's pipe) reaches EOF: the phase ended, or the trainer is gone."""
  ready, _, _ = select.select([sys.stdin.fileno()], [], [], max(0.0, timeout_s))
  return bool(ready)


def _report_at_deadline(args: dict) -> int:
  """The reporter child: silent if the phase ends in time; else the message, then the backstop."""
  while time.monotonic() < args["deadline"]:
    if _parent_done(args["deadline"] - time.monotonic()):
      return 0
  if _parent_done(0):  # the phase ended just as the deadline passed
    return 0
  lost = unreachable_peers([tuple(p) for p in args["peers"]], timeout_s=0.2)
  sys.stderr.write(_timeout_message(args["task_name"], args["phase"], args["seconds"], lost,
                                    args["note"]) + "\n")
  sys.stderr.flush()
  if not _parent_done(_REPORT_S + _KILL_AFTER_S if args["timer"] else 0):
    try:
      os.kill(args["parent"], signal.SIGKILL)
    except ProcessLookupError:
      pass
  return 0


if __name__ == "__main__":
  sys.exit(_report_at_deadline(json.loads(sys.argv[1])))

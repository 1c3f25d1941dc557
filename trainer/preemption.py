"""Preemption and hang protection: SIGTERM becomes an agreed stop, a silent peer a bounded exit 143."""

import logging
import os
import signal
import socket
import sys
import threading
import time

from trainer import errors


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

  MultiWorkerMirroredStrategy's constructor blocks inside TensorFlow while holding the GIL, so
  no Python watchdog can interrupt it; waiting here first keeps start-up bounded. Our own port
  answers meanwhile (a bare listen backlog, closed before TensorFlow binds the port).
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


def _hard_exit(message: str, code: int) -> None:
  # os._exit: a thread stuck in a collective op cannot be unwound by an exception.
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  logging.error(message)
  logging.shutdown()
  os._exit(code)


class Watchdog:
  """Exits 143 when a phase that waits on peers makes no progress for timeout_s.

  TensorFlow's collectives can block forever when a peer is missing at start-up or dies
  mid-run; a cluster operator needs a bounded failure that names the lost task instead.
  """

  def __init__(self, peers, timeout_s: float, task_name: str):
    self._peers = list(peers)
    self._timeout_s = timeout_s
    self._task_name = task_name
    self._lock = threading.Lock()
    self._phase = None
    self._deadline = None
    self._stop = threading.Event()
    self._thread = None
    if self._peers:
      self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
      self._thread.start()

  def arm(self, phase: str, timeout_s: float = None) -> None:
    with self._lock:
      self._phase = phase
      self._deadline = time.monotonic() + (timeout_s or self._timeout_s)

  def disarm(self) -> None:
    with self._lock:
      self._phase = None
      self._deadline = None

  def close(self) -> None:
    self._stop.set()

  def _run(self) -> None:
    while not self._stop.wait(0.5):
      with self._lock:
        phase, deadline = self._phase, self._deadline
      if deadline is not None and time.monotonic() > deadline:
        lost = unreachable_peers(self._peers)
        who = ", ".join(lost) if lost else "none unreachable; a peer is stuck or too slow"
        _hard_exit(
            f"FATAL: {self._task_name} made no progress in phase '{phase}' for "
            f"{self._timeout_s:.0f}s (--collective_timeout_s). Lost task(s): {who}. Exiting "
            f"{errors.EXIT_RETRYABLE} so the platform restarts the job; rerun the same command "
            "to resume from the last checkpoint.", errors.EXIT_RETRYABLE)


class PreemptionHandler:
  """Turns SIGTERM into a flag the training loop votes on, with a hard deadline as backstop."""

  def __init__(self, grace_s: float):
    self._grace_s = grace_s
    self.requested = threading.Event()
    self._previous = None

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    if self.requested.is_set():
      return
    logging.warning("SIGTERM received: saving a checkpoint at an agreed step, then exiting %d "
                    "(grace %.0fs).", errors.EXIT_RETRYABLE, self._grace_s)
    self.requested.set()
    timer = threading.Timer(self._grace_s, _hard_exit, args=(
        f"FATAL: no clean stop within --preemption_grace_s={self._grace_s:.0f}s after SIGTERM; "
        f"exiting {errors.EXIT_RETRYABLE}.", errors.EXIT_RETRYABLE))
    timer.daemon = True
    timer.start()

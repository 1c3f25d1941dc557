"""Preemption: SIGTERM becomes a stop the workers agree on, with a hard deadline as backstop."""

import logging
import signal
import threading

from trainer import errors
from trainer.runtime import watchdog


class PreemptionHandler:
  """Turns SIGTERM into a flag the training loop votes on, with a hard deadline as backstop."""

  def __init__(self, grace_s: float):
    self._grace_s = grace_s
    self.requested = threading.Event()
    self._previous = None
    self._backstop = None

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def uninstall(self) -> None:
    # The run is over (cleanly or not): its forced exit must not hit whatever runs next in this
    # process, such as the next cell of a notebook.
    if self._backstop is not None:
      self._backstop.cancel()
      self._backstop = None
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    if self.requested.is_set():
      return
    logging.warning("SIGTERM received: saving a checkpoint at an agreed step, then exiting %d "
                    "(grace %.0fs).", errors.EXIT_RETRYABLE, self._grace_s)
    self.requested.set()
    self._backstop = threading.Timer(self._grace_s, watchdog.hard_exit, args=(
        f"FATAL: no clean stop within --preemption_grace_s={self._grace_s:.0f}s after SIGTERM; "
        f"exiting {errors.EXIT_RETRYABLE}.", errors.EXIT_RETRYABLE))
    self._backstop.daemon = True
    self._backstop.start()

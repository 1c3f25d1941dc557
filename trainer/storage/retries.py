"""How long storage retries a failing request, and who is told while it does.

Standard library only: the collective watchdog (trainer/runtime/watchdog.py) registers here and
reads the deadline without loading the bucket transport (trainer/storage/gcs.py) or its Google
libraries. Storage sits below the runtime, so the tie is a callback the watchdog hands in
(add_listener), never an import of the runtime from here.
"""

import logging
import os
import random
import re
import threading
import time

from trainer import errors

_LOG = logging.getLogger(__name__)
RETRY_DEADLINE_ENV = "TRAINER_STORAGE_RETRY_DEADLINE_S"
DEFAULT_RETRY_DEADLINE_S = 60.0

_INITIAL_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 10.0
# Jitter spreads the retries of many workers hitting the same outage. It has its own random
# source: drawing from Python's global one would change a seeded run's weights.
_JITTER = random.Random()
_URL_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")

# listener(what, remaining_s) callables; a set because a notebook may run several watchdogs.
_listeners = set()
_listeners_lock = threading.Lock()


def retry(fn, what: str, is_transient):
  """fn() retried while is_transient(error) and the deadline allows; other errors propagate at once.

  The deadline ($TRAINER_STORAGE_RETRY_DEADLINE_S, default 60 s) counts from the first failure,
  not from the start, so that a long transfer that fails late still gets a full retry budget.
  Out of time: RetryableError (exit 143, the platform reruns the job). Before each wait every
  listener hears (what, seconds the retries may still take).
  """
  deadline_s = retry_deadline_s()
  first_failure = None
  attempt = 0
  while True:
    try:
      return fn()
    except Exception as exc:  # pylint: disable=broad-except
      if not is_transient(exc):
        raise
      now = time.monotonic()
      first_failure = now if first_failure is None else first_failure
      attempt += 1
      remaining = first_failure + deadline_s - now
      if remaining <= 0:
        raise errors.RetryableError(
            f"{what}: still failing after {attempt} attempts over {deadline_s:.0f} s "
            f"(last: {describe(exc)})") from exc
      delay = min(remaining, _backoff_s(attempt))
      _LOG.warning("%s failed (%s); retry %d in %.2f s", what, describe(exc), attempt, delay)
      _notify(what, remaining)
      time.sleep(delay)


def retry_deadline_s() -> float:
  """Seconds storage keeps retrying a failing request; ConfigError for a value that is no number."""
  raw = os.environ.get(RETRY_DEADLINE_ENV)
  if not raw:
    return DEFAULT_RETRY_DEADLINE_S
  try:
    return max(0.0, float(raw))
  except ValueError as exc:
    raise errors.ConfigError(f"{RETRY_DEADLINE_ENV}={raw!r} is not a number of seconds") from exc


def add_listener(listener) -> None:
  """listener(what, remaining_s) is called before each retry's wait, from the retrying thread:
  slow storage is not a silent peer (the collective watchdog extends its phase)."""
  with _listeners_lock:
    _listeners.add(listener)


def remove_listener(listener) -> None:
  """Forgets a listener (one never added is ignored)."""
  with _listeners_lock:
    _listeners.discard(listener)


def describe(exc: BaseException) -> str:
  """A one-line description safe to log: URLs lose their query strings (signatures, ids)."""
  text = _URL_QUERY.sub(r"\1", f"{type(exc).__name__}: {exc}")
  return text if len(text) <= 300 else text[:297] + "..."


def _notify(what: str, remaining_s: float) -> None:
  with _listeners_lock:
    listeners = list(_listeners)
  for listener in listeners:
    listener(what, remaining_s)


def _backoff_s(attempt: int) -> float:
  cap = min(_MAX_BACKOFF_S, _INITIAL_BACKOFF_S * 2 ** (attempt - 1))
  return _JITTER.uniform(cap / 2, cap)

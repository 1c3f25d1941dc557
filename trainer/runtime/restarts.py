"""The trainer's own cap on platform restarts: each start of a run is counted in its checkpoint dir."""

import json
import logging
import os
import socket
import time

from trainer import errors
from trainer import storage

FILE_NAME = "job_starts.json"


def record_start(checkpoint_dir: str, max_job_restarts: int, start_step: int) -> int:
  """Counts this start; raises RestartsExhaustedError past max_job_restarts restarts (0: no cap).

  Platforms retry exit 143 without end (a TFJob with restartPolicy ExitCode recreates the pod
  every time); this count survives pods and VMs because it lives beside the checkpoints.
  Returns how many starts, this one included, the unfinished run has had.
  """
  path = storage.join(checkpoint_dir, FILE_NAME)
  starts = _read(path)
  starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "host": socket.gethostname(), "pid": os.getpid(), "start_step": start_step})
  restarts = len(starts) - 1
  if max_job_restarts and restarts > max_job_restarts:
    raise errors.RestartsExhaustedError(
        f"This run has been started {len(starts)} times without finishing (first at "
        f"{starts[0]['time']}, last resumed at step {starts[-2]['start_step']}), more than "
        f"--max_job_restarts={max_job_restarts} restarts: stopping for good instead of another "
        f"retry. Read the earlier attempts' logs for why they stopped; to allow more, raise "
        f"--max_job_restarts or delete {path}.")
  storage.write_text(path, json.dumps({"starts": starts}, indent=1) + "\n")
  if restarts:
    logging.warning("Start %d of this run (restart %d%s).", len(starts), restarts,
                    f" of at most {max_job_restarts}" if max_job_restarts else "")
  return len(starts)


def record_finish(checkpoint_dir: str) -> None:
  """A finished run starts its count afresh."""
  path = storage.join(checkpoint_dir, FILE_NAME)
  try:
    storage.remove(path)
  except FileNotFoundError:
    pass


def _read(path: str) -> list:
  found = storage.read_json(path, {})
  starts = found.get("starts", []) if isinstance(found, dict) else []
  return [s for s in starts if isinstance(s, dict)] if isinstance(starts, list) else []

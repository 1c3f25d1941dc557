"""Where a run's wall-clock time goes: start-up, data, build+trace, train, evaluate, export."""

import logging
import os
import time


class Phases:
  """Marks the end of each phase; the first phase starts when the process started."""

  def __init__(self, started: float | None = None):
    self._started = process_start_time() if started is None else started
    self._last = self._started
    self.seconds = {}  # phase name -> seconds, in the order the phases ended

  def end(self, name: str) -> None:
    """Ends phase `name` now (time since the previous end is added to it)."""
    now = time.time()
    self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, now - self._last)
    self._last = now

  def total(self) -> float:
    return max(0.0, self._last - self._started)

  def summary(self) -> str:
    parts = [f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items()]
    return "phases: " + ", ".join(parts + [f"total {self.total():.1f} s"])

  def as_metrics(self) -> dict:
    return {"phase_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "wall_seconds": round(self.total(), 3)}


def process_start_time() -> float:
  """When this process started (Linux /proc; elsewhere, the first call of this function)."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    ticks_since_boot = int(fields[19])  # field 22 of stat(5), counted after "(comm)"
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks_since_boot / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    logging.debug("No /proc: phases start at the first measurement.")
    return time.time()

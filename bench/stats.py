"""Pure helpers for medians, ratios and pass/fail targets (no TensorFlow, unit-tested)."""

import dataclasses
import math
import statistics
from typing import Iterable, Optional


def median_with_failures(values: Iterable[Optional[float]]) -> float:
  """Median where a failed trial (None) counts as +inf, so failures can only make it worse."""
  values = [math.inf if v is None else float(v) for v in values]
  return statistics.median(values) if values else math.nan


def ratio(numerator: float, denominator: float) -> float:
  """numerator / denominator with the edge cases spelled out instead of raising."""
  if numerator is None or denominator is None:
    return math.nan
  if math.isnan(numerator) or math.isnan(denominator):
    return math.nan
  if math.isinf(numerator) and math.isinf(denominator):
    return math.nan  # Neither side finished: no ratio.
  if denominator == 0 or math.isinf(numerator):
    return math.inf if numerator > 0 else math.nan
  if math.isinf(denominator):
    return 0.0
  return numerator / denominator


@dataclasses.dataclass(frozen=True)
class Target:
  """A metric's goal: value >= threshold passes; no threshold means informational only."""

  name: str
  threshold: Optional[float]
  description: str

  def status(self, value: Optional[float]) -> str:
    if self.threshold is None:
      return "info"
    if value is None or math.isnan(value):
      return "N/A"
    return "PASS" if value >= self.threshold else "FAIL"


TARGETS = (
    Target("time_to_99_ratio", 10.0,
           "reference time to 99% test accuracy / ours (median over seeds)"),
    Target("same_model_throughput_ratio", 1.0,
           "our images/s / Keras fit images/s, same model and batch"),
    Target("input_headroom", 20.0, "input pipeline images/s / our training images/s"),
    Target("fraction_of_peak", 0.5, "achieved training FLOP/s / CPU FP32 peak"),
    Target("compute_bound_fraction_of_peak", None,
           "as fraction_of_peak, for a FLOP-heavy model of deep convolutions (no target)"),
    Target("two_worker_ratio", 0.8, "2 workers (launcher, loopback) / 1 worker, same cores, "
           "same per-worker batch"),
    Target("two_worker_same_global_batch_ratio", None,
           "as two_worker_ratio, but the 2 workers split one worker's global batch (no target)"),
    Target("two_device_ratio", None, "MirroredStrategy 2 logical CPUs / 1 device (no target)"),
)


def target(name: str) -> Target:
  for t in TARGETS:
    if t.name == name:
      return t
  raise KeyError(name)

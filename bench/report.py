"""Pure parts of the benchmark: medians and ratios, targets with PASS/FAIL, the progress line and
the markdown report (no TensorFlow, unit-tested)."""

import dataclasses
import math
import statistics
from typing import Optional


def median_with_failures(values) -> float:
  """Median where a failed trial (None) counts as +inf, so failures can only make it worse."""
  values = [math.inf if v is None else float(v) for v in values]
  return statistics.median(values) if values else math.nan


def ratio(numerator, denominator) -> float:
  """numerator / denominator with the edge cases spelled out instead of raising."""
  if numerator is None or denominator is None or math.isnan(numerator) or math.isnan(denominator):
    return math.nan
  if math.isinf(numerator) and math.isinf(denominator):
    return math.nan  # neither side finished
  if denominator == 0 or math.isinf(numerator):
    return math.inf if numerator > 0 else math.nan
  return 0.0 if math.isinf(denominator) else numerator / denominator


_OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}


@dataclasses.dataclass(frozen=True)
class Target:
  """A row's goal. kind: 'target' (PASS/FAIL), 'aim' (a goal reported, not a pass mark: 'aim
  met'/'aim missed') or 'info' (no goal)."""

  name: str
  op: Optional[str]
  threshold: Optional[float]
  kind: str = "target"

  def status(self, value) -> str:
    if self.kind == "info" or self.op is None:
      return "info"
    if value is None or isinstance(value, str) or math.isnan(value):
      return "N/A"
    met = _OPS[self.op](value, self.threshold)
    if self.kind == "aim":
      return "aim met" if met else "aim missed"
    return "PASS" if met else "FAIL"

  def goal(self) -> str:
    return "-" if self.op is None else f"{self.op} {fmt(float(self.threshold), 2)}"


def fmt(value, digits: int = 2) -> str:
  """A number for a table cell: '-' when missing, 'inf' when unbounded."""
  if value is None or value == "":
    return "-"
  if isinstance(value, str):
    return value
  if isinstance(value, float) and math.isnan(value):
    return "-"
  if isinstance(value, float) and math.isinf(value):
    return "inf" if value > 0 else "-inf"
  if isinstance(value, float):
    return f"{value:,.{digits}f}"
  return f"{value:,}" if isinstance(value, int) else str(value)


def json_safe(value):
  """NaN becomes None and infinities strings, so results.json stays strict JSON."""
  if isinstance(value, float):
    if math.isnan(value):
      return None
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else value
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def mmss(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}:{seconds % 60:02d}"


def eta(elapsed_s: float, done_estimate_s: float, remaining_estimate_s: float) -> float:
  """Seconds left: the remaining jobs' estimates, scaled by how the finished ones compared."""
  scale = elapsed_s / done_estimate_s if done_estimate_s > 0 and elapsed_s > 0 else 1.0
  return remaining_estimate_s * scale


def progress_line(done: int, total: int, elapsed_s: float, eta_s: float, name: str,
                  text: str) -> str:
  return (f"[bench {done}/{total} {mmss(elapsed_s)} elapsed, ETA {mmss(eta_s)}] "
          f"{name}: {text}")


def table(headers, rows) -> str:
  """A GitHub markdown table; cells are escaped so a '|' in a note cannot break it."""
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(headers), line(["---"] * len(headers))] + [line(r) for r in rows])


def targets_table(targets, metrics: dict) -> str:
  rows = []
  for t in targets:
    m = metrics.get(t.name)
    if m is not None:
      rows.append([t.name, fmt(m.get("value"), 3), t.goal(), m.get("status", "N/A"),
                   m.get("basis", "")])
  return table(["metric", "value", "target", "status", "basis"], rows)


def runs_table(runs: list) -> str:
  rows = []
  for r in runs:
    s = r.get("summary", {})
    rows.append([r["name"], fmt(r.get("wall_s"), 1), fmt(r.get("max_rss_mb"), 0),
                 fmt(s.get("images_per_sec"), 0), fmt(s.get("wall_to_99_s"), 1),
                 fmt(s.get("final_accuracy"), 4), fmt(r.get("others_cpu"), 2),
                 "ok" if r.get("ok") else r.get("error", "failed")])
  return table(["run", "wall s", "peak RSS MB", "images/s", "wall s to 99%", "final test acc",
                "other procs' CPU", "status"], rows)


def markdown(results: dict, targets) -> str:
  """The whole report: machine, targets with PASS/FAIL, every run's absolute numbers, notes."""
  meta = results["meta"]
  lines = [
      "# Benchmark results", "",
      f"- Started {meta['started']}, {fmt(meta.get('wall_s'), 0)} s total, mode "
      f"**{meta['mode']}**" + (f", only {meta['only']}" if meta.get("only") else ""),
      f"- CPU: {meta['cpu']}, {meta['cores']} cores; TensorFlow {meta['tf_version']}, Keras "
      f"{meta['keras_version']}, Python {meta['python']}; code {meta.get('code', '-')}",
      f"- Other processes used {fmt(meta.get('others_cpu_max'), 2)} of the machine at worst "
      "during a measurement (0 = idle, 1 = every core busy); see the runs table.",
      "", "## Targets", "", targets_table(targets, results["metrics"]), "",
      "## Runs", "", runs_table(results["runs"]), "",
  ]
  notes = results.get("notes", [])
  if notes:
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)

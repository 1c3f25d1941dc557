"""Turns the results dict into JSON-safe data and a markdown report (pure, unit-tested)."""

import math

from bench import stats


def json_safe(value):
  """NaN becomes None and infinities become strings, so results.json stays strict JSON."""
  if isinstance(value, float):
    if math.isnan(value):
      return None
    if math.isinf(value):
      return "inf" if value > 0 else "-inf"
    return value
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def fmt(value, digits: int = 2) -> str:
  """A number for a table cell: '-' when missing, 'inf' when unbounded."""
  if value is None or value == "":
    return "-"
  if isinstance(value, str):
    return value
  if isinstance(value, float) and math.isnan(value):
    return "-"
  if isinstance(value, float) and math.isinf(value):
    return "inf"
  if isinstance(value, float):
    return f"{value:,.{digits}f}"
  return f"{value:,}" if isinstance(value, int) else str(value)


def table(headers, rows) -> str:
  """A GitHub markdown table; cells are escaped so a '|' in a note cannot break it."""
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(headers), line(["---"] * len(headers))] + [line(r) for r in rows])


def targets_table(metrics: dict) -> str:
  rows = []
  for t in stats.TARGETS:
    m = metrics.get(t.name)
    if m is None:
      continue
    threshold = "-" if t.threshold is None else f">= {fmt(float(t.threshold), 1)}"
    rows.append([t.name, fmt(m.get("value"), 3), threshold, m.get("status", "N/A"),
                 m.get("basis", "")])
  return table(["metric", "value", "target", "status", "basis"], rows)


def runs_table(runs: list) -> str:
  rows = []
  for r in runs:
    s = r.get("summary", {})
    cpu = r.get("cpu", {})
    rows.append([r["name"], fmt(s.get("images_per_sec"), 0), fmt(s.get("time_to_99_s"), 1),
                 fmt(s.get("final_accuracy"), 4), fmt(cpu.get("wall_s"), 0),
                 fmt(cpu.get("others_cpu"), 2), "ok" if r.get("ok") else r.get("error", "failed")])
  return table(["run", "images/s", "train s to 99%", "final test acc", "wall s",
                "other procs' CPU", "status"], rows)


def markdown(results: dict) -> str:
  """The whole report: machine, targets with PASS/FAIL, every run's absolute numbers, notes."""
  meta = results["meta"]
  lines = [
      "# Benchmark results", "",
      f"- Started {meta['started']}, {fmt(meta.get('wall_s'), 0)} s total, mode "
      f"**{meta['mode']}**" + (f", only {meta['only']}" if meta.get("only") else ""),
      f"- CPU: {meta['cpu_model']} (family {meta['cpu_family']} model {meta['cpu_model_id']}), "
      f"{meta['cores']} cores, {fmt(meta['clock_ghz'], 3)} GHz used for peak",
      f"- FP32 peak {fmt(meta['peak_gflops'], 1)} GFLOP/s: {meta['peak_assumption']}",
      f"- TensorFlow {meta['tf_version']}, Keras {meta['keras_version']}, "
      f"Python {meta['python']}",
      f"- Other processes used {fmt(meta.get('others_cpu_max'), 2)} of the machine at worst "
      "during a measurement (0 = idle, 1 = both cores busy); see the last column below.",
      "", "## Targets", "", targets_table(results["metrics"]), "",
      "## Runs (absolute numbers)", "", runs_table(results["runs"]), "",
  ]
  notes = results.get("notes", [])
  if notes:
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)

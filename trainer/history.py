"""What each stretch of a run trained with, when a resumed run differs from its first start.

A run preempted on a CPU with native bfloat16 and rescheduled onto one without trains its first
steps in mixed_bfloat16 and the rest in float32 (`--precision=auto` picks per machine).
metrics.json must say so, not name the last policy alone; the record lives beside the
checkpoints (it outlives pods and VMs, as they do) and only the chief writes it.
"""

import json

from trainer import storage

FILE_NAME = "precision_history.json"


def record_start(checkpoint_dir: str, start_step: int, precision: str) -> None:
  """Notes that steps from start_step on train with `precision`. Segments at or past
  start_step are dropped first: a run resumed from an older checkpoint, or started over,
  retrains those steps."""
  path = storage.join(checkpoint_dir, FILE_NAME)
  segments = [s for s in _read(path) if s["from_step"] < start_step]
  if not segments or segments[-1]["precision"] != precision:
    segments.append({"from_step": start_step, "precision": precision})
  storage.write_text(path, json.dumps({"segments": segments}, indent=1) + "\n")


def summary(checkpoint_dir: str, final_step: int, precision: str) -> dict:
  """metrics.json's `precision` (the one policy, or each stretch's: "mixed_bfloat16 (steps
  1-20), float32 (steps 21-30)") and `precision_segments` ([{"steps": [first, last],
  "precision": ...}], steps counted from 1). `precision` is this run's policy, the answer
  when no record exists (e.g. it was deleted)."""
  segments = _read(storage.join(checkpoint_dir, FILE_NAME)) or [
      {"from_step": 0, "precision": precision}]
  ranges = []
  for i, segment in enumerate(segments):
    last = segments[i + 1]["from_step"] if i + 1 < len(segments) else final_step
    if last > segment["from_step"]:
      ranges.append({"steps": [segment["from_step"] + 1, last],
                     "precision": segment["precision"]})
  names = {r["precision"] for r in ranges}
  if len(names) <= 1:
    text = names.pop() if names else precision
  else:
    text = ", ".join(f"{r['precision']} (steps {r['steps'][0]}-{r['steps'][1]})" for r in ranges)
  return {"precision": text, "precision_segments": ranges}


def _read(path: str) -> list:
  """The recorded segments, oldest first; [] for a missing or unreadable record."""
  found = storage.read_json(path, {})
  segments = found.get("segments", []) if isinstance(found, dict) else []
  if not isinstance(segments, list):
    return []
  return [s for s in segments if isinstance(s, dict) and isinstance(s.get("from_step"), int)
          and isinstance(s.get("precision"), str)]

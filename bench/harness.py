"""Bench: runs the trainer and probes as fresh subprocesses and summarizes each run."""

import hashlib
import os
import subprocess

from bench import procs
from bench import report
from bench import stats
from trainer import config as config_lib

THRESHOLD = 0.99
BATCH = 128  # The keras.io reference recipe's batch.
DEFAULT_BATCH = config_lib.Config(epochs=1).global_batch_size  # Our default recipe's batch.
EVAL_IMAGES = 60 * BATCH  # Our test-set evaluation cadence, in training images.
# The keras.io convnet, layer for layer, in the trainer's model family.
SAME_MODEL = {"model_widths": (32, 64), "kernel_sizes": (3, 3), "pool_sizes": (2, 2),
              "conv_padding": "valid", "space_to_depth": 1, "batch_norm": False, "dropout": 0.5,
              "dense_units": 0}
# A model whose FLOPs sit in deep 14x14 convolutions (2x2 pixels folded into channels, conv 32
# and conv 64 at full 14x14, then pool): it shows what fraction of peak the trainer reaches
# with more of the FLOPs in its widest layer, at about 1.4x the default's FLOPs per image.
COMPUTE_BOUND_MODEL = {"model_widths": (32, 64), "kernel_sizes": (3, 3), "pool_sizes": (1, 2),
                       "conv_padding": "same", "space_to_depth": 2, "batch_norm": False,
                       "dropout": 0.0, "dense_units": 256}


def keras_io_model():
  """keras.io 'Simple MNIST convnet' (valid padding, dropout 0.5, softmax output)."""
  import keras
  layers = keras.layers
  return keras.Sequential([
      keras.Input(shape=(28, 28, 1)),
      layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
      layers.MaxPooling2D(pool_size=(2, 2)),
      layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
      layers.MaxPooling2D(pool_size=(2, 2)),
      layers.Flatten(),
      layers.Dropout(0.5),
      layers.Dense(10, activation="softmax"),
  ])


def model_flags(model: dict) -> list:
  """A model dict as trainer flags; explicit, so changed trainer defaults cannot leak in."""
  def value(v):
    if isinstance(v, tuple):
      return ",".join(str(x) for x in v)
    return str(v).lower() if isinstance(v, bool) else str(v)
  return [f"--{k}={value(v)}" for k, v in model.items()]


def trainer_fingerprint() -> dict:
  """Commit and a hash of trainer/*.py, to detect code that changed while we measured."""
  digest = hashlib.sha256()
  trainer_dir = os.path.join(procs.ROOT, "trainer")
  for name in sorted(os.listdir(trainer_dir)):
    if name.endswith(".py"):
      with open(os.path.join(trainer_dir, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=procs.ROOT,
                            capture_output=True, text=True, timeout=10).stdout.strip()
  except OSError:
    commit = ""
  return {"commit": commit or "unknown", "trainer_sha256": digest.hexdigest()[:16]}


def trainer_changed(before: dict, after: dict) -> bool:
  """Whether trainer/*.py differ between two trainer_fingerprint()s (other commits don't count)."""
  return after["trainer_sha256"] != before["trainer_sha256"]


def code_notes(before: dict, after: dict) -> list:
  """A warning when trainer/ changed while we measured; a commit of other files is harmless."""
  if trainer_changed(before, after):
    return [f"WARNING: trainer/ changed during this run ({before} -> {after}): the results mix "
            "code versions; rerun."]
  if after["commit"] != before["commit"]:
    return [f"HEAD moved from {before['commit']} to {after['commit']} during this run; trainer/ "
            f"did not change (sha256 {before['trainer_sha256']})."]
  return []


class Bench:
  """Runs subprocesses, keeps their summaries, and caches results several metrics share."""

  def __init__(self, quick: bool, cache_dir: str, seeds, quiet_wait_s: float = 0.0):
    self.quick = quick
    self.quiet_wait_s = quiet_wait_s
    self.cache_dir = cache_dir
    self.data_dir = os.path.join(cache_dir, "tfds")
    self.seeds = seeds
    self.runs = []
    self.default_runs = []
    self.hardware = None
    self.cache = {}  # Runs that several metrics share, by key.
    # Steps: long enough that the first (compiling) chunk is a small share; short under --quick.
    self.throughput_steps = 160 if quick else 400
    self.keras_steps = 150 if quick else 300
    self.input_batches = 1000 if quick else 3000
    self.scaling_steps = 120 if quick else 300
    self.compute_bound_steps = 60 if quick else 150
    self.repeats = 1 if quick else 2  # Throughput runs per side, interleaved.

  # ---- subprocesses ----

  def trainer(self, name: str, flag_args: list, workers: int = 0) -> dict:
    """One trainer run (through the launcher when workers > 0); returns its run record."""
    model_dir = procs.fresh_dir(os.path.join(self.cache_dir, "runs", name))
    args = [f"--model_dir={model_dir}", f"--data_dir={self.data_dir}", "--export=false",
            *flag_args]
    module = "trainer.task"
    if workers:
      module, args = "trainer.launcher", [f"--workers={workers}", "--", *args]
    code, log, cpu = procs.run_module(module, args, os.path.join(model_dir, "log.txt"),
                                      timeout=1800, quiet_wait_s=self.quiet_wait_s)
    metrics = procs.read_json(os.path.join(model_dir, "metrics.json"))
    record = {"name": name, "kind": module, "args": args, "returncode": code, "cpu": cpu,
              "ok": code == 0 and metrics is not None, "metrics": metrics,
              "log": os.path.relpath(os.path.join(model_dir, "log.txt"), procs.ROOT)}
    batch = int(flag_value(flag_args, "global_batch_size", DEFAULT_BATCH))
    record["summary"] = _trainer_summary(metrics, procs.parse_eval_lines(log), batch)
    if not record["ok"]:
      record["error"] = f"exit {code}: {last_line(log)}"
    self._keep(record)
    return record

  def probe(self, name: str, probe: str, **probe_flags) -> dict:
    run_dir = procs.fresh_dir(os.path.join(self.cache_dir, "runs", name))
    out = os.path.join(run_dir, "result.json")
    args = [f"--probe={probe}", f"--out={out}", f"--data_dir={self.data_dir}"]
    args += [f"--{k}={v}" for k, v in probe_flags.items()]
    code, log, cpu = procs.run_module("bench.probes", args, os.path.join(run_dir, "log.txt"),
                                      timeout=1800, quiet_wait_s=self.quiet_wait_s)
    result = procs.read_json(out)
    record = {"name": name, "kind": f"probe:{probe}", "args": args, "returncode": code,
              "cpu": cpu, "ok": code == 0 and result is not None, "result": result,
              "summary": _probe_summary(result)}
    if not record["ok"]:
      record["error"] = f"exit {code}: {last_line(log)}"
    self._keep(record)
    return record

  def _keep(self, record: dict) -> None:
    self.runs.append(record)
    s, cpu = record["summary"], record["cpu"]
    print(f"[bench] {record['name']}: {'ok' if record['ok'] else record.get('error')} "
          f"images/s={report.fmt(s.get('images_per_sec'), 0)} "
          f"to99={report.fmt(s.get('time_to_99_s'), 1)}s wall={cpu['wall_s']}s "
          f"others_cpu={cpu['others_cpu']} waited={cpu['waited_for_quiet_s']}s", flush=True)

  # ---- shared measurements ----

  def default_run(self, seed: int) -> dict:
    """The default recipe with a test-set evaluation every EVAL_IMAGES training images."""
    record = self.trainer(f"ours_default_seed{seed}",
                          [f"--seed={seed}", f"--eval_every_steps={eval_every(DEFAULT_BATCH)}"])
    self.default_runs.append(record)
    return record

  def default_images_per_sec(self) -> tuple:
    """Median steady images/s of the default recipe (a short run if none happened yet)."""
    if not self.default_runs:
      self.default_runs.append(self.trainer(
          "ours_default_throughput", [f"--train_steps={self.throughput_steps}"]))
    rates = [r["summary"].get("images_per_sec") for r in self.default_runs if r["ok"]]
    names = ", ".join(r["name"] for r in self.default_runs)
    return stats.median_with_failures(rates) if rates else float("nan"), names

  def hardware_info(self) -> dict:
    if self.hardware is None:
      self.hardware = self.probe("hardware", "hardware").get("result") or {}
    return self.hardware


def eval_every(batch: int) -> int:
  return max(1, round(EVAL_IMAGES / batch))


def flag_value(args: list, name: str, default):
  for arg in args:
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return default


def last_line(log: str) -> str:
  lines = [l for l in log.strip().splitlines() if l.strip()]
  return lines[-1][:300] if lines else "no output"


def _trainer_summary(metrics, evals, batch: int) -> dict:
  """images/s and training seconds to THRESHOLD, computed from steps, not wall clock.

  The trainer times each compiled chunk and excludes the first (tracing) one; evaluation,
  checkpoints and logging run between chunks, outside that clock. So steps x (global batch /
  steady images/s) is training time with compilation and evaluation excluded, as for Keras.
  The 'into training' figure of the eval log line includes both, and is kept for reference.
  """
  if not metrics:
    return {}
  rate = metrics.get("train_images_per_sec")
  summary = {"images_per_sec": rate, "final_accuracy": metrics.get("test_accuracy"),
             "train_seconds_wall": metrics.get("train_seconds")}
  if evals and metrics.get("test_accuracy") is not None and evals[-1][0] < metrics["global_step"]:
    # The end-of-training evaluation is a test-set evaluation too (wall time into it unknown).
    evals = [*evals, (metrics["global_step"], metrics["test_accuracy"], None)]
  if evals:
    hit = procs.first_reaching(evals, THRESHOLD)
    summary.update({
        "evals": evals, "reached": hit is not None, "best_eval_accuracy": max(e[1] for e in evals),
        "steps_to_99": hit[0] if hit else None,
        "time_to_99_s": hit[0] * batch / rate if hit and rate else None,
        "wall_into_training_at_99_s": hit[2] if hit else None})
  return summary


def _probe_summary(result) -> dict:
  if not result:
    return {}
  summary = {}
  for key in ("images_per_sec", "graph_images_per_sec"):
    if key in result:
      summary["images_per_sec"] = result[key]
  if "time_to_threshold_s" in result:
    summary.update({"time_to_99_s": result["time_to_threshold_s"], "reached": result["reached"],
                    "final_accuracy": result["final_accuracy"],
                    "epochs_to_99": result["epochs_to_threshold"]})
  return summary


def prepare_data(data_dir: str) -> None:
  """TFDS mnist in data_dir from the vendored files (a no-op once prepared)."""
  code, log, _ = procs.run_module(
      "bench.prepare", [f"--data_dir={data_dir}"],
      os.path.join(os.path.dirname(data_dir), "prepare.log"), timeout=900)
  if code != 0:
    raise SystemExit(f"Could not prepare MNIST in {data_dir}: {last_line(log)}")

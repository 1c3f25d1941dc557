"""`python -m bench.run [--quick] [--only=row,row]` (= `make bench`): every row in one session.

The selected rows decide which measurements (jobs) run; each job is one fresh subprocess
(trainer.task, trainer.launcher or bench.probes), run in a fixed, interleaved order with one
progress line per job (elapsed time and ETA). The rows are then computed from the jobs' records,
written to bench/results.md (the committed record) and results.json (not committed) and printed.
The benchmark exits 0 whatever it finds.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from typing import Callable

from absl import app
from absl import flags

from bench import flops
from bench import probes
from bench import procs
from bench import report
from bench import synth

FLAGS = flags.FLAGS
THRESHOLD = 0.99
DEFAULT_BATCH = 256  # the trainer's default --global_batch_size
MNIST_TRAIN = 60_000
# A measurement during which other processes used more than this share of the CPU is repeated
# (twice at most); one that stays disturbed makes its rows say DISTURBED instead of PASS/FAIL.
DISTURBED_SHARE = 0.10
MEASUREMENT_TRIES = 3
PHASES = ("start-up", "data", "build", "train", "evaluate", "export")  # trainer/train.py's order


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of everything: full, or --quick (a smoke test, not a measurement)."""

  quick: bool
  seeds: tuple
  reference_epochs: int  # the recipe's cap; --quick stops after 2 (99% is rarely reached)
  fixed_cost_runs: int
  pipeline_batches: int
  same_model_steps: int  # per Keras epoch (3 epochs, 2 timed); ours runs 2x + 20
  worker_steps: int
  rss_steps: int
  stream_multiples: tuple  # synthetic dataset sizes, in MNIST train splits
  in_memory_multiples: tuple  # capped at 10x: in-memory decodes the whole split up front


def settings(quick: bool, seeds=()) -> Settings:
  sizes = (dict(reference_epochs=2, fixed_cost_runs=1, pipeline_batches=400,
                same_model_steps=60, worker_steps=60, stream_multiples=(1, 3),
                in_memory_multiples=(1, 3)) if quick else
           dict(reference_epochs=15, fixed_cost_runs=3, pipeline_batches=2000,
                same_model_steps=150, worker_steps=200, stream_multiples=(1, 10, 30),
                in_memory_multiples=(1, 10)))
  return Settings(quick=quick, seeds=tuple(seeds) or ((1,) if quick else (1, 2, 3)),
                  rss_steps=50, **sizes)


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  group: str
  estimate_s: float  # full mode, quiet 2-core machine; drives the ETA
  run: Callable


class Bench:
  """Runs jobs as subprocesses and keeps their records by name."""

  def __init__(self, settings: Settings, cache_dir: str, quiet_wait_s: float):
    self.s = settings
    self.cache_dir = cache_dir
    self.mnist_dir = os.path.join(cache_dir, "mnist")
    self.synth_dir = os.path.join(cache_dir, "synth")
    self.npz = os.path.join(cache_dir, "mnist.npz")
    self.quiet_wait_s = quiet_wait_s
    self.records = {}

  def _run(self, name, module, args, timeout_s=1800, out_dir=None) -> tuple:
    """(run record, log text) of one subprocess."""
    run_dir = out_dir or procs.fresh_dir(os.path.join(self.cache_dir, "runs", name))
    log_path = os.path.join(run_dir, "log.txt")
    r = procs.run(module, args, log_path, timeout_s, self.quiet_wait_s)
    log = r.pop("log")
    r.update(name=name, module=module, args=args, log_path=os.path.relpath(log_path, procs.ROOT),
             ok=r["returncode"] == 0)
    if not r["ok"]:
      r["error"] = f"exit {r['returncode']}: {procs.last_line(log)}"
    return r, log

  def trainer(self, name, flag_args, data_dir=None, workers=0) -> dict:
    model_dir = procs.fresh_dir(os.path.join(self.cache_dir, "runs", name))
    args = [f"--model_dir={model_dir}", f"--data_dir={data_dir or self.mnist_dir}", *flag_args]
    module = "trainer.task"
    if workers:
      module, args = "trainer.launcher", [f"--workers={workers}", "--", *args]
    r, log = self._run(name, module, args, out_dir=model_dir)
    metrics = procs.read_json(os.path.join(model_dir, "metrics.json"))
    r["ok"] = r["ok"] and metrics is not None
    batch = int(_flag(flag_args, "global_batch_size", DEFAULT_BATCH))
    r["summary"] = trainer_summary(metrics, procs.eval_points(log, r["started"]), batch)
    r["metrics"] = metrics
    return r

  def prepare(self, name, what, **probe_flags) -> dict:
    """Data preparation, skipped when a marker says an earlier session finished it."""
    marker = os.path.join(self.cache_dir, f"prepared-{what}")
    if os.path.exists(marker):
      return {"name": name, "ok": True, "wall_s": 0.0, "summary": {}, "cached": True}
    return self.probe(name, "prepare", marker=marker, **probe_flags)

  def probe(self, name, probe, **probe_flags) -> dict:
    args = [f"--probe={probe}", f"--data_dir={self.mnist_dir}", f"--npz={self.npz}"]
    args += [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in probe_flags.items()]
    r, log = self._run(name, "bench.probes", args)
    results = procs.json_lines(log, "result")
    r["result"] = results[-1] if results else None
    r["ok"] = r["ok"] and r["result"] is not None
    if probe == "reference":
      r["summary"] = reference_summary(procs.json_lines(log, "epoch_end"), r["started"])
    else:
      r["summary"] = {"images_per_sec": (r["result"] or {}).get("images_per_sec")}
    return r


def _flag(args, name, default):
  for arg in args:
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return default


# ---- what a run's outputs say (pure) ----


def first_reaching(points, threshold=THRESHOLD):
  for p in points:
    if p[1] >= threshold:
      return p
  return None


def trainer_summary(metrics, evals, batch: int) -> dict:
  """images/s, phases, and the first evaluation >= 99%: its step and its wall time since fork.

  Evaluations come from the log ('eval at step' lines, timed by absl's prefix; the final one
  ends in '(final)'). A log without the final line falls back on the trainer's own phase clock
  (from the process's start in /proc, i.e. the fork) through the 'evaluate' phase.
  """
  if not metrics:
    return {}
  phases = metrics.get("phase_seconds") or {}
  evals = list(evals)
  step, accuracy = metrics.get("global_step"), metrics.get("test_accuracy")
  if accuracy is not None and not any(e[0] == step for e in evals):
    # metrics.json sorts its keys, so the phases' order is lost there; only export follows the
    # final evaluation.
    final_s = None
    if "evaluate" in phases and metrics.get("wall_seconds") is not None:
      final_s = metrics["wall_seconds"] - phases.get("export", 0.0)
    evals.append((step, accuracy, final_s))
  rate = metrics.get("train_images_per_sec") or None
  hit = first_reaching(evals)
  return {"images_per_sec": rate, "final_accuracy": accuracy, "phases": phases,
          "process_wall_s": metrics.get("wall_seconds"), "evals": evals,
          "reached": hit is not None, "steps_to_99": hit[0] if hit else None,
          "wall_to_99_s": hit[2] if hit else None,
          "train_s_to_99": hit[0] * batch / rate if hit and rate else None}


def reference_summary(epochs, started: float) -> dict:
  """The reference's first epoch-end evaluation >= 99%, as wall time since the fork and as
  training time (epochs x 60,000 images at its steady rate, the first epoch's tracing left out
  like ours)."""
  if not epochs:
    return {}
  steady = [e["train_s"] for e in epochs[1:]] or [epochs[0]["train_s"]]
  rate = MNIST_TRAIN / (sum(steady) / len(steady))
  hit = next((e for e in epochs if (e["val_accuracy"] or 0) >= THRESHOLD), None)
  return {"images_per_sec": rate, "final_accuracy": epochs[-1]["val_accuracy"],
          "reached": hit is not None, "epochs_to_99": hit["epoch"] if hit else None,
          "wall_to_99_s": hit["time"] - started if hit else None,
          "train_s_to_99": hit["epoch"] * MNIST_TRAIN / rate if hit else None,
          "epochs": epochs}


# ---- jobs ----


def jobs(s: Settings) -> list:
  """Every job, in the order they run (the per-seed ones interleaved)."""
  synth_sizes = "_".join("-".join(map(str, m)) for m in (s.stream_multiples,
                                                          s.in_memory_multiples))
  out = [Job("prepare_mnist", "prepare_mnist", 1, lambda b: b.prepare(
             "prepare_mnist", "mnist", mode="mnist")),
         Job("prepare_synth", "prepare_synth", 1, lambda b: b.prepare(
             "prepare_synth", f"synth_{synth_sizes}", mode="synth", data_dir=b.synth_dir,
             multiples=s.stream_multiples, in_memory=s.in_memory_multiples)),
         Job("hardware", "hardware", 12, lambda b: b.probe("hardware", "hardware"))]
  for i, seed in enumerate(s.seeds):
    pair = [Job(f"default_seed{seed}", "default", 13, lambda b, seed=seed: b.trainer(
                f"default_seed{seed}", [f"--seed={seed}"])),
            Job(f"stream_seed{seed}", "stream", 20, lambda b, seed=seed: b.trainer(
                f"stream_seed{seed}", [f"--seed={seed}", "--input_mode=stream"]))]
    # Each seed's two modes run back to back, in turn first, so neither mode always meets the
    # VM right after the reference's long full load nor always a minute later.
    out += [Job(f"reference_seed{seed}", "reference", 95, lambda b, seed=seed: b.probe(
                f"reference_seed{seed}", "reference", seed=seed, max_epochs=s.reference_epochs)),
            *(pair[::-1] if i % 2 else pair)]
  out.append(Job("first_contact", "first_contact", 60,
                 lambda b: b.probe("first_contact", "first_contact")))
  for i in range(1, s.fixed_cost_runs + 1):
    out.append(Job(f"fixed_cost_r{i}", "fixed_cost", 8, lambda b, i=i: b.trainer(
        f"fixed_cost_r{i}", ["--train_steps=1"])))
  for mode, seconds, batches in (("in_memory", 8, s.pipeline_batches),
                                 ("stream", 15, s.pipeline_batches // 4)):
    out.append(Job(f"pipeline_{mode}", f"pipeline_{mode}", seconds,
                   lambda b, mode=mode, n=batches: b.probe(
                       f"pipeline_{mode}", "pipeline", mode=mode, batches=n)))
  ours_same = [*probes.model_flags(probes.SAME_MODEL), f"--global_batch_size={probes.BATCH}",
               "--lr_schedule=constant", "--learning_rate=0.001", "--lr_scaling=none",
               "--adam_beta1=0.9", "--adam_beta2=0.999",  # Keras' Adam defaults, as in fit
               "--precision=float32",  # as Keras fit runs: the loops compared, not the number type
               f"--train_steps={2 * s.same_model_steps + 20}", *_NO_OUTPUTS]
  out += [Job("same_model_ours", "same_model", 12,
              lambda b: b.trainer("same_model_ours", ours_same)),
          Job("same_model_keras", "same_model", 20, lambda b: b.probe(
              "same_model_keras", "keras_throughput", steps=s.same_model_steps))]
  for n in (1, 2):
    flag_args = [f"--train_steps={s.worker_steps}", f"--global_batch_size={n * DEFAULT_BATCH}",
                 *_NO_OUTPUTS]
    out.append(Job(f"workers_{n}", "workers", 2 + 10 * n, lambda b, n=n, a=flag_args:
                   b.trainer(f"workers_{n}", a, workers=n)))
  for mode, multiples in (("stream", s.stream_multiples), ("in_memory", s.in_memory_multiples)):
    for m in multiples:
      name = f"rss_{mode}_{m}x"
      flag_args = [f"--dataset={synth.name_for(m)}", f"--input_mode={mode}",
                   f"--train_steps={s.rss_steps}", "--eval_examples=1000", *_NO_OUTPUTS]
      out.append(Job(name, f"rss_{mode}", 12 + (m if mode == "in_memory" else 0),
                     lambda b, name=name, a=flag_args: b.trainer(name, a, data_dir=b.synth_dir)))
  return out


_NO_OUTPUTS = ["--export=false", "--checkpoint_every_steps=100000"]


# ---- rows: pure functions of the job records ----


def _ok(records, prefix):
  return [r for name, r in records.items() if name.startswith(prefix) and r.get("ok")]


def _values(records, prefix, key):
  return [r.get("summary", {}).get(key) for name, r in records.items() if name.startswith(prefix)]


def _median(records, prefix, key):
  values = [v for v in _values(records, prefix, key) if v is not None]
  return report.median_with_failures(values) if values else math.nan


def _reached(values):
  return f"{sum(v is not None for v in values)}/{len(values)} reached 99%"


def _ratio_to_99(records, ctx, key, what) -> dict:
  ref, ours = _values(records, "reference_", key), _values(records, "default_seed", key)
  ref_med = report.median_with_failures(ref)
  ours_med = report.median_with_failures(ours)
  value = report.ratio(ref_med, ours_med)
  if ctx.get("quick") and None in ref:
    value, what = math.nan, what + "; --quick stops the reference early, so no ratio"
  return {"value": value,
          "basis": f"reference {report.fmt(ref_med, 1)} s ({_reached(ref)}) / ours "
                   f"{report.fmt(ours_med, 1)} s ({_reached(ours)}); medians; {what}",
          "details": {"reference_s": ref, "ours_s": ours}}


def wall_time_to_99_ratio(records, ctx) -> dict:
  return _ratio_to_99(records, ctx, "wall_to_99_s",
                      "whole processes, fork to the first evaluation >= 99% known")


def time_to_99_ratio(records, ctx) -> dict:
  return _ratio_to_99(records, ctx, "train_s_to_99",
                      "training time only (images to 99% / steady images/s)")


def fixed_cost_s(records, ctx) -> dict:
  walls = [r["wall_s"] for r in _ok(records, "fixed_cost_")]
  value = report.median_with_failures(walls) if walls else math.nan
  default = _median_wall(records)
  phases = _phases_text(_ok(records, "fixed_cost_"), value)
  return {"value": value,
          "basis": f"`--train_steps=1` with export, fork to exit, median of {len(walls)}: "
                   f"{report.fmt(report.ratio(value, default), 2)} of the default run's "
                   f"{report.fmt(default, 1)} s; {phases}",
          "details": {"walls": walls, "default_wall_s": default}}


def _median_wall(records):
  walls = [r["wall_s"] for r in _ok(records, "default_seed")]
  return report.median_with_failures(walls) if walls else math.nan


def _phases_text(runs, wall) -> str:
  """The phases of the run whose wall time is closest to `wall`."""
  if not runs or wall is None or math.isnan(wall):
    return "no phases"
  run = min(runs, key=lambda r: abs(r["wall_s"] - wall))
  phases = run.get("summary", {}).get("phases") or {}
  inside = sum(phases.values())
  order = {name: i for i, name in enumerate(PHASES)}
  parts = [f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: order.get(kv[0], 99))]
  return (f"phases ({run['name']}): " + ", ".join(parts) +
          f", after export {max(0.0, run['wall_s'] - inside):.1f} s")


def default_run_wall_s(records, ctx) -> dict:
  wall = _median_wall(records)
  n = len(_ok(records, "default_seed"))
  return {"value": wall,
          "basis": f"`python -m trainer.task` (default flags: {_default_precision(records)} "
                   f"here) on prepared data, fork to exit, median of {n}; "
                   f"{_phases_text(_ok(records, 'default_seed'), wall)}",
          "details": {"walls": [r["wall_s"] for r in _ok(records, "default_seed")]}}


def _first_contact(records) -> dict:
  return (records.get("first_contact") or {}).get("result") or {}


def first_contact_s(records, ctx) -> dict:
  fc = _first_contact(records)
  return {"value": fc.get("total_s", math.nan),
          "basis": f"fresh `git clone` of HEAD {report.fmt(fc.get('clone_s'), 1)} s + install "
                   f"(make's venv, installer cache warm) {report.fmt(fc.get('install_s'), 1)} s "
                   f"+ first `make train` (empty TFDS dir and cache) "
                   f"{report.fmt(fc.get('first_run_s'), 1)} s; test accuracy "
                   f"{report.fmt(fc.get('test_accuracy'), 4)}",
          "details": fc}


def first_run_s(records, ctx) -> dict:
  fc = _first_contact(records)
  phases = ", ".join(f"{k} {v:.1f}" for k, v in (fc.get("phases") or {}).items())
  return {"value": fc.get("first_run_s", math.nan),
          "basis": f"the first `make train` of a fresh clone, install excluded: data prepared "
                   f"and decoded on the way (phases: {phases or 'none'})"}


def first_run_extra_s(records, ctx) -> dict:
  first, warm = _first_contact(records).get("first_run_s", math.nan), _median_wall(records)
  return {"value": first - warm,
          "basis": f"first run {report.fmt(first, 1)} s - the warm default run's median "
                   f"{report.fmt(warm, 1)} s (default_run_wall_s)"}


def _achieved_gflops(records):
  hw = (records.get("hardware") or {}).get("result") or {}
  per_image = (hw.get("default_model") or {}).get("train")
  rate = _median(records, "default_seed", "images_per_sec")
  achieved = rate * per_image / 1e9 if per_image else math.nan
  text = (f"{report.fmt(achieved, 1)} GFLOP/s ({report.fmt(rate, 0)} images/s x "
          f"{report.fmt(per_image / 1e6 if per_image else None, 2)} MFLOP, analytic)")
  return achieved, hw, text


def fraction_of_measured_peak(records, ctx) -> dict:
  """Against the matmul of the precision the default runs trained in: a bfloat16 run
  (`--precision=auto` on a CPU with native bfloat16) over the float32 peak would overstate it."""
  achieved, hw, text = _achieved_gflops(records)
  precision = _default_precision(records)
  bf16 = precision == "mixed_bfloat16"
  key, what = ("matmul_bf16_", "bfloat16") if bf16 else ("matmul_", "fp32")
  best = hw.get(f"{key}best_gflops")
  sizes = ", ".join(f"{n}: {report.fmt(v, 0)}" for n, v in (hw.get(f"{key}gflops") or {}).items())
  basis = (f"{text} / best {what} matmul {report.fmt(best, 1)} GFLOP/s in this run (n = {sizes})")
  if bf16:
    basis += (f"; the default trained in mixed_bfloat16 (`--precision=auto`); over the best fp32 "
              f"matmul ({report.fmt(hw.get('matmul_best_gflops'), 1)} GFLOP/s) it would read "
              f"{report.fmt(report.ratio(achieved, hw.get('matmul_best_gflops')), 2)}")
  return {"value": report.ratio(achieved, best), "basis": basis,
          "details": {"achieved_gflops": achieved, "hardware": hw, "precision": precision}}


def _default_precision(records) -> str:
  """The policy the default runs trained with (metrics.json's `precision`), e.g. float32."""
  found = {(r.get("metrics") or {}).get("precision") for r in _ok(records, "default_seed")}
  return found.pop() if len(found) == 1 else "/".join(sorted(map(str, found)))


def fraction_of_nominal_peak(records, ctx) -> dict:
  achieved, _, text = _achieved_gflops(records)
  peak = ctx["nominal_peak"]
  return {"value": report.ratio(achieved, peak["gflops"]),
          "basis": f"{text} / nominal fp32 {report.fmt(peak['gflops'], 1)} GFLOP/s: "
                   f"{peak['assumption']}"}


def same_model_throughput_ratio(records, ctx) -> dict:
  ours = _median(records, "same_model_ours", "images_per_sec")
  keras = _median(records, "same_model_keras", "images_per_sec")
  return {"value": report.ratio(ours, keras),
          "basis": f"ours {report.fmt(ours, 0)} / Keras fit {report.fmt(keras, 0)} images/s "
                   f"(the keras.io convnet: conv32-conv64 3x3 valid, dropout 0.5, batch "
                   f"{probes.BATCH}; both float32; steady state)"}


def _headroom(records, pipeline, training, what) -> dict:
  pipe = _median(records, pipeline, "images_per_sec")
  train = _median(records, training, "images_per_sec")
  return {"value": report.ratio(pipe, train),
          "basis": f"{what} input function alone {report.fmt(pipe, 0)} images/s (drained "
                   f"in-graph, one pipeline, batch {DEFAULT_BATCH}) / training "
                   f"{report.fmt(train, 0)} images/s"}


def input_headroom(records, ctx) -> dict:
  return _headroom(records, "pipeline_in_memory", "default_seed", "in-memory")


def stream_input_headroom(records, ctx) -> dict:
  return _headroom(records, "pipeline_stream", "stream_seed", "stream-mode (MNIST, 4 files)")


def two_worker_ratio(records, ctx) -> dict:
  one = _median(records, "workers_1", "images_per_sec")
  two = _median(records, "workers_2", "images_per_sec")
  return {"value": report.ratio(two, one),
          "basis": f"2 launcher workers {report.fmt(two, 0)} / 1 worker {report.fmt(one, 0)} "
                   f"images/s ({DEFAULT_BATCH} images per worker per step, so global batch "
                   f"{2 * DEFAULT_BATCH} vs {DEFAULT_BATCH}; same 2 cores)"}


def _rss_growth(records, mode) -> dict:
  rss = {}
  for name, r in records.items():
    if name.startswith(f"rss_{mode}_") and r.get("ok"):
      rss[int(name.rsplit("_", 1)[1][:-1])] = r["max_rss_mb"]
  if len(rss) < 2 or 1 not in rss:
    return {"value": math.nan, "basis": f"runs missing or failed: {sorted(rss)}"}
  top = max(rss)
  sizes = ", ".join(f"{m}x {report.fmt(v, 0)} MB" for m, v in sorted(rss.items()))
  return {"value": report.ratio(rss[top], rss[1]), "top_multiple": top,
          "basis": f"peak RSS {top}x / 1x of one training worker, `--input_mode={mode}`, "
                   f"synthetic MNIST-shaped TFDS data (8 train files): {sizes}",
          "details": {"peak_rss_mb": rss}}


def stream_rss_growth(records, ctx) -> dict:
  return _rss_growth(records, "stream")


def in_memory_rss_growth(records, ctx) -> dict:
  row = _rss_growth(records, "in_memory")
  row["basis"] += "; capped at 10x (the whole split is decoded into memory)"
  return row


def stream_throughput_ratio(records, ctx) -> dict:
  """The median over seeds of stream / in-memory images/s, each pair run back to back: the VM's
  speed drifts by 10-25% within minutes, which a ratio of two medians takes in whole."""
  pairs = [report.ratio(stream, memory) for stream, memory in _seed_pairs(
      records, "stream_seed", "default_seed", "images_per_sec")]
  pairs = [p for p in pairs if not math.isnan(p)]
  stream = _median(records, "stream_seed", "images_per_sec")
  memory = _median(records, "default_seed", "images_per_sec")
  return {"value": report.median_with_failures(pairs) if pairs else math.nan,
          "basis": f"default recipe on MNIST, `--input_mode=stream` / in_memory images/s of the "
                   f"same seed, run back to back (in turn first): "
                   f"{', '.join(report.fmt(p, 2) for p in pairs)}; "
                   f"median of those (medians of each mode: {report.fmt(stream, 0)} / "
                   f"{report.fmt(memory, 0)} images/s)"}


def _seed_pairs(records, prefix_a, prefix_b, key) -> list:
  """(a, b) summary values of the runs `prefix_a<seed>` and `prefix_b<seed>`, seeds in order."""
  pairs = []
  for name, record in records.items():
    if name.startswith(prefix_a):
      other = records.get(prefix_b + name[len(prefix_a):], {})
      pairs.append((record.get("summary", {}).get(key), other.get("summary", {}).get(key)))
  return pairs


def stream_wall_to_99_s(records, ctx) -> dict:
  stream = _values(records, "stream_seed", "wall_to_99_s")
  memory = _values(records, "default_seed", "wall_to_99_s")
  med = report.median_with_failures(stream)
  return {"value": med,
          "basis": f"stream {report.fmt(med, 1)} s ({_reached(stream)}) next to in_memory "
                   f"{report.fmt(report.median_with_failures(memory), 1)} s ({_reached(memory)})"
                   "; fork to the first evaluation >= 99%, medians"}


T = report.Target
# (target, row function, job groups it needs); bench/README.md says how each is measured.
ROWS = [
    (T("wall_time_to_99_ratio", ">=", 10), wall_time_to_99_ratio, ("reference", "default")),
    (T("time_to_99_ratio", ">=", 10), time_to_99_ratio, ("reference", "default")),
    (T("fixed_cost_s", "<=", 5), fixed_cost_s, ("fixed_cost", "default")),
    (T("default_run_wall_s", "<=", 10, kind="aim"), default_run_wall_s, ("default",)),
    (T("first_contact_s", "<=", 45), first_contact_s, ("first_contact",)),
    (T("first_run_s", "<=", 15), first_run_s, ("first_contact",)),
    (T("first_run_extra_s", "<=", 5), first_run_extra_s, ("first_contact", "default")),
    (T("fraction_of_measured_peak", ">=", 0.6), fraction_of_measured_peak,
     ("hardware", "default")),
    (T("fraction_of_nominal_peak", None, None, kind="info"), fraction_of_nominal_peak,
     ("hardware", "default")),
    (T("same_model_throughput_ratio", ">=", 1.2), same_model_throughput_ratio, ("same_model",)),
    (T("input_headroom", ">=", 20), input_headroom, ("pipeline_in_memory", "default")),
    (T("two_worker_ratio", ">=", 0.9), two_worker_ratio, ("workers",)),
    (T("stream_rss_growth", "<", 1.10), stream_rss_growth, ("rss_stream",)),
    (T("in_memory_rss_growth", None, None, kind="info"), in_memory_rss_growth,
     ("rss_in_memory",)),
    (T("stream_input_headroom", ">=", 5), stream_input_headroom, ("pipeline_stream", "stream")),
    (T("stream_throughput_ratio", ">=", 0.9), stream_throughput_ratio, ("stream", "default")),
    (T("stream_wall_to_99_s", None, None, kind="info"), stream_wall_to_99_s,
     ("stream", "default")),
]
TARGETS = [row[0] for row in ROWS]
_ROW_GROUPS = {row[0].name: row[2] for row in ROWS}

NOTES = [
    "Wall times run from just before the fork to the exit (or to the evaluation whose result is "
    "reached), on data already on local disk: the reference reads mnist.npz as "
    "keras.datasets.mnist.load_data does, ours a prepared TFDS directory (4 train files).",
    "Reference: keras.io 'Simple MNIST convnet' (batch 128, Adam, 15 epochs at most), evaluated "
    "on the test set after every epoch instead of validation_split (so it trains on all 60,000 "
    "images, as ours), stopping at the first evaluation >= 99%. Ours (default_seed runs): "
    "`python -m trainer.task` with default flags, whose one evaluation, at the end (step 235), "
    "is its first >= 99% (earlier evaluations cost more than they saved: bench/README.md); "
    "the same runs give default_run_wall_s and the rates.",
    "Medians count a seed that never reached 99% as infinitely slow.",
    "Every process, the reference included, runs with TF_ENABLE_ONEDNN_OPTS=1 (the trainer's "
    "default), so the ratios compare recipes and loops, not kernel libraries.",
    "images/s is the trainer's steady rate (first compiled chunk left out); Keras fit's leaves "
    "out its first epoch.",
    "Peak RSS is wait4's ru_maxrss of the trainer process (single worker, no launcher).",
]


def plan(row_names, s: Settings) -> list:
  groups = set()
  for target, _, needs in ROWS:
    if target.name in row_names:
      groups.update(needs)
  if groups - {"rss_stream", "rss_in_memory"}:
    groups.add("prepare_mnist")
  if groups & {"rss_stream", "rss_in_memory"}:
    groups.add("prepare_synth")
  return [j for j in jobs(s) if j.group in groups]


def estimate(job: Job, s: Settings) -> float:
  if s.quick and job.group == "reference":
    return job.estimate_s * s.reference_epochs / 8  # about 8 epochs to 99% in full mode
  return job.estimate_s * (0.6 if s.quick and job.group in ("same_model", "workers") else 1.0)


def _job_text(r: dict, group: str) -> str:
  if not r.get("ok"):
    return f"FAILED {r.get('error', '')} (log: {r.get('log_path')})"
  s = r.get("summary") or {}
  parts = [f"wall {r['wall_s']:.1f} s"]
  if r.get("max_rss_mb"):
    parts.append(f"peak RSS {r['max_rss_mb']:.0f} MB")
  if s.get("images_per_sec"):
    parts.append(f"{s['images_per_sec']:,.0f} images/s")
  if "reached" in s and group in ("reference", "default", "stream"):
    parts.append(f"99% at {report.fmt(s.get('wall_to_99_s'), 1)} s" if s["reached"]
                 else f"99% not reached (final {report.fmt(s.get('final_accuracy'), 4)})")
  if r.get("others_cpu", 0) > 0.1:
    parts.append(f"other processes used {r['others_cpu']:.2f} of the CPU")
  return ", ".join(parts)


def run_all(row_names, s: Settings, cache_dir: str, quiet_wait_s: float, only=()) -> dict:
  started = datetime.datetime.now().isoformat(timespec="seconds")
  tic = time.monotonic()
  code_before = _code_version()
  b = Bench(s, cache_dir, quiet_wait_s)
  todo = plan(row_names, s)
  estimates = [estimate(j, s) for j in todo]
  print(f"[bench] {len(todo)} jobs, about {report.mmss(sum(estimates))} on a quiet 2-core "
        "machine", flush=True)
  measured_s = measured_estimate_s = 0.0  # the ETA scales by these (preparation is one-off)
  for i, job in enumerate(todo):
    job_tic = time.monotonic()
    record = run_undisturbed(job, b)
    b.records[job.name] = record
    if not job.group.startswith("prepare"):
      measured_s += time.monotonic() - job_tic
      measured_estimate_s += estimates[i]
    elapsed = time.monotonic() - tic
    left = report.eta(measured_s, measured_estimate_s, sum(estimates[i + 1:]))
    print(report.progress_line(i + 1, len(todo), elapsed, left, job.name,
                               _job_text(record, job.group)),
          flush=True)
  ctx = {"nominal_peak": flops.nominal_peak(flops.read_cpuinfo()), "quick": s.quick}
  metrics = {}
  for target, fn, _ in ROWS:
    if target.name not in row_names:
      continue
    try:
      m = fn(b.records, ctx)
    except Exception as e:  # a row whose jobs failed reports N/A, not a crash
      m = {"value": math.nan, "basis": f"error: {type(e).__name__}: {e}"}
    m["status"] = row_status(target, m, b.records, _ROW_GROUPS[target.name])
    metrics[target.name] = m
  code_after = _code_version()
  notes = list(NOTES)
  if code_after != code_before:
    notes.insert(0, f"WARNING: trainer/ changed during this run ({code_before} -> "
                    f"{code_after}): the results mix code versions; rerun.")
  runs = [{k: v for k, v in r.items() if k not in ("metrics",)} for r in b.records.values()]
  meta = {"started": started, "wall_s": time.monotonic() - tic,
          "mode": "quick" if s.quick else "full", "only": ",".join(only),
          "seeds": list(s.seeds), "cpu": ctx["nominal_peak"]["model_name"],
          "cores": len(os.sched_getaffinity(0)), "tf_version": _version("tensorflow"),
          "keras_version": _version("keras"), "python": platform.python_version(),
          "code": code_before,
          "others_cpu_max": max((r.get("others_cpu") or 0 for r in runs), default=None)}
  return {"meta": meta, "metrics": metrics, "runs": runs, "notes": notes}


def run_undisturbed(job: Job, b) -> dict:
  """The job's record; measured again (up to MEASUREMENT_TRIES in all) while other processes
  took more than DISTURBED_SHARE of the CPU during it. The record says how many tries it took
  and, when every try was disturbed, `disturbed`; preparation and --quick runs are never
  repeated."""
  quick = b is not None and b.s.quick  # a smoke run: its rows say DISTURBED, no repeats
  tries = 1 if quick or job.group.startswith("prepare") else MEASUREMENT_TRIES
  for attempt in range(1, tries + 1):
    try:
      record = job.run(b)
    except Exception as e:  # one broken measurement must not cost the others
      record = {"name": job.name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    record.update(group=job.group, tries=attempt)
    record["disturbed"] = (record.get("others_cpu") or 0.0) > DISTURBED_SHARE
    if not record["disturbed"] or record.get("ok") is False:
      break
  return record


def row_status(target: report.Target, row: dict, records: dict, groups) -> str:
  """PASS/FAIL (or the target's other words), except: DISTURBED when a measurement the row
  reads stayed disturbed, and never PASS for a fraction of a peak above 1 (the peak was
  measured too low: a disturbed or throttled probe)."""
  status = target.status(row["value"])
  if status in ("info", "N/A"):
    return status
  if any(r.get("disturbed") for r in records.values() if r.get("group") in groups):
    return "DISTURBED"
  value = row["value"]
  if target.name.startswith("fraction_of_") and isinstance(value, float) and value > 1:
    return "N/A (above 1: the peak was measured too low)"
  return status


def _code_version() -> str:
  """HEAD plus a hash of trainer/*.py as the working tree has them."""
  import hashlib
  digest = hashlib.sha256()
  trainer_dir = os.path.join(procs.ROOT, "trainer")
  for name in sorted(os.listdir(trainer_dir)):
    if name.endswith(".py"):
      with open(os.path.join(trainer_dir, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=procs.ROOT,
                          capture_output=True, text=True, timeout=10).stdout.strip()
  except OSError:
    head = ""
  return f"{head or 'unknown'} (trainer/ sha256 {digest.hexdigest()[:12]})"


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def write(results: dict, out_dir: str) -> str:
  safe = report.json_safe(results)
  text = report.markdown(safe, TARGETS)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(safe, f, indent=2)
    f.write("\n")
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  return text


def _define_flags() -> None:
  """Flags exist only when this module is the entry point (importing it defines none)."""
  here = os.path.dirname(os.path.abspath(__file__))
  flags.DEFINE_boolean("quick", False, "One seed, short runs: a smoke test, not a measurement.")
  flags.DEFINE_list("only", [], "Only these rows (names as in the targets table).")
  flags.DEFINE_list("seeds", [], "Seeds of the per-seed runs (default 1,2,3; --quick: 1).")
  flags.DEFINE_string("out_dir", here, "Where results.json and results.md go.")
  flags.DEFINE_string("cache_dir", os.path.join(here, ".cache"),
                      "Prepared data (mnist/, synth/, mnist.npz) and per-run dirs (runs/).")
  flags.DEFINE_float("quiet_wait_s", 20.0, "Before each job, wait up to this long for other "
                     "processes to leave the CPU idle (0: never wait).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  names = [t.name for t in TARGETS]
  unknown = [n for n in FLAGS.only if n not in names]
  if unknown:
    raise app.UsageError(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
  chosen = settings(FLAGS.quick, [int(x) for x in FLAGS.seeds])
  results = run_all([n for n in names if not FLAGS.only or n in FLAGS.only], chosen,
                    FLAGS.cache_dir, FLAGS.quiet_wait_s, FLAGS.only)
  print(write(results, FLAGS.out_dir))


if __name__ == "__main__":
  _define_flags()
  app.run(main)

"""`python -m bench.run [--quick] [--only=a,b]`: every benchmark in one session, one report.

Writes bench/results.md (the record, committed), bench/results.json (raw, not committed) and
prints the markdown. Every measurement runs
in a fresh subprocess (trainer.task, trainer.launcher or bench.probes) so none inherits another's
threads or traced functions. The benchmark never fails the build: it exits 0 whatever it finds.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import time

from absl import app
from absl import flags

from bench import hardware
from bench import harness
from bench import report
from bench import stats

FLAGS = flags.FLAGS

Bench = harness.Bench


def _reached(times) -> int:
  return sum(t is not None for t in times)


# ---- metrics: each returns {"value", "basis", "details"} ----


def time_to_99_ratio(b: Bench) -> dict:
  refs, ours = [], []
  for seed in b.seeds:
    refs.append(b.probe(f"reference_seed{seed}", "keras_time_to_99", seed=seed))
    ours.append(b.default_run(seed))
  ref_t = [r["summary"].get("time_to_99_s") for r in refs]
  our_t = [r["summary"].get("time_to_99_s") for r in ours]
  ref_med, our_med = stats.median_with_failures(ref_t), stats.median_with_failures(our_t)
  basis = (f"reference {report.fmt(ref_med, 1)} s ({_reached(ref_t)}/{len(ref_t)} reached 99%)"
           f" / ours {report.fmt(our_med, 1)} s ({_reached(our_t)}/{len(our_t)} reached); "
           "medians, training time only")
  return {"value": stats.ratio(ref_med, our_med), "basis": basis,
          "details": {"reference_s": ref_t, "ours_s": our_t, "seeds": b.seeds,
                      "reference_median_s": ref_med, "ours_median_s": our_med,
                      "ours_wall_into_training_s": [
                          r["summary"].get("wall_into_training_at_99_s") for r in ours]}}


def _best_rates(b: Bench, makers: dict) -> tuple:
  """Runs each maker b.repeats times, interleaved; returns (best images/s per key, records).

  Interference from other processes only slows a run, so the fastest repeat is the best
  estimate of the undisturbed rate (as timeit takes the minimum time).
  """
  records = {key: [] for key in makers}
  for i in range(b.repeats):
    for key, make in makers.items():
      records[key].append(make(f"_r{i + 1}" if b.repeats > 1 else ""))
  best = {key: max((r["summary"].get("images_per_sec") or 0.0 for r in runs if r["ok"]),
                   default=float("nan"))
          for key, runs in records.items()}
  return best, records


def _all_rates(records: dict) -> dict:
  return {key: [r["summary"].get("images_per_sec") for r in runs]
          for key, runs in records.items()}


def same_model_throughput_ratio(b: Bench) -> dict:
  ours_flags = [*harness.model_flags(harness.SAME_MODEL), f"--global_batch_size={harness.BATCH}",
                "--lr_schedule=constant", "--learning_rate=0.001", "--lr_scaling=none",
                "--adam_beta1=0.9", "--adam_beta2=0.999",  # Keras' Adam defaults, as in fit
                f"--train_steps={2 * b.keras_steps + 20}", "--checkpoint_every_steps=100000"]
  best, records = _best_rates(b, {
      "ours": lambda tag: b.trainer(f"ours_same_model{tag}", ours_flags),
      "keras": lambda tag: b.probe(f"keras_fit_same_model{tag}", "keras_throughput",
                                   steps=b.keras_steps)})
  return {"value": stats.ratio(best["ours"], best["keras"]),
          "basis": f"ours {report.fmt(best['ours'], 0)} / Keras fit "
                   f"{report.fmt(best['keras'], 0)} images/s (the keras.io convnet: conv32-conv64 "
                   f"3x3 valid, dropout 0.5, batch {harness.BATCH}; best of {b.repeats})",
          "details": {"images_per_sec": _all_rates(records)}}


def input_headroom(b: Bench) -> dict:
  pipeline = b.probe("input_pipeline", "input_pipeline", batches=b.input_batches)
  train_rate, source = b.default_images_per_sec()
  result = pipeline.get("result") or {}
  graph_rate = result.get("graph_images_per_sec")
  return {"value": stats.ratio(graph_rate, train_rate),
          "basis": f"pipeline {report.fmt(graph_rate, 0)} images/s drained in-graph (from Python:"
                   f" {report.fmt(result.get('eager_images_per_sec'), 0)}) / training "
                   f"{report.fmt(train_rate, 0)} images/s",
          "details": {"pipeline": result, "train_images_per_sec": train_rate,
                      "train_source": source}}


def effective_peak(hw: dict) -> hardware.Peak:
  """The documented peak, with the clock raised when a measured matmul proves it is higher."""
  cpu = hardware.read_cpuinfo()
  peak = hardware.fp32_peak(cpu, FLAGS.clock_ghz, FLAGS.flops_per_cycle)
  matmul = hw.get("matmul_fp32_gflops") or 0.0
  if FLAGS.clock_ghz or matmul <= peak.gflops:
    return peak
  implied = matmul / (peak.cores * peak.flops_per_cycle)
  note = (f"; a measured fp32 matmul ran at {matmul:.0f} GFLOP/s, above the nominal-clock peak "
          f"{peak.gflops:.0f}, so the cores boost: clock raised to the implied minimum "
          f"{implied:.2f} GHz (the true boost clock may be higher still)")
  return hardware.Peak(gflops=matmul, cores=peak.cores, clock_ghz=implied,
                       flops_per_cycle=peak.flops_per_cycle, assumption=peak.assumption + note)


def _achieved(hw: dict, model_key: str, images_per_sec: float) -> tuple:
  """(achieved GFLOP/s, training FLOPs per image, peak, basis text) for a model of the probe."""
  train_flops = (hw.get(model_key) or {}).get("train")
  peak = effective_peak(hw)
  achieved = images_per_sec * train_flops / 1e9 if train_flops else float("nan")
  basis = (f"{report.fmt(achieved, 1)} GFLOP/s ({report.fmt(images_per_sec, 0)} images/s x "
           f"{report.fmt(train_flops / 1e6 if train_flops else None, 2)} MFLOP) / peak "
           f"{report.fmt(peak.gflops, 1)}")
  return achieved, train_flops, peak, basis


def fraction_of_peak(b: Bench) -> dict:
  hw = b.hardware_info()
  train_rate, source = b.default_images_per_sec()
  achieved, train_flops, peak, basis = _achieved(hw, "default_model", train_rate)
  matmul = hw.get("matmul_fp32_gflops")
  return {"value": stats.ratio(achieved, peak.gflops),
          "basis": f"{basis}; a large fp32 matmul reaches {report.fmt(matmul, 0)} GFLOP/s",
          "details": {"achieved_gflops": achieved, "train_flops_per_image": train_flops,
                      "peak_gflops": peak.gflops, "peak_assumption": peak.assumption,
                      "fraction_of_matmul": stats.ratio(achieved, matmul or float("nan")),
                      "hardware_probe": hw, "train_source": source}}


def compute_bound_fraction_of_peak(b: Bench) -> dict:
  """fraction_of_peak for harness.COMPUTE_BOUND_MODEL: the same trainer on deep convolutions."""
  hw = b.hardware_info()
  flag_args = [*harness.model_flags(harness.COMPUTE_BOUND_MODEL),
               *_scaling_flags(b.compute_bound_steps)]
  best, records = _best_rates(b, {
      "heavy": lambda tag: b.trainer(f"compute_bound_model{tag}", flag_args)})
  achieved, train_flops, peak, basis = _achieved(hw, "compute_bound_model", best["heavy"])
  return {"value": stats.ratio(achieved, peak.gflops),
          "basis": f"{basis}; model: 2x2 space-to-depth, conv 32 and conv 64 (3x3, same) at "
                   f"14x14, pool, dense 256; best of {b.repeats}",
          "details": {"achieved_gflops": achieved, "train_flops_per_image": train_flops,
                      "images_per_sec": _all_rates(records)["heavy"]}}


def _scaling_flags(steps: int) -> list:
  return [f"--train_steps={steps}", "--checkpoint_every_steps=100000"]


def _two_worker_rates(b: Bench) -> tuple:
  """1 worker at the default global batch; 2 workers at twice it and at the same global batch.

  Cached: two metrics share these runs.
  """
  if b.cache.get("two_worker") is None:
    flag_args = _scaling_flags(b.scaling_steps)
    double = [*flag_args, f"--global_batch_size={2 * harness.DEFAULT_BATCH}"]
    b.cache["two_worker"] = _best_rates(b, {
        "one": lambda tag: b.trainer(f"launcher_1_worker{tag}", flag_args, workers=1),
        "two": lambda tag: b.trainer(f"launcher_2_workers{tag}", double, workers=2),
        "two_split": lambda tag: b.trainer(f"launcher_2_workers_split{tag}", flag_args,
                                           workers=2)})
  return b.cache["two_worker"]


def two_worker_ratio(b: Bench) -> dict:
  best, records = _two_worker_rates(b)
  return {"value": stats.ratio(best["two"], best["one"]),
          "basis": f"2 workers {report.fmt(best['two'], 0)} / 1 worker "
                   f"{report.fmt(best['one'], 0)} images/s ({harness.DEFAULT_BATCH} images per "
                   f"worker per step, so global batch {2 * harness.DEFAULT_BATCH} vs "
                   f"{harness.DEFAULT_BATCH}; 1 core per worker vs 2; best of {b.repeats})",
          "details": {"images_per_sec": _all_rates(records)}}


def two_worker_same_global_batch_ratio(b: Bench) -> dict:
  best, records = _two_worker_rates(b)
  return {"value": stats.ratio(best["two_split"], best["one"]),
          "basis": f"2 workers {report.fmt(best['two_split'], 0)} / 1 worker "
                   f"{report.fmt(best['one'], 0)} images/s (global batch "
                   f"{harness.DEFAULT_BATCH} on both sides; best of {b.repeats})",
          "details": {"images_per_sec": _all_rates(records)}}


def two_device_ratio(b: Bench) -> dict:
  flag_args = _scaling_flags(b.scaling_steps)
  best, records = _best_rates(b, {
      "one": lambda tag: b.trainer(f"one_device{tag}", flag_args + ["--num_cpu_devices=1"]),
      "two": lambda tag: b.trainer(f"mirrored_2_cpu_devices{tag}",
                                   flag_args + ["--num_cpu_devices=2"])})
  return {"value": stats.ratio(best["two"], best["one"]),
          "basis": f"2 logical CPU devices {report.fmt(best['two'], 0)} / 1 device "
                   f"{report.fmt(best['one'], 0)} images/s (MirroredStrategy, same global batch; "
                   f"best of {b.repeats})",
          "details": {"images_per_sec": _all_rates(records)}}


METRICS = {"time_to_99_ratio": time_to_99_ratio,
           "same_model_throughput_ratio": same_model_throughput_ratio,
           "input_headroom": input_headroom, "fraction_of_peak": fraction_of_peak,
           "compute_bound_fraction_of_peak": compute_bound_fraction_of_peak,
           "two_worker_ratio": two_worker_ratio,
           "two_worker_same_global_batch_ratio": two_worker_same_global_batch_ratio,
           "two_device_ratio": two_device_ratio}

NOTES = [
    "Training time excludes compilation/tracing and evaluation for both sides. Reference: "
    "keras.io 'Simple MNIST convnet' on all 60k training images (no validation_split), "
    "warm-up fit/evaluate on 2 batches first, weights and Adam state reset, then per-epoch "
    "train time (epoch start to validation start); 99% is checked once per epoch as in the "
    "recipe, capped at 15 epochs. Ours: steps to the first eval >= 99% (every "
    f"{harness.EVAL_IMAGES} training images, and at the end) x global batch / the trainer's "
    "steady images/s.",
    "Medians count a seed that never reached 99% as infinitely slow.",
    "Every process, the reference included, runs with the trainer's TF_ENABLE_ONEDNN_OPTS "
    "setting (1 unless set otherwise): TensorFlow turns oneDNN on by itself only on CPUs with "
    "AVX-512 VNNI/BF16 or AMX, and the ratios should compare recipes and loops, not kernels.",
    "Throughput: the trainer's steady images/s excludes its first chunk; Keras fit excludes "
    "its first epoch and uses only epoch-level callbacks (batch dispatch stays asynchronous). "
    "Throughput ratios take the fastest of their interleaved repeats on each side. "
    "Keras does not use XLA on CPU by default (jit_compile='auto' resolves to False).",
    "FLOPs are analytic (2 per multiply-add, conv and dense layers only); training = 3 x "
    "forward, which slightly overcounts because the first convolution needs no input gradient.",
    "Other processes on this machine can slow any run; 'other procs' CPU' is the share of both "
    "cores used by processes outside the benchmark during that run.",
]


def _machine_meta(b: Bench, started: str, wall_s: float, only) -> dict:
  cpu = hardware.read_cpuinfo()
  peak = effective_peak(b.hardware or {})
  others = [r["cpu"]["others_cpu"] for r in b.runs]
  return {"started": started, "wall_s": wall_s, "mode": "quick" if b.quick else "full",
          "only": ",".join(only), "seeds": b.seeds, "cpu_model": cpu.model_name,
          "cpu_family": cpu.family, "cpu_model_id": cpu.model, "cores": cpu.cores,
          "clock_ghz": peak.clock_ghz, "flops_per_cycle": peak.flops_per_cycle,
          "peak_gflops": peak.gflops, "peak_assumption": peak.assumption,
          "tf_version": _version("tensorflow"), "keras_version": _version("keras"),
          "python": platform.python_version(), "others_cpu_max": max(others, default=None)}


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def run(names, quick: bool, seeds, cache_dir: str, only=(), quiet_wait_s: float = 0.0) -> dict:
  """Runs the named metrics in order and returns the full results dict."""
  started = datetime.datetime.now().isoformat(timespec="seconds")
  tic = time.monotonic()
  code_before = harness.trainer_fingerprint()
  b = Bench(quick, cache_dir, seeds, quiet_wait_s)
  harness.prepare_data(b.data_dir)
  metrics = {}
  for name in names:
    print(f"[bench] measuring {name}", flush=True)
    try:
      m = METRICS[name](b)
    except Exception as e:  # One broken measurement must not cost the others.
      m = {"value": float("nan"), "basis": f"error: {type(e).__name__}: {e}"}
    m["status"] = stats.target(name).status(m["value"])
    m["target"] = stats.target(name).threshold
    m["description"] = stats.target(name).description
    metrics[name] = m
  b.hardware_info()
  meta = _machine_meta(b, started, time.monotonic() - tic, only)
  code_after = harness.trainer_fingerprint()
  meta.update(code=code_before,
              code_changed_during_run=harness.trainer_changed(code_before, code_after))
  return {"meta": meta, "metrics": metrics, "runs": b.runs,
          "notes": harness.code_notes(code_before, code_after) + list(NOTES)}


def write(results: dict, out_dir: str) -> str:
  safe = report.json_safe(results)
  text = report.markdown(safe)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(safe, f, indent=2)
    f.write("\n")
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  return text


def _selected(only) -> list:
  unknown = [n for n in only if n not in METRICS]
  if unknown:
    raise app.UsageError(f"--only: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(METRICS)}")
  return [n for n in METRICS if n in only] if only else list(METRICS)



def _define_flags() -> None:
  """Flags exist only when this module is the entry point (importing it defines none)."""
  flags.DEFINE_boolean("quick", False, "One seed and short runs: a smoke test, not a measurement.")
  flags.DEFINE_list("only", [], "Run only these metrics (names as in the targets table).")
  flags.DEFINE_list("seeds", [], "Seeds for time_to_99_ratio (default 1,2,3; --quick: 1).")
  flags.DEFINE_string("out_dir", os.path.dirname(os.path.abspath(__file__)),
                      "Where results.json and results.md go.")
  flags.DEFINE_string("cache_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                ".cache"),
                      "Prepared TFDS data (tfds/) and per-run model dirs and logs (runs/).")
  flags.DEFINE_float("clock_ghz", 0.0, "CPU clock for the peak (0: /proc/cpuinfo, raised to what "
                     "a measured matmul proves).")
  flags.DEFINE_integer("flops_per_cycle", 0, "FP32 FLOP/cycle/core for the peak (0: detect).")
  flags.DEFINE_float("quiet_wait_s", 90.0, "Before each measurement, wait up to this long for "
                     "other processes to leave the CPU idle (0: never wait).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  names = _selected(FLAGS.only)
  seeds = [int(s) for s in FLAGS.seeds] or ([1] if FLAGS.quick else [1, 2, 3])
  results = run(names, FLAGS.quick, seeds, FLAGS.cache_dir, FLAGS.only, FLAGS.quiet_wait_s)
  print(write(results, FLAGS.out_dir))


if __name__ == "__main__":
  _define_flags()
  app.run(main)

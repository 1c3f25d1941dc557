"""The benchmark's pure parts (parsing, medians and ratios, rows, report, progress line), its
synthetic dataset writer, and one short end-to-end `python -m bench.run --quick`."""

import datetime
import json
import math
import os
import subprocess
import sys

import pytest

from bench import flops
from bench import probes
from bench import procs
from bench import recipes
from bench import report
from bench import run as bench_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2596.134
flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2596.134
flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16
"""


# ---- FLOPs and peak ----


def test_conv_and_dense_flops_by_hand():
  assert flops.conv2d_flops(4, 4, 3, 3, 1, 2) == 16 * 9 * 2 * 2
  assert flops.dense_flops(32, 10) == 2 * 32 * 10


def test_model_flops_of_a_tiny_keras_model():
  keras = pytest.importorskip("keras")
  model = keras.Sequential([
      keras.Input(shape=(6, 6, 1)),
      keras.layers.Conv2D(2, 3, padding="valid", name="c"),  # 4x4x2 out
      keras.layers.MaxPooling2D(name="p"),
      keras.layers.Flatten(name="f"),
      keras.layers.Dense(3, name="d"),
  ])
  counted = flops.model_flops(model)
  assert counted["per_layer_forward"] == {"c": 2 * 16 * 9 * 2, "d": 2 * 8 * 3}
  assert counted["forward"] == 624 and counted["train"] == 3 * 624


def test_default_model_flops():
  pytest.importorskip("keras")
  from trainer import config as config_lib
  from trainer import model as model_lib
  model = model_lib.build_model(config_lib.Config(epochs=1).model, (28, 28, 1), 10)
  # 2x2 fold to 14x14x4, conv 3x3 same to 32 then 48 (14x14), pool to 7x7x48, dense 128.
  expected = (2 * 14 * 14 * 9 * 4 * 32 + 2 * 14 * 14 * 9 * 32 * 48 + 2 * 7 * 7 * 48 * 128
              + 2 * 128 * 10)
  assert flops.model_flops(model)["forward"] == expected


def test_same_model_is_the_keras_io_convnet():
  pytest.importorskip("keras")
  from trainer import config as config_lib
  from trainer import model as model_lib
  assert probes.model_flags(probes.SAME_MODEL)[:2] == ["--model_widths=32,64",
                                                       "--kernel_sizes=3,3"]
  assert "--batch_norm=false" in probes.model_flags(probes.SAME_MODEL)
  ours = model_lib.build_model(config_lib.Config(epochs=1, **probes.SAME_MODEL).model,
                              (28, 28, 1), 10)
  reference = probes.keras_io_model()
  assert ours.count_params() == reference.count_params() == 34_826
  assert flops.model_flops(ours)["forward"] == flops.model_flops(reference)["forward"]


def test_nominal_peak_from_cpuinfo():
  cpu = flops.parse_cpuinfo(_CPUINFO)
  assert cpu["cores"] == 2 and cpu["family"] == 25
  peak = flops.nominal_peak(cpu)
  assert peak["gflops"] == pytest.approx(2 * 2.596134 * 32)
  assert "double-pumped" in peak["assumption"]
  plain = flops.parse_cpuinfo(_CPUINFO.replace(" avx512f avx512_bf16", "")
                              .replace("AuthenticAMD", "GenuineIntel"))
  assert flops.flops_per_cycle(plain)[0] == 32
  intel512 = flops.parse_cpuinfo(_CPUINFO.replace("AuthenticAMD", "GenuineIntel"))
  assert flops.flops_per_cycle(intel512)[0] == 64


# ---- medians, ratios, targets ----


def test_median_counts_failures_as_infinitely_slow():
  assert report.median_with_failures([3.0, 1.0, 2.0]) == 2.0
  assert report.median_with_failures([3.0, None, 1.0]) == 3.0
  assert report.median_with_failures([None, None, 1.0]) == math.inf
  assert math.isnan(report.median_with_failures([]))


def test_ratio_edge_cases():
  assert report.ratio(6.0, 3.0) == 2.0
  assert report.ratio(87.0, math.inf) == 0.0  # ours never reached 99%
  assert report.ratio(math.inf, 20.0) == math.inf  # the reference never did
  assert math.isnan(report.ratio(math.inf, math.inf))
  assert math.isnan(report.ratio(None, 1.0))
  assert math.isnan(report.ratio(float("nan"), 1.0))


def test_target_status_by_operator_and_kind():
  at_least = report.Target("a", ">=", 10)
  assert [at_least.status(v) for v in (10.0, 9.99, float("nan"), None)] == [
      "PASS", "FAIL", "N/A", "N/A"]
  below = report.Target("b", "<", 1.1)
  assert (below.status(1.09), below.status(1.1)) == ("PASS", "FAIL")
  aim = report.Target("c", "<=", 10, kind="aim")
  assert (aim.status(9.0), aim.status(17.0)) == ("aim met", "aim missed")
  assert report.Target("d", None, None, kind="info").status(3.0) == "info"
  assert (at_least.goal(), below.goal(), report.Target("d", None, None).goal()) == (
      ">= 10.00", "< 1.10", "-")


def test_rows_have_unique_names_and_known_groups():
  names = [t.name for t in bench_run.TARGETS]
  assert len(names) == len(set(names))
  groups = {j.group for j in bench_run.jobs(bench_run.settings(False))}
  for _, _, needs in bench_run.ROWS:
    assert set(needs) <= groups


# ---- parsing what the runs leave ----


def test_absl_time_and_eval_points():
  started = datetime.datetime(2026, 12, 3, 10, 39, 30).timestamp()
  log = ("I1203 10:39:38.237121 1401 actions.py:180] eval at step 60: test_accuracy 0.9297 "
         "test_loss 0.2669 (6.9s into training)\n"
         "[worker:0] I1203 10:39:40.500000 1401 actions.py:180] eval at step 120: "
         "test_accuracy 0.9900 test_loss 0.0300 (9.1s into training)\n"
         "I1203 10:39:41.000000 1401 train.py:278] phases: total 11.0 s\n")
  points = procs.eval_points(log, started)
  assert [(s, a) for s, a, _ in points] == [(60, 0.9297), (120, 0.99)]
  assert points[0][2] == pytest.approx(8.237121) and points[1][2] == pytest.approx(10.5)
  # Across New Year: a December start, a January line.
  new_year = datetime.datetime(2026, 12, 31, 23, 59, 59).timestamp()
  assert procs.absl_time("I0101 00:00:01.000000 1 x.py:1] hi", new_year) == pytest.approx(
      new_year + 2)
  assert procs.absl_time("no prefix here", started) is None


def test_json_lines_and_last_line():
  log = "noise\nresult {\"a\": 1}\nepoch_end {\"epoch\": 1}\nresult {\"a\": 2}\n\n"
  assert procs.json_lines(log, "result") == [{"a": 1}, {"a": 2}]
  assert procs.json_lines(log, "epoch_end") == [{"epoch": 1}]
  assert procs.last_line(log) == 'result {"a": 2}' and procs.last_line("") == "no output"


def _metrics(accuracy=0.992, step=470):
  return {"global_step": step, "test_accuracy": accuracy, "train_images_per_sec": 8000.0,
          "wall_seconds": 21.0,  # as metrics.json has them: keys sorted
          "phase_seconds": {"build": 0.2, "data": 0.5, "evaluate": 0.6, "export": 0.2,
                            "start-up": 3.5, "train": 16.0}}


def test_trainer_summary_takes_the_final_evaluation_from_the_phases():
  s = bench_run.trainer_summary(_metrics(), [], batch=256)
  assert s["reached"] and s["steps_to_99"] == 470
  assert s["wall_to_99_s"] == pytest.approx(20.8)  # through "evaluate", export left out
  assert s["train_s_to_99"] == pytest.approx(470 * 256 / 8000)
  # An earlier logged evaluation >= 99% wins; one below it does not.
  s = bench_run.trainer_summary(_metrics(), [(300, 0.985, 12.0), (400, 0.991, 15.5)], 256)
  assert (s["steps_to_99"], s["wall_to_99_s"]) == (400, 15.5)
  s = bench_run.trainer_summary(_metrics(accuracy=0.989), [(300, 0.985, 12.0)], 256)
  assert not s["reached"] and s["wall_to_99_s"] is None
  assert bench_run.trainer_summary(None, [], 256) == {}


def test_reference_summary():
  started = 1000.0
  epochs = [{"epoch": 1, "train_s": 15.0, "val_accuracy": 0.975, "time": 1025.0},
            {"epoch": 2, "train_s": 10.0, "val_accuracy": 0.985, "time": 1036.0},
            {"epoch": 3, "train_s": 12.0, "val_accuracy": 0.990, "time": 1049.0}]
  s = bench_run.reference_summary(epochs, started)
  assert s["reached"] and s["epochs_to_99"] == 3 and s["wall_to_99_s"] == 49.0
  assert s["images_per_sec"] == pytest.approx(60000 / 11.0)  # epoch 1 (tracing) left out
  assert s["train_s_to_99"] == pytest.approx(33.0)
  assert not bench_run.reference_summary(epochs[:2], started)["reached"]


# ---- rows from records ----


def _records():
  def trainer(name, wall, rate, to99, rss=None, phases=None):
    return {"name": name, "ok": True, "wall_s": wall, "max_rss_mb": rss,
            "summary": {"images_per_sec": rate, "wall_to_99_s": to99,
                        "train_s_to_99": None if to99 is None else to99 / 2,
                        "phases": phases or {"train": wall - 4.0, "start-up": 3.0}}}
  records = {}
  for seed, (ref, ours) in enumerate([(100.0, 20.0), (None, 22.0), (90.0, 21.0)], 1):
    records[f"reference_seed{seed}"] = trainer(f"reference_seed{seed}", 120, 5000, ref)
    records[f"default_seed{seed}"] = trainer(f"default_seed{seed}", ours + 1, 8000 + seed, ours)
    records[f"stream_seed{seed}"] = trainer(f"stream_seed{seed}", ours + 2, 7600, ours + 1)
  records["fixed_cost_r1"] = trainer("fixed_cost_r1", 6.0, None, None)
  records["hardware"] = {"ok": True, "result": {"default_model": {"train": 19_000_000},
                                                "matmul_best_gflops": 250.0,
                                                "matmul_gflops": {"2048": 250.0}}}
  records["pipeline_stream"] = {"ok": True, "summary": {"images_per_sec": 76_000}}
  for m, rss in ((1, 900.0), (10, 950.0), (30, 980.0)):
    records[f"rss_stream_{m}x"] = trainer(f"rss_stream_{m}x", 10, 1, None, rss=rss)
  return records


def test_stream_throughput_ratio_pairs_runs_of_one_seed():
  records = _records()
  # A slow stretch that slows both runs of a seed leaves their ratio alone.
  records["default_seed1"]["summary"]["images_per_sec"] = 4000
  records["stream_seed1"]["summary"]["images_per_sec"] = 3900
  records["stream_seed3"]["summary"]["images_per_sec"] = None  # a failed run: no pair
  paired = bench_run.stream_throughput_ratio(records, {})
  assert paired["value"] == pytest.approx((3900 / 4000 + 7600 / 8002) / 2)
  assert "0.97, 0.95" in paired["basis"]


def test_rows_from_records():
  records, ctx = _records(), {"nominal_peak": {"gflops": 500.0, "assumption": "x"}}
  row = bench_run.wall_time_to_99_ratio(records, ctx)
  # Reference median with one failure counted as inf: median(100, inf, 90) = 100; ours 21.
  assert row["value"] == pytest.approx(100 / 21)
  assert "2/3 reached 99%" in row["basis"] and "3/3 reached 99%" in row["basis"]
  assert bench_run.time_to_99_ratio(records, ctx)["value"] == pytest.approx(50 / 10.5)
  # --quick caps the reference's epochs: a reference that did not reach 99% gives no ratio.
  quick = bench_run.wall_time_to_99_ratio(records, {**ctx, "quick": True})
  assert math.isnan(quick["value"]) and "--quick" in quick["basis"]
  fixed = bench_run.fixed_cost_s(records, ctx)
  assert fixed["value"] == 6.0 and "0.27 of the default run's 22.0 s" in fixed["basis"]
  # Phases in the trainer's order (metrics.json sorts them), and what follows them.
  assert "phases (fixed_cost_r1): start-up 3.0, train 2.0, after export 1.0 s" in fixed["basis"]
  assert bench_run.default_run_wall_s(records, ctx)["value"] == 22.0
  assert bench_run.fraction_of_measured_peak(records, ctx)["value"] == pytest.approx(
      8002 * 19e6 / 1e9 / 250)
  assert bench_run.fraction_of_nominal_peak(records, ctx)["value"] == pytest.approx(
      8002 * 19e6 / 1e9 / 500)
  assert bench_run.stream_throughput_ratio(records, ctx)["value"] == pytest.approx(7600 / 8002)
  assert bench_run.stream_input_headroom(records, ctx)["value"] == pytest.approx(10.0)
  growth = bench_run.stream_rss_growth(records, ctx)
  assert growth["value"] == pytest.approx(980 / 900) and "30x 980 MB" in growth["basis"]
  assert math.isnan(bench_run.in_memory_rss_growth(records, ctx)["value"])
  assert math.isnan(bench_run.two_worker_ratio(records, ctx)["value"])


def test_a_bfloat16_default_is_measured_against_the_bfloat16_matmul():
  records, ctx = _records(), {"nominal_peak": {"gflops": 500.0, "assumption": "x"}}
  records["hardware"]["result"].update(matmul_bf16_best_gflops=480.0,
                                       matmul_bf16_gflops={"2048": 480.0})
  fp32 = bench_run.fraction_of_measured_peak(records, ctx)
  assert fp32["value"] == pytest.approx(8002 * 19e6 / 1e9 / 250) and "fp32 matmul" in fp32["basis"]
  for seed in (1, 2, 3):
    records[f"default_seed{seed}"]["metrics"] = {"precision": "mixed_bfloat16"}
  bf16 = bench_run.fraction_of_measured_peak(records, ctx)
  assert bf16["value"] == pytest.approx(8002 * 19e6 / 1e9 / 480)
  assert "bfloat16 matmul 480.0" in bf16["basis"] and "mixed_bfloat16" in bf16["basis"]
  assert "mixed_bfloat16" in bench_run.default_run_wall_s(records, ctx)["basis"]
  # Runs that disagree are named as such, never silently measured against one peak.
  records["default_seed2"]["metrics"] = {"precision": "float32"}
  assert bench_run.fraction_of_measured_peak(records, ctx)["details"]["precision"] == (
      "float32/mixed_bfloat16")


def test_plan_runs_only_what_the_rows_need_interleaved():
  full = bench_run.settings(False)
  names = [j.name for j in bench_run.plan(["wall_time_to_99_ratio"], full)]
  assert names == ["prepare_mnist", "reference_seed1", "default_seed1", "reference_seed2",
                   "default_seed2", "reference_seed3", "default_seed3"]
  quick = bench_run.settings(True)
  assert [j.name for j in bench_run.plan(["fixed_cost_s"], quick)] == [
      "prepare_mnist", "default_seed1", "fixed_cost_r1"]
  assert [j.name for j in bench_run.plan(["stream_rss_growth"], full)] == [
      "prepare_synth", "rss_stream_1x", "rss_stream_10x", "rss_stream_30x"]
  assert [j.name for j in bench_run.plan(["stream_throughput_ratio"], full)] == [
      "prepare_mnist", "default_seed1", "stream_seed1", "stream_seed2", "default_seed2",
      "default_seed3", "stream_seed3"]
  every = bench_run.plan([t.name for t in bench_run.TARGETS], full)
  assert len({j.name for j in every}) == len(every)
  # The whole full run must fit in 15 minutes on a quiet 2-core machine.
  assert sum(bench_run.estimate(j, full) for j in every) < 15 * 60


def test_progress_line_and_eta():
  assert report.mmss(0) == "0:00" and report.mmss(754.4) == "12:34"
  # Finished jobs took twice their estimate: the rest is expected to as well.
  assert report.eta(200.0, 100.0, 300.0) == 600.0
  assert report.eta(0.0, 0.0, 300.0) == 300.0
  line = report.progress_line(3, 24, 135.0, 520.0, "reference_seed1", "wall 98.2 s")
  assert line == "[bench 3/24 2:15 elapsed, ETA 8:40] reference_seed1: wall 98.2 s"


def _results():
  return {
      "meta": {"started": "2026-01-01T00:00:00", "wall_s": 12.0, "mode": "quick", "only": "",
               "cpu": "AMD EPYC", "cores": 2, "tf_version": "2.21.0", "keras_version": "3",
               "python": "3.11", "code": "abc", "others_cpu_max": 0.1},
      "metrics": {
          "wall_time_to_99_ratio": {"value": math.inf, "status": "PASS", "basis": "a | b"},
          "input_headroom": {"value": float("nan"), "status": "N/A", "basis": "error"},
          "fixed_cost_s": {"value": 7.5, "status": "FAIL", "basis": "x"},
          "in_memory_rss_growth": {"value": 4.2, "status": "info", "basis": "y"}},
      "runs": [{"name": "r1", "ok": True, "wall_s": 3.0, "max_rss_mb": 950.4, "others_cpu": 0.0,
                "summary": {"images_per_sec": 3456.7, "wall_to_99_s": 20.5,
                            "final_accuracy": 0.99123}},
               {"name": "r2", "ok": False, "error": "exit 1", "summary": {}}],
      "notes": ["n1"],
  }


def test_markdown_report():
  text = report.markdown(report.json_safe(_results()), bench_run.TARGETS)
  lines = text.splitlines()
  assert "| wall_time_to_99_ratio | inf | >= 10.00 | PASS | a \\| b |" in lines
  assert "| input_headroom | - | >= 20.00 | N/A | error |" in lines
  assert "| fixed_cost_s | 7.500 | <= 5.00 | FAIL | x |" in lines
  assert "| in_memory_rss_growth | 4.200 | - | info | y |" in lines
  assert "| r1 | 3.0 | 950 | 3,457 | 20.5 | 0.9912 | 0.00 | ok |" in lines
  assert "| r2 | - | - | - | - | - | - | exit 1 |" in lines
  assert "- n1" in lines
  for block in text.split("\n\n"):
    rows = [l for l in block.splitlines() if l.startswith("|")]
    if rows:
      assert len({l.replace("\\|", "").count("|") for l in rows}) == 1


def test_json_safe_is_strict_json():
  safe = report.json_safe(_results())
  assert json.loads(json.dumps(safe, allow_nan=False))["metrics"]["wall_time_to_99_ratio"][
      "value"] == "inf"
  assert safe["metrics"]["input_headroom"]["value"] is None


def test_fmt():
  assert report.fmt(None) == "-" and report.fmt(float("inf")) == "inf"
  assert report.fmt(1234.567, 1) == "1,234.6" and report.fmt(7) == "7"


def test_recipe_parsing():
  assert recipes.parse_recipe("e1=--epochs=1 --xla") == ("e1", ["--epochs=1", "--xla"])
  assert recipes.parse_recipe("default=") == ("default", [])


# ---- the synthetic dataset, read by the trainer's own data code ----


def test_synthetic_dataset_is_readable_by_the_trainer(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf
  from bench import synth
  from trainer import config as config_lib
  from trainer import data
  from trainer.data import stream
  directory = synth.write(str(tmp_path), "synth_mnist_tiny", 250, shards=3, distinct=100,
                          test_examples=40)
  assert sorted(f for f in os.listdir(directory) if "train" in f) == [
      f"synth_mnist_tiny-train.tfrecord-0000{i}-of-00003" for i in range(3)]
  builder = data.prepare("synth_mnist_tiny", str(tmp_path))
  assert builder.info.splits["train"].num_examples == 250
  source = data.record_source(builder)
  assert source.counts == (84, 83, 83) and source.image_shape == (28, 28, 1)
  config = config_lib.Config(model_dir=str(tmp_path / "m"), data_dir=str(tmp_path),
                             dataset="synth_mnist_tiny", epochs=1)
  splits = data.load(config.data)
  pixels, labels = synth.images(100, seed=1)
  # TFDS interleaves the files, so compare (image, label) pairs as multisets: the 100 distinct
  # ones, repeated past `distinct`.
  written = sorted((p.tobytes(), int(l)) for p, l in zip(pixels, labels))
  read = sorted((p.tobytes(), int(l)) for p, l in zip(splits.train_images, splits.train_labels))
  assert len(read) == 250 and set(read) == set(written)
  assert sorted(set(read)) == written and read.count(written[0]) in (2, 3)
  assert splits.test_images.shape == (40, 28, 28, 1) and splits.num_classes == 10
  ds = stream.train_dataset_fn(source, 32, seed=1, shuffle_buffer=64, total_steps=2)(
      tf.distribute.InputContext())
  images, _, weights = next(iter(ds))
  assert images.shape == (32, 28, 28, 1) and float(tf.reduce_sum(weights)) == 32
  # Written once: a second call keeps the files.
  mtime = os.path.getmtime(os.path.join(directory, "dataset_info.json"))
  synth.write(str(tmp_path), "synth_mnist_tiny", 250, shards=3)
  assert os.path.getmtime(os.path.join(directory, "dataset_info.json")) == mtime


def test_entry_points_define_flags_only_when_run():
  """Importing any entry point next to another must not collide on flag names."""
  code = ("import bench.run, bench.recipes, bench.probes, deploy.vertex, deploy.k8s\n"
          "from trainer import launcher, predict, task\nprint('imported')")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
  assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
  """`python -m bench.run --quick --only=fixed_cost_s`: prepares MNIST (once per cache), runs
  the default recipe and a 1-step run, prints a progress line per job, writes the report."""
  result = subprocess.run(
      [sys.executable, "-m", "bench.run", "--quick", "--only=fixed_cost_s",
       f"--out_dir={tmp_path}", "--quiet_wait_s=0"],
      capture_output=True, text=True, cwd=ROOT, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  progress = [l for l in result.stdout.splitlines() if l.startswith("[bench ")]
  assert [l.split("] ")[1].split(":")[0] for l in progress] == [
      "prepare_mnist", "default_seed1", "fixed_cost_r1"], result.stdout
  assert all("ETA" in l for l in progress)
  text = (tmp_path / "results.md").read_text()
  row = next(l for l in text.splitlines() if l.startswith("| fixed_cost_s |"))
  # DISTURBED when other processes (a neighbouring test) took the CPU while it measured.
  assert any(f"| {status} |" in row for status in ("PASS", "FAIL", "DISTURBED")), text
  assert "of the default run's" in row, text
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["metrics"]["fixed_cost_s"]["value"] > 0


def _busy_loop(seconds: float):
  """A real process that keeps one core busy for `seconds` (the disturbance)."""
  return subprocess.Popen([sys.executable, "-c",
                           f"import time\nend = time.time() + {seconds}\n"
                           "while time.time() < end: pass\n"])


def test_a_disturbed_measurement_is_repeated_and_its_rows_say_so(tmp_path):
  """Other processes take the CPU during every try: the job runs MEASUREMENT_TRIES times, its
  record says disturbed, and a row that reads it says DISTURBED, not PASS, although its value
  would pass (as a peak measured too low made fraction_of_measured_peak read 1.49 and PASS)."""
  def measure(b):
    return procs.run("timeit", ["-n", "1", "-r", "1", "sum(range(3 * 10**6))"],
                     str(tmp_path / "log.txt"), timeout_s=60)

  job = bench_run.Job("hardware", "hardware", 1, measure)
  hogs = [_busy_loop(30) for _ in range(2 * len(os.sched_getaffinity(0)))]
  try:
    record = bench_run.run_undisturbed(job, None)
  finally:
    for hog in hogs:
      hog.kill()
      hog.wait()
  assert record["returncode"] == 0 and record["disturbed"] and record["others_cpu"] > 0.1
  assert record["tries"] == bench_run.MEASUREMENT_TRIES
  target = report.Target("fraction_of_measured_peak", ">=", 0.6)
  row = {"value": 0.9}
  groups = ("hardware", "default")
  assert bench_run.row_status(target, row, {"hardware": record}, groups) == "DISTURBED"
  quiet = dict(record, disturbed=False)
  assert bench_run.row_status(target, row, {"hardware": quiet}, groups) == "PASS"


def test_a_quiet_measurement_runs_once(tmp_path):
  job = bench_run.Job("x", "default", 1, lambda b: procs.run(
      "timeit", ["-n", "1", "-r", "1", "pass"], str(tmp_path / "log.txt"), timeout_s=60))
  record = bench_run.run_undisturbed(job, None)
  # Another test may be busy beside this one: then it is tried again.
  assert record["returncode"] == 0 and 1 <= record["tries"] <= bench_run.MEASUREMENT_TRIES


def test_a_fraction_of_a_peak_above_one_never_passes():
  target = report.Target("fraction_of_measured_peak", ">=", 0.6)
  status = bench_run.row_status(target, {"value": 1.49}, {}, ("hardware",))
  assert "PASS" not in status and "above 1" in status
  assert bench_run.row_status(target, {"value": 0.63}, {}, ("hardware",)) == "PASS"
  assert bench_run.row_status(target, {"value": 0.5}, {}, ("hardware",)) == "FAIL"

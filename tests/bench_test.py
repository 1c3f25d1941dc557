"""Pure helpers of the benchmark harness: FLOP counts, peak, log parsing, medians, tables."""

import json
import math

import pytest

from bench import flops
from bench import hardware
from bench import harness
from bench import procs
from bench import recipes
from bench import report
from bench import stats

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


def test_conv_and_dense_flops_by_hand():
  # 3x3 conv, 1 -> 2 channels, 4x4 output: 16 positions x 9 taps x 2 outputs x 2 FLOP.
  assert flops.conv2d_flops(4, 4, 3, 3, 1, 2) == 16 * 9 * 2 * 2
  assert flops.dense_flops(32, 10) == 2 * 32 * 10


def test_model_flops_of_a_tiny_keras_model():
  keras = pytest.importorskip("keras")
  model = keras.Sequential([
      keras.Input(shape=(6, 6, 1)),
      keras.layers.Conv2D(2, 3, padding="valid", name="c"),  # 4x4x2 out
      keras.layers.MaxPooling2D(name="p"),                   # 2x2x2
      keras.layers.Flatten(name="f"),                        # 8
      keras.layers.Dense(3, name="d"),
  ])
  counted = flops.model_flops(model)
  conv = 2 * (4 * 4) * (3 * 3) * 1 * 2
  dense = 2 * 8 * 3
  assert counted["per_layer_forward"] == {"c": conv, "d": dense}
  assert counted["forward"] == conv + dense == 624
  assert counted["train"] == 3 * 624


def test_trainer_model_flops():
  pytest.importorskip("keras")
  from trainer import config as config_lib
  from trainer import model as model_lib

  def forward(**fields):
    config = config_lib.Config(epochs=1, **fields)
    return flops.model_flops(model_lib.build_model(config, (28, 28, 1), 10))["forward"]

  # The default: 2x2 fold to 14x14x4, conv 3x3 same to 32 then 48 (14x14), pool to 7x7x48.
  conv0 = 2 * 14 * 14 * 9 * 4 * 32
  conv1 = 2 * 14 * 14 * 9 * 32 * 48
  assert forward() == conv0 + conv1 + 2 * 7 * 7 * 48 * 128 + 2 * 128 * 10
  same = dict(model_widths=(32, 64), kernel_sizes=(3, 3), conv_padding="same")
  conv0 = 2 * 28 * 28 * 9 * 1 * 32  # same padding keeps 28x28
  conv1 = 2 * 14 * 14 * 9 * 32 * 64
  assert forward(batch_norm=True, dense_units=0, **same) == conv0 + conv1 + 2 * 7 * 7 * 64 * 10


def test_same_model_is_the_keras_io_convnet():
  pytest.importorskip("keras")
  from trainer import config as config_lib
  from trainer import model as model_lib
  assert harness.model_flags(harness.SAME_MODEL) == [
      "--model_widths=32,64", "--kernel_sizes=3,3", "--pool_sizes=2,2", "--conv_padding=valid",
      "--space_to_depth=1", "--batch_norm=false", "--dropout=0.5", "--dense_units=0"]
  ours = model_lib.build_model(config_lib.Config(epochs=1, **harness.SAME_MODEL), (28, 28, 1), 10)
  reference = harness.keras_io_model()
  assert ours.count_params() == reference.count_params() == 34_826
  assert flops.model_flops(ours)["forward"] == flops.model_flops(reference)["forward"]


def test_compute_bound_model_flops_count_the_folded_channels():
  pytest.importorskip("keras")
  from trainer import config as config_lib
  from trainer import model as model_lib
  model = model_lib.build_model(config_lib.Config(epochs=1, **harness.COMPUTE_BOUND_MODEL),
                                (28, 28, 1), 10)
  # 2x2 space-to-depth: 14x14x4; conv 32 and conv 64 keep 14x14 (same); pool to 7x7x64.
  conv0 = 2 * 14 * 14 * 9 * 4 * 32
  conv1 = 2 * 14 * 14 * 9 * 32 * 64
  expected = conv0 + conv1 + 2 * 7 * 7 * 64 * 256 + 2 * 256 * 10
  assert flops.model_flops(model)["forward"] == expected
  default = model_lib.build_model(config_lib.Config(epochs=1), (28, 28, 1), 10)
  assert expected > 1.4 * flops.model_flops(default)["forward"]


def test_zen4_peak_assumes_double_pumped_avx512():
  cpu = hardware.parse_cpuinfo(_CPUINFO)
  assert (cpu.cores, cpu.family, cpu.model) == (2, 25, 17)
  peak = hardware.fp32_peak(cpu)
  assert peak.flops_per_cycle == 32
  assert peak.gflops == pytest.approx(2 * 2.596134 * 32)
  assert "double-pumped" in peak.assumption
  zen3 = hardware.parse_cpuinfo(_CPUINFO.replace(" avx512f avx512_bf16", ""))
  per_cycle, why = hardware.fp32_flops_per_cycle(zen3)
  assert per_cycle == 32 and "Zen 3" in why and "AVX-512" not in why


def test_peak_overrides_and_other_cpus():
  cpu = hardware.parse_cpuinfo(_CPUINFO)
  assert hardware.fp32_peak(cpu, clock_ghz=3.0, flops_per_cycle=64).gflops == 2 * 3.0 * 64
  intel = hardware.parse_cpuinfo(_CPUINFO.replace("AuthenticAMD", "GenuineIntel")
                                 .replace("cpu family\t: 25", "cpu family\t: 6"))
  assert hardware.fp32_flops_per_cycle(intel)[0] == 64
  plain = hardware.parse_cpuinfo(_CPUINFO.replace(" avx512f avx512_bf16", "")
                                 .replace("AuthenticAMD", "GenuineIntel"))
  assert hardware.fp32_flops_per_cycle(plain)[0] == 32


def test_median_counts_failures_as_infinitely_slow():
  assert stats.median_with_failures([3.0, 1.0, 2.0]) == 2.0
  assert stats.median_with_failures([3.0, None, 1.0]) == 3.0
  assert stats.median_with_failures([None, None, 1.0]) == math.inf
  assert stats.median_with_failures([1.0, 3.0]) == 2.0
  assert math.isnan(stats.median_with_failures([]))


def test_ratio_edge_cases():
  assert stats.ratio(6.0, 3.0) == 2.0
  assert stats.ratio(87.0, math.inf) == 0.0  # ours never reached 99%
  assert stats.ratio(math.inf, 20.0) == math.inf  # the reference never did
  assert math.isnan(stats.ratio(math.inf, math.inf))
  assert math.isnan(stats.ratio(None, 1.0))
  assert math.isnan(stats.ratio(float("nan"), 1.0))


def test_target_status():
  t = stats.target("time_to_99_ratio")
  assert (t.status(10.0), t.status(9.99), t.status(float("nan"))) == ("PASS", "FAIL", "N/A")
  assert stats.target("two_device_ratio").status(1.3) == "info"
  with pytest.raises(KeyError):
    stats.target("nope")


def test_eval_lines_and_first_reaching():
  log = ("I1125 train.py:312] eval at step 60: test_accuracy 0.9297 test_loss 0.2669 "
         "(6.9s into training)\n"
         "[worker:0] I1125 train.py:312] eval at step 120: test_accuracy 0.9900 test_loss "
         "0.0300 (14.3s into training)\n")
  evals = procs.parse_eval_lines(log)
  assert evals == [(60, 0.9297, 6.9), (120, 0.99, 14.3)]
  assert procs.first_reaching(evals, 0.99) == (120, 0.99, 14.3)
  assert procs.first_reaching(evals, 0.995) is None


def test_recipe_parsing_and_eval_spacing():
  assert recipes.parse_recipe("e1=--epochs=1 --xla") == ("e1", ["--epochs=1", "--xla"])
  assert recipes.parse_recipe("default=") == ("default", [])
  # Every 7,680 training images, whatever the batch (the default recipe's is 256).
  assert recipes.eval_every([]) == 7680 // harness.DEFAULT_BATCH == 30
  assert recipes.eval_every(["--global_batch_size=512"]) == 15


def _results():
  return {
      "meta": {"started": "2026-01-01T00:00:00", "wall_s": 12.0, "mode": "quick", "only": "",
               "cpu_model": "AMD EPYC", "cpu_family": 25, "cpu_model_id": 17, "cores": 2,
               "clock_ghz": 2.6, "peak_gflops": 166.4, "peak_assumption": "2 x 2.6 x 32",
               "tf_version": "2.21.0", "keras_version": "3", "python": "3.11",
               "others_cpu_max": 0.1},
      "metrics": {
          "time_to_99_ratio": {"value": math.inf, "status": "PASS", "basis": "a | b"},
          "input_headroom": {"value": float("nan"), "status": "N/A", "basis": "error"},
          "two_device_ratio": {"value": 1.25, "status": "info", "basis": "x"}},
      "runs": [{"name": "r1", "ok": True, "cpu": {"wall_s": 3.0, "others_cpu": 0.0},
                "summary": {"images_per_sec": 3456.7, "time_to_99_s": 20.5,
                            "final_accuracy": 0.99123}},
               {"name": "r2", "ok": False, "error": "exit 1", "cpu": {}, "summary": {}}],
      "notes": ["n1"],
  }


def test_json_safe_is_strict_json():
  safe = report.json_safe(_results())
  text = json.dumps(safe, allow_nan=False)
  assert json.loads(text)["metrics"]["time_to_99_ratio"]["value"] == "inf"
  assert safe["metrics"]["input_headroom"]["value"] is None


def test_markdown_report():
  text = report.markdown(report.json_safe(_results()))
  lines = text.splitlines()
  assert "| time_to_99_ratio | inf | >= 10.0 | PASS | a \\| b |" in lines
  assert "| input_headroom | - | >= 20.0 | N/A | error |" in lines
  assert "| two_device_ratio | 1.250 | - | info | x |" in lines
  assert "| r1 | 3,457 | 20.5 | 0.9912 | 3 | 0.00 | ok |" in lines
  assert "| r2 | - | - | - | - | - | exit 1 |" in lines
  assert "- n1" in lines
  # Every table row has as many cells as its header.
  for block in text.split("\n\n"):
    rows = [l for l in block.splitlines() if l.startswith("|")]
    if rows:
      assert len({l.replace("\\|", "").count("|") for l in rows}) == 1


def test_fmt():
  assert report.fmt(None) == "-"
  assert report.fmt(float("inf")) == "inf"
  assert report.fmt(1234.567, 1) == "1,234.6"
  assert report.fmt(7) == "7"


def test_code_notes_warn_only_when_the_trainer_changed():
  base = {"commit": "aaa1111", "trainer_sha256": "0123"}
  assert harness.code_notes(base, dict(base)) == []
  moved = harness.code_notes(base, {"commit": "bbb2222", "trainer_sha256": "0123"})
  assert len(moved) == 1 and "did not change" in moved[0] and "WARNING" not in moved[0]
  changed = harness.code_notes(base, {"commit": "aaa1111", "trainer_sha256": "4567"})
  assert len(changed) == 1 and changed[0].startswith("WARNING: trainer/ changed")


def test_entry_points_define_flags_only_when_run():
  """Importing any entry point next to another must not collide on flag names."""
  import os
  import subprocess
  import sys
  code = ("import bench.run, bench.recipes, deploy.vertex, deploy.k8s\n"
          "from trainer import launcher, predict, task\nprint('imported')")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]

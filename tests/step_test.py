"""Tests for trainer.step that need no training: the precision policy, the CPU speed warnings
of the GPU switches, and the evaluation copy's warm-up."""

import numpy as np
import pytest

from trainer import config as config_lib
from trainer import data
from trainer import errors
from trainer import step


def test_cpu_speed_warnings_name_the_flag():
  from trainer import config as config_lib
  c = config_lib.Config(epochs=1, xla=True, precision="mixed")
  warnings = step.cpu_speed_warnings(c.training, has_gpu=False, cpu_flags={"avx2", "fma"})
  assert any("--xla" in w for w in warnings) and any("--precision=mixed" in w for w in warnings)
  assert not any("--precision" in w
                 for w in step.cpu_speed_warnings(c.training, False, {"avx512_bf16"}))
  assert step.cpu_speed_warnings(c.training, has_gpu=True, cpu_flags=set()) == []
  assert step.cpu_speed_warnings(config_lib.Config(epochs=1).training, False, set()) == []


@pytest.mark.parametrize("precision, gpu, environ, cpu_bf16, expected", [
    ("float32", False, {}, True, "float32"),
    ("float32", True, {step.POLICY_OVERRIDE: "mixed_float16"}, False, "float32"),  # mixed only
    ("mixed", False, {}, False, "mixed_bfloat16"),  # asked for: emulated, with a warning
    ("mixed", False, {}, True, "mixed_bfloat16"),
    ("mixed", True, {}, False, "mixed_float16"),
    ("mixed", False, {step.POLICY_OVERRIDE: "mixed_float16"}, True, "mixed_float16"),  # tests
    ("auto", False, {}, True, "mixed_bfloat16"),  # a CPU with native bfloat16
    ("auto", False, {}, False, "float32"),  # emulated bfloat16 would be slower
    ("auto", True, {}, True, "float32"),  # GPUs: float16 needs loss scaling; not chosen alone
    ("auto", False, {step.POLICY_OVERRIDE: "mixed_float16"}, True, "mixed_bfloat16"),
])
def test_precision_policy(precision, gpu, environ, cpu_bf16, expected):
  assert step.precision_policy(precision, gpu, environ, cpu_bf16) == expected


def test_native_bfloat16_from_cpu_flags():
  assert step.native_bfloat16({"avx2", "avx512f", "avx512_bf16"})
  assert step.native_bfloat16({"amx_bf16", "amx_tile"})
  assert not step.native_bfloat16({"avx2", "fma", "avx512f", "avx512_vnni"})
  assert not step.native_bfloat16(set())


def test_auto_precision_follows_this_machine():
  """What `--precision=auto` trains with here: bfloat16 exactly when /proc/cpuinfo lists native
  bfloat16 and TensorFlow runs oneDNN (TF_ENABLE_ONEDNN_OPTS=0 turns it off)."""
  import keras
  try:
    step.set_precision_and_seeds(config_lib.Config(epochs=1).training, environ={})
    expected = "mixed_bfloat16" if step.cpu_computes_bfloat16() else "float32"
    assert step.policy_name() == expected
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_bad_policy_override_names_the_variable():
  with pytest.raises(errors.ConfigError, match=r"\$TRAINER_MIXED_PRECISION_POLICY='float16'"):
    step.precision_policy("mixed", False, {step.POLICY_OVERRIDE: "float16"}, False)


def test_no_bfloat16_warning_for_float16():
  from trainer import config as config_lib
  c = config_lib.Config(epochs=1, precision="mixed")
  assert step.cpu_speed_warnings(c.training, False, set(), "mixed_float16") == []
  assert step.cpu_speed_warnings(c.training, False, set(), "mixed_bfloat16")


@pytest.mark.parametrize("test_examples", [2500, 600])
def test_warm_up_traces_what_evaluation_then_uses(test_examples):
  """The final evaluation reuses what warm_up (run on a thread during the first chunk) traced
  and gives the same figures; the last, partial batch is traced when first met."""
  rng = np.random.default_rng(0)
  splits = data.Splits(None, None, rng.integers(0, 256, (test_examples, 28, 28, 1), np.uint8),
                       rng.integers(0, 10, test_examples).astype(np.int32), num_classes=10,
                       image_shape=(28, 28, 1))
  config = config_lib.Config(epochs=1, model_widths=(8, 16))
  cold, warm = step.EvalModel(config.model, splits), step.EvalModel(config.model, splits)
  weights = cold.model.get_weights()
  warm.warm_up()
  assert warm._sums.experimental_get_tracing_count() == 1  # pylint: disable=protected-access
  assert warm.evaluate(weights) == cold.evaluate(weights)
  batch_sizes = {min(1000, test_examples), test_examples % 1000} - {0}  # 1000s, then the rest
  assert warm._sums.experimental_get_tracing_count() == len(batch_sizes)  # pylint: disable=protected-access

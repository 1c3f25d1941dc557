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
  c = config_lib.Config(epochs=1, xla=True, mixed_precision=True)
  warnings = step.cpu_speed_warnings(c, has_gpu=False, cpu_flags={"avx2", "fma"})
  assert any("--xla" in w for w in warnings) and any("--mixed_precision" in w for w in warnings)
  assert not any("--mixed_precision" in w
                 for w in step.cpu_speed_warnings(c, False, {"avx512_bf16"}))
  assert step.cpu_speed_warnings(c, has_gpu=True, cpu_flags=set()) == []
  assert step.cpu_speed_warnings(config_lib.Config(epochs=1), False, set()) == []


@pytest.mark.parametrize("mixed, gpu, environ, expected", [
    (False, False, {}, "float32"),
    (False, True, {step.POLICY_OVERRIDE: "mixed_float16"}, "float32"),  # only with the flag
    (True, False, {}, "mixed_bfloat16"),
    (True, True, {}, "mixed_float16"),
    (True, False, {step.POLICY_OVERRIDE: "mixed_float16"}, "mixed_float16"),  # tests' CPU path
])
def test_precision_policy(mixed, gpu, environ, expected):
  assert step.precision_policy(mixed, gpu, environ) == expected


def test_bad_policy_override_names_the_variable():
  with pytest.raises(errors.ConfigError, match=r"\$TRAINER_MIXED_PRECISION_POLICY='float16'"):
    step.precision_policy(True, False, {step.POLICY_OVERRIDE: "float16"})


def test_no_bfloat16_warning_for_float16():
  from trainer import config as config_lib
  c = config_lib.Config(epochs=1, mixed_precision=True)
  assert step.cpu_speed_warnings(c, False, set(), "mixed_float16") == []
  assert step.cpu_speed_warnings(c, False, set(), "mixed_bfloat16")


@pytest.mark.parametrize("test_examples", [2500, 600])
def test_warm_up_traces_what_evaluation_then_uses(test_examples):
  """The final evaluation reuses what warm_up (run on a thread during the first chunk) traced
  and gives the same figures; the last, partial batch is traced when first met."""
  rng = np.random.default_rng(0)
  splits = data.Splits(None, None, rng.integers(0, 256, (test_examples, 28, 28, 1), np.uint8),
                       rng.integers(0, 10, test_examples).astype(np.int32), num_classes=10,
                       image_shape=(28, 28, 1))
  config = config_lib.Config(epochs=1, model_widths=(8, 16))
  cold, warm = step.EvalModel(config, splits), step.EvalModel(config, splits)
  weights = cold.model.get_weights()
  warm.warm_up()
  assert warm._sums.experimental_get_tracing_count() == 1  # pylint: disable=protected-access
  assert warm.evaluate(weights) == cold.evaluate(weights)
  batch_sizes = {min(1000, test_examples), test_examples % 1000} - {0}  # 1000s, then the rest
  assert warm._sums.experimental_get_tracing_count() == len(batch_sizes)  # pylint: disable=protected-access

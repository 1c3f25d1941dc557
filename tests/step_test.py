"""Tests for trainer.step that need no training: the precision policy and the CPU speed warnings
of the GPU switches."""

import pytest

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

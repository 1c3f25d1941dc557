"""Tests for trainer.step that need no training: the CPU speed warnings of the GPU switches."""

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

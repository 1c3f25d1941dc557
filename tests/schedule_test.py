"""Learning-rate rules: linear batch scaling, warmup and decay."""

import pytest

from trainer import config as config_lib
from trainer import schedule


def _config(**kw):
  return config_lib.Config(epochs=1, **kw)


def test_linear_scaling_rule():
  assert schedule.peak_learning_rate(_config(learning_rate=0.004, global_batch_size=512,
                                             reference_batch_size=128)) == pytest.approx(0.016)
  assert schedule.peak_learning_rate(_config(global_batch_size=512)) == pytest.approx(0.02), (
      "the default 0.01 is for the default batch 256")
  assert schedule.peak_learning_rate(_config(learning_rate=0.004, global_batch_size=512,
                                             lr_scaling="none")) == pytest.approx(0.004)


def test_onecycle_warms_up_then_decays():
  c = _config(learning_rate=0.01)
  s = schedule.WarmupSchedule(0.01, schedule.warmup_steps(c, 100), 100, "cosine")
  values = [float(s(step)) for step in range(101)]
  assert schedule.warmup_steps(c, 100) == 25
  assert values[0] == pytest.approx(0.01 / 25)
  assert max(values) == pytest.approx(0.01, rel=1e-3) and values.index(max(values)) == 25
  assert all(a <= b for a, b in zip(values[:25], values[1:26])), "warmup rises"
  assert all(a >= b for a, b in zip(values[25:], values[26:])), "then it only decays"
  assert values[100] == pytest.approx(0.01 / 1000, rel=1e-3)


def test_constant_and_explicit_warmup():
  c = _config(lr_schedule="constant", warmup_steps=10)
  s = schedule.WarmupSchedule(0.1, schedule.warmup_steps(c, 50), 50, "constant")
  assert float(s(5)) < 0.1 and float(s(10)) == pytest.approx(0.1) and float(s(49)) == (
      pytest.approx(0.1))

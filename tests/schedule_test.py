"""Learning-rate rules (linear batch scaling, warmup and decay) and the fused Adam update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import schedule


def _config(**kw):
  return config_lib.Config(epochs=1, **kw)


def _peak(**kw):
  c = _config(**kw)
  return schedule.peak_learning_rate(c.optimizer, c.training.global_batch_size)


def test_linear_scaling_rule():
  assert _peak(learning_rate=0.004, global_batch_size=512,
               reference_batch_size=128) == pytest.approx(0.016)
  assert _peak(global_batch_size=512) == pytest.approx(0.02), (
      "the default 0.01 is for the default batch 256")
  assert _peak(learning_rate=0.004, global_batch_size=512,
               lr_scaling="none") == pytest.approx(0.004)


def test_onecycle_warms_up_then_decays():
  c = _config(learning_rate=0.01)
  s = schedule.WarmupSchedule(0.01, schedule.warmup_steps(c.optimizer, 100), 100, "cosine")
  values = [float(s(step)) for step in range(101)]
  assert schedule.warmup_steps(c.optimizer, 100) == 25
  assert values[0] == pytest.approx(0.01 / 25)
  assert max(values) == pytest.approx(0.01, rel=1e-3) and values.index(max(values)) == 25
  assert all(a <= b for a, b in zip(values[:25], values[1:26])), "warmup rises"
  assert all(a >= b for a, b in zip(values[25:], values[26:])), "then it only decays"
  assert values[100] == pytest.approx(0.01 / 1000, rel=1e-3)


def test_constant_and_explicit_warmup():
  c = _config(lr_schedule="constant", warmup_steps=10)
  s = schedule.WarmupSchedule(0.1, schedule.warmup_steps(c.optimizer, 50), 50, "constant")
  assert float(s(5)) < 0.1 and float(s(10)) == pytest.approx(0.1) and float(s(49)) == (
      pytest.approx(0.1))


def _two_optimizer_runs(ours, keras_cls, steps=6, **kwargs):
  """(start, [(variables, optimizer, traced apply) of each]) after `steps` updates by each
  optimizer from the same start and gradients."""
  rng = np.random.default_rng(0)
  start = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
  grads = [[rng.normal(size=w.shape).astype(np.float32) for w in start] for _ in range(steps)]
  results = []
  for cls in (ours, keras_cls):
    variables = [tf.Variable(w) for w in start]
    optimizer = cls(keras.optimizers.schedules.CosineDecay(0.01, steps), **kwargs)
    optimizer.build(variables)
    apply = tf.function(lambda g, o=optimizer, v=variables: o.apply_gradients(zip(g, v)),
                        autograph=False)
    for g in grads:
      apply([tf.constant(x) for x in g])
    results.append((variables, optimizer, apply))
  return start, results


@pytest.mark.parametrize("ours, theirs, kwargs", [
    (schedule.Adam, keras.optimizers.Adam, {}),
    (schedule.Adam, keras.optimizers.Adam, {"beta_1": 0.7, "beta_2": 0.9}),
    (schedule.AdamW, keras.optimizers.AdamW, {"weight_decay": 0.05}),
])
def test_fused_adam_updates_as_keras_does(ours, theirs, kwargs):
  start, ((fused, optimizer, apply), (reference, _, _)) = _two_optimizer_runs(ours, theirs,
                                                                             **kwargs)
  for w0, a, b in zip(start, fused, reference):
    a, b = a.numpy(), b.numpy()
    assert not np.allclose(a, w0)  # it trained
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(optimizer.iterations.numpy()) == 6
  # One fused op per variable, not Keras' dozen.
  graph = apply.get_concrete_function([tf.TensorSpec((5, 3)), tf.TensorSpec((3,))]).graph
  assert sum(op.type == "ResourceApplyAdam" for op in graph.get_operations()) == 2


def test_amsgrad_takes_keras_update():
  start, ((fused, _, apply), (reference, _, _)) = _two_optimizer_runs(
      schedule.Adam, keras.optimizers.Adam, amsgrad=True)
  for a, b in zip(fused, reference):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  graph = apply.get_concrete_function([tf.TensorSpec((5, 3)), tf.TensorSpec((3,))]).graph
  assert not any(op.type == "ResourceApplyAdam" for op in graph.get_operations())


def test_checkpoint_of_keras_adam_restores_into_fused_adam(tmp_path):
  """Checkpoints written before the fused update (Keras' own Adam) resume, slots and all."""
  _, (_, (trained, keras_adam, _)) = _two_optimizer_runs(schedule.Adam, keras.optimizers.Adam)
  path = tf.train.Checkpoint(v=trained, optimizer=keras_adam).write(str(tmp_path / "ckpt"))
  variables = [tf.Variable(tf.zeros_like(v)) for v in trained]
  fused = schedule.Adam(keras.optimizers.schedules.CosineDecay(0.01, 6))
  fused.build(variables)
  tf.train.Checkpoint(v=variables, optimizer=fused).read(path).assert_existing_objects_matched()
  assert int(fused.iterations.numpy()) == 6
  assert len(fused.variables) == len(keras_adam.variables)
  for mine, theirs in zip(variables + fused.variables, trained + keras_adam.variables):
    np.testing.assert_array_equal(mine.numpy(), theirs.numpy())

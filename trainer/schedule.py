"""Learning-rate schedules (one-cycle, cosine, constant) with linear batch scaling, and the optimizer."""

import math

import keras
import tensorflow as tf

from trainer.config import OptimizerConfig


def peak_learning_rate(config: OptimizerConfig, global_batch_size: int) -> float:
  """Linear scaling rule: the rate grows with the global batch (Goyal et al., 2017)."""
  if config.lr_scaling == "linear":
    return config.learning_rate * global_batch_size / config.reference_batch_size
  return config.learning_rate


def warmup_steps(config: OptimizerConfig, total_steps: int) -> int:
  if config.warmup_steps:
    return min(config.warmup_steps, total_steps)
  if config.lr_schedule == "onecycle":
    return max(1, int(0.25 * total_steps))
  return 0


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from peak/25 to peak, then cosine (or flat) decay to peak/1000."""

  def __init__(self, peak: float, warmup: int, total: int, decay: str):
    self.peak, self.warmup, self.total, self.decay = peak, warmup, max(total, 1), decay

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    start = self.peak / 25.0
    warm = start + (self.peak - start) * step / max(self.warmup, 1)
    if self.decay == "constant":
      after = tf.constant(self.peak, tf.float32)
    else:
      progress = tf.clip_by_value((step - self.warmup) / max(self.total - self.warmup, 1), 0., 1.)
      floor = self.peak / 1000.0
      after = floor + (self.peak - floor) * 0.5 * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < self.warmup, warm, after)

  def get_config(self):
    return {"peak": self.peak, "warmup": self.warmup, "total": self.total, "decay": self.decay}


def make_optimizer(config: OptimizerConfig, global_batch_size: int,
                   total_steps: int) -> keras.optimizers.Optimizer:
  decay = "constant" if config.lr_schedule == "constant" else "cosine"
  schedule = WarmupSchedule(peak_learning_rate(config, global_batch_size),
                            warmup_steps(config, total_steps), total_steps, decay)
  if config.weight_decay:
    optimizer = AdamW(schedule, weight_decay=config.weight_decay, beta_1=config.adam_beta1,
                      beta_2=config.adam_beta2)
  else:
    optimizer = Adam(schedule, beta_1=config.adam_beta1, beta_2=config.adam_beta2)
  if keras.mixed_precision.global_policy().name == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


class _FusedAdamUpdate:
  """Keras' Adam update of one variable as TensorFlow's one fused op (ResourceApplyAdam).

  The same formula as keras/src/optimizers/adam.py's update_step (both take the bias correction
  into the learning rate: tensorflow/core/kernels/training_ops.cc, ApplyAdam), in one op instead
  of a dozen Keras ops, each traced, optimized and set up per variable and per replica: 0.1-0.2 s
  of every run's start-up (bench/README.md). Everything else (the
  all-reduce, the schedule, the step counter, weight decay, loss scaling, the slot variables a
  checkpoint holds) stays Keras'. AMSGrad and sparse gradients take Keras' own update.
  """

  def update_step(self, gradient, variable, learning_rate):
    if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
      return super().update_step(gradient, variable, learning_rate)
    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    index = self._get_variable_index(variable)
    # Under a tf.distribute update, `variable` is this device's copy, and a slot's handle
    # resolves to its copy on the same device.
    momentum, velocity = self._momentums[index].value, self._velocities[index].value
    return tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=momentum.handle, v=velocity.handle,
        beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
        beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
        lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
        beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
        grad=tf.cast(gradient, dtype))


class Adam(_FusedAdamUpdate, keras.optimizers.Adam):
  """keras.optimizers.Adam with the fused update."""


class AdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
  """keras.optimizers.AdamW with the fused update (Keras applies the weight decay first)."""

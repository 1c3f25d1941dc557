"""The compiled training step (model, optimizer, metrics) and the float32 evaluation copy."""

import hashlib
import logging
import os
import threading

import keras
import numpy as np
import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer import errors
from trainer import model as model_lib
from trainer import schedule
from trainer import startup

SUM = tf.distribute.ReduceOp.SUM

# Tests only, like $TRAINER_INJECT_NAN_AT_STEP: the policy --precision=mixed uses instead of the
# device's, so that mixed_float16 and its loss scaling (a GPU's path) also run on a CPU.
POLICY_OVERRIDE = "TRAINER_MIXED_PRECISION_POLICY"
MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


class TrainStep:
  """Model, optimizer, step counter and the compiled multi-step training function."""

  def __init__(self, model: config_lib.ModelConfig, optimizer: config_lib.OptimizerConfig,
               training: config_lib.TrainingConfig, runtime, image_shape, num_classes,
               total_steps):
    self._training = training
    self._label_smoothing = optimizer.label_smoothing
    self.strategy = runtime.strategy
    # Seeded again right before the weights are drawn: whatever ran since start-up (TFDS, a
    # GCS client's retries and multipart boundaries) may have drawn from the global sources,
    # and a seeded run must not depend on how many storage retries it had.
    keras.utils.set_random_seed(training.seed)
    with self.strategy.scope():
      self.model = model_lib.build_model(model, image_shape, num_classes)
      self.optimizer = schedule.make_optimizer(optimizer, training.global_batch_size, total_steps)
      self.optimizer.build(self.model.trainable_variables)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
      self.loss_sum = _sum_variable()
      self.correct = _sum_variable()
      self.count = _sum_variable()
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                          step=self.step)
    self._loss_scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
    _log_precision(self.optimizer, self._loss_scaled)
    self._num_classes = num_classes
    self._seed_generators = [layer.seed_generator for layer in self.model.layers
                             if getattr(layer, "seed_generator", None) is not None]
    self._grads = tf.function(self._compute_grads, jit_compile=True) if training.xla else (
        self._compute_grads)
    # Written in graph ops (tf.while_loop, no Python control flow on tensors), so AutoGraph's
    # conversion of it and of every Keras call under it, about half a second of tracing, is
    # skipped; the graph computes the same weights.
    self.train_chunk = tf.function(self._train_chunk, autograph=False)

  def _compute_grads(self, images, labels, weights):
    with tf.GradientTape() as tape:
      logits = self.model(images, training=True)
      per_example = keras.losses.categorical_crossentropy(
          tf.one_hot(labels, self._num_classes), logits, from_logits=True,
          label_smoothing=self._label_smoothing)
      if self._training.inject_nan_at_step:
        poisoned = self.step + 1 >= self._training.inject_nan_at_step
        per_example *= tf.where(poisoned, float("nan"), 1.0)
      # Scaled by the global batch so summing gradients over replicas gives the mean.
      loss = tf.reduce_sum(per_example * weights) / self._training.global_batch_size
      scaled = self.optimizer.scale_loss(loss) if self._loss_scaled else loss
    grads = tape.gradient(scaled, self.model.trainable_variables)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    return grads, tf.reduce_sum(per_example * weights), tf.reduce_sum(correct * weights)

  def _reseed(self):
    """Dropout masks are a function of (seed, step, replica), not of an unsaved RNG state.

    Keras keeps dropout's RNG state outside the checkpoint; without this a resumed run would
    draw other masks than an uninterrupted one.
    """
    replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
    for generator in self._seed_generators:
      generator.state.assign(tf.stack([self._training.seed * 1000 + replica, self.step]))

  def _replica_step(self, batch):
    images, labels, weights = batch
    self._reseed()
    grads, loss_sum, correct = self._grads(images, labels, weights)
    if self._loss_scaled:
      grads = _agree_on_overflow(grads)
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
    self.loss_sum.assign_add(loss_sum)
    self.correct.assign_add(correct)
    self.count.assign_add(tf.reduce_sum(weights))

  def _reset(self):
    for v in (self.loss_sum, self.correct, self.count):
      v.assign(tf.zeros_like(v))

  def _train_chunk(self, iterator, num_steps, stop_vote):
    """num_steps steps in one call; returns summed loss, correct, count and stop votes."""
    self.strategy.run(self._reset)

    def body(i):
      self.strategy.run(self._replica_step, args=(next(iterator),))
      self.step.assign_add(1)
      return (i + 1,)

    tf.while_loop(lambda i: i < num_steps, body, (tf.constant(0, num_steps.dtype),),
                  parallel_iterations=1)
    votes = self.strategy.reduce(SUM, self.strategy.run(lambda v: tf.identity(v),
                                                        args=(stop_vote,)), axis=None)
    return (self.loss_sum.read_value(), self.correct.read_value(), self.count.read_value(),
            votes)


class EvalModel:
  """A float32, non-distributed copy of the model (no collectives) for evaluation and export.

  Built and traced once; each use loads the weights it is given, so periodic evaluation does not
  rebuild or retrace anything. The chief and the side-car evaluator share this code.
  """

  def __init__(self, model: config_lib.ModelConfig, splits):
    self._splits = splits
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
      self.model = model_lib.build_model(model, splits.image_shape, splits.num_classes)
    finally:
      keras.mixed_precision.set_global_policy(policy)
    # With the CPU split into single-threaded devices (trainer/runtime/distribute.py), one batch would
    # run on one core: its parts are independent branches of the graph, which TensorFlow's
    # inter-op threads run side by side.
    self._parts = max(1, tf.config.threading.get_inter_op_parallelism_threads())
    self._sums = tf.function(self._batch_sums, autograph=False)  # see TrainStep.train_chunk
    self._batches = {}  # batch size -> the test split's dataset
    self._lock = threading.Lock()  # warm_up() runs on a thread of its own

  def warm_up(self) -> None:
    """Builds the test input and runs the evaluation of one batch, ahead of the first use.

    The trainer runs this on a thread while its first chunk of steps runs, so that the tracing
    and first execution (graph optimization, kernel set-up) are not on evaluation's clock; most
    of both run in TensorFlow without holding Python's lock. A failure here is left for
    evaluate() to raise where it happens again.
    """
    try:
      for images, labels in self._test_batches().take(1):
        self._sums(images, labels)
    except Exception:  # pylint: disable=broad-except
      logging.debug("Evaluating ahead failed; evaluate() will try again.", exc_info=True)

  def load(self, weights) -> None:
    """Takes `weights` (a list as Keras' get_weights() gives) into the float32 copy."""
    self.model.set_weights([np.asarray(w, dtype=np.float32) for w in weights])

  def evaluate(self, weights, batch_size=1000) -> dict:
    """Test-split accuracy and loss of `weights` (loaded into the float32 copy first)."""
    metrics, _ = self.evaluate_with_predictions(weights, batch_size)
    return metrics

  def evaluate_with_predictions(self, weights, batch_size=1000) -> tuple:
    """evaluate()'s metrics, and the predicted class of every test example in the split's
    order (int32 array), from the same pass."""
    self.load(weights)
    loss_total, correct, count, predicted = 0.0, 0, 0, []
    for images, labels in self._test_batches(batch_size):
      batch_loss, batch_correct, batch_predicted = self._sums(images, labels)
      loss_total += float(batch_loss)
      correct += int(batch_correct)
      count += int(labels.shape[0])
      predicted.append(batch_predicted.numpy())
    metrics = {"test_accuracy": correct / count, "test_loss": loss_total / count,
               "test_examples": count}
    return metrics, np.concatenate(predicted)

  def _test_batches(self, batch_size=1000):
    """The test split's batches, built once per batch size (one copy of the split)."""
    with self._lock:
      if batch_size not in self._batches:
        self._batches[batch_size] = data.eval_batches(self._splits.test_images,
                                                      self._splits.test_labels, batch_size)
      return self._batches[batch_size]

  def _batch_sums(self, images, labels):
    """(summed loss, correct predictions, predicted classes) of one batch, computed in
    `self._parts` parts."""
    parts = min(self._parts, int(images.shape[0]))
    logits = tf.concat([tf.cast(self.model(part, training=False), tf.float32)
                        for part in tf.split(images, _part_sizes(images.shape[0], parts))], 0)
    loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                      from_logits=True))
    predicted = tf.argmax(logits, -1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int32))
    return loss, correct, predicted


def _part_sizes(total: int, parts: int) -> list:
  """`parts` sizes that sum to total and differ by at most one."""
  return [total // parts + (i < total % parts) for i in range(parts)]


def weights_fingerprint(model) -> str:
  """SHA-256 of every model weight: equal on all workers iff their models are identical."""
  digest = hashlib.sha256()
  for weight in model.get_weights():
    digest.update(np.ascontiguousarray(weight).tobytes())
  return digest.hexdigest()


def set_precision_and_seeds(config: config_lib.TrainingConfig, environ=None) -> None:
  """Seeds, op determinism and the Keras precision policy of the TrainingConfig; warns of slow
  CPU switches."""
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  gpus = tf.config.list_physical_devices("GPU")
  policy = precision_policy(config.precision, bool(gpus),
                            os.environ if environ is None else environ, cpu_computes_bfloat16())
  keras.mixed_precision.set_global_policy(policy)
  for warning in cpu_speed_warnings(config, bool(gpus), cpu_flags(), policy):
    logging.warning(warning)


def precision_policy(precision: str, has_gpu: bool, environ, cpu_bfloat16: bool) -> str:
  """The Keras policy for --precision: float32, mixed, or auto (mixed where the CPU has it).

  mixed is mixed_float16 on GPUs and mixed_bfloat16 on CPUs. CPUs get bfloat16 because it needs
  no loss scaling (float32's exponent range) and is what CPU kernels accelerate (AVX512_BF16,
  AMX); float16 is the GPUs' tensor-core type. auto picks mixed_bfloat16 only on a CPU that
  computes bfloat16 natively through oneDNN (`cpu_bfloat16`): elsewhere bfloat16 is emulated,
  several times slower than float32. auto keeps GPUs on float32: float16 needs loss scaling,
  and no GPU was measured here. Variables, the evaluation copy and the export stay float32.
  """
  if precision == "float32":
    return "float32"
  if precision == "auto":
    return "mixed_bfloat16" if cpu_bfloat16 and not has_gpu else "float32"
  override = environ.get(POLICY_OVERRIDE)
  if override:
    if override not in MIXED_POLICIES:
      raise errors.ConfigError(f"${POLICY_OVERRIDE}={override!r}: use one of "
                               f"{', '.join(MIXED_POLICIES)}, or unset it.")
    return override
  return "mixed_float16" if has_gpu else "mixed_bfloat16"


def cpu_computes_bfloat16() -> bool:
  """This CPU has bfloat16 instructions and this process's TensorFlow runs the oneDNN kernels
  that use them: what `--precision=auto` trains in bfloat16 on."""
  return native_bfloat16(cpu_flags()) and onednn_enabled()


def native_bfloat16(cpu_flags: set) -> bool:
  """x86 bfloat16 dot products (Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later),
  by the names Linux gives them in /proc/cpuinfo (arch/x86/include/asm/cpufeatures.h:
  X86_FEATURE_AVX512_BF16, X86_FEATURE_AMX_BF16)."""
  return bool({"avx512_bf16", "amx_bf16"} & cpu_flags)


def onednn_enabled() -> bool:
  """Whether this process's TensorFlow runs its oneDNN CPU kernels, the only ones with native
  bfloat16 (trainer/startup.py: TensorFlow's own answer, else its rule). oneDNN also runs
  bfloat16 on AVX-512 CPUs without AVX512_BF16 (IsDataTypeSupportedByOneDNNOnThisCPU in
  tensorflow/core/util/util.cc), by conversion, which is why `native_bfloat16` asks for the
  instructions themselves."""
  return startup.onednn_enabled(cpu_flags())


def cpu_flags() -> set:
  """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def cpu_speed_warnings(config: config_lib.TrainingConfig, has_gpu: bool, cpu_flags: set,
                       policy: str = "mixed_bfloat16") -> list:
  """The GPU switches of a TrainingConfig run on CPU too (they are tested there), but mostly
  slower: say so."""
  if has_gpu:
    return []
  warnings = []
  if config.xla:
    warnings.append("--xla on CPU: the XLA-compiled step ran about 2x slower than the default "
                    "one in `make bench`; it is meant for GPUs.")
  if (config.precision == "mixed" and policy == "mixed_bfloat16"
      and not native_bfloat16(cpu_flags)):
    warnings.append("--precision=mixed on a CPU without AVX512_BF16/AMX: bfloat16 is emulated "
                    "and trained about 8x slower than float32 in `make bench`; --precision=auto "
                    "uses it only where the CPU has it.")
  return warnings


def policy_name() -> str:
  """The Keras precision policy this process trains with (metrics.json's `precision`)."""
  return keras.mixed_precision.global_policy().name


def _log_precision(optimizer, loss_scaled: bool) -> None:
  policy = policy_name()
  if loss_scaled:
    logging.info("Precision policy %s, loss scaled dynamically by LossScaleOptimizer (initial "
                 "scale %g).", policy, optimizer.initial_scale)
  else:
    logging.info("Precision policy %s, no loss scaling.", policy)


def _agree_on_overflow(grads):
  """Every replica's gradients become NaN when any replica's are not finite.

  Keras 3's LossScaleOptimizer decides to skip a step from the gradients it is handed, which are
  not yet all-reduced (the inner optimizer reduces them later): under MirroredStrategy it takes
  replica 0's verdict for all, and each worker of a MultiWorkerMirroredStrategy decides alone
  (keras/src/optimizers/loss_scale_optimizer.py, _tf_apply). One overflowing replica would then
  put inf into the summed gradients (tests/gpu_switches_test.py shows it on 2 CPU replicas), or
  leave workers in different collectives (read from the code; multi-worker float16 was not run).
  One scalar all-reduce makes the verdict common: all skip the step and halve the scale together.
  """
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
  overflows = tf.distribute.get_replica_context().all_reduce(
      SUM, tf.cast(tf.logical_not(finite), tf.float32))
  return [tf.where(overflows > 0, tf.constant(float("nan"), g.dtype), g) for g in grads]


def _sum_variable(dtype=tf.float32):
  # Replica-local accumulators, summed over replicas and workers only when read.
  return tf.Variable(0, dtype=dtype, trainable=False,
                     synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.SUM)

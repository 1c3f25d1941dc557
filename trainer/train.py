"""train_and_evaluate: the one training path for one device, many devices and many workers."""

from collections.abc import Mapping
import dataclasses
import hashlib
import logging
import math
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf

from trainer import checkpoint as checkpoint_lib
from trainer import cluster as cluster_lib
from trainer import config as config_lib
from trainer import data
from trainer import distribute
from trainer import errors
from trainer import export
from trainer import model as model_lib
from trainer import outputs
from trainer import preemption
from trainer import restarts
from trainer import run_lock
from trainer import schedule

SUM = tf.distribute.ReduceOp.SUM
# What a collective raises when a peer dies, times out or the coordination service gives up.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.CancelledError, tf.errors.AbortedError)


def _set_precision_and_seeds(config) -> None:
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  gpus = tf.config.list_physical_devices("GPU")
  if config.mixed_precision:
    policy = "mixed_float16" if gpus else "mixed_bfloat16"
  else:
    policy = "float32"
  keras.mixed_precision.set_global_policy(policy)
  for warning in cpu_speed_warnings(config, bool(gpus), _cpu_flags()):
    logging.warning(warning)


def _cpu_flags() -> set:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def cpu_speed_warnings(config, has_gpu: bool, cpu_flags: set) -> list:
  """The GPU switches run on CPU too (they are tested there), but mostly slower: say so."""
  if has_gpu:
    return []
  warnings = []
  if config.xla:
    warnings.append("--xla on CPU: the XLA-compiled step ran about 2x slower than the default "
                    "one in `make bench`; it is meant for GPUs.")
  if config.mixed_precision and "avx512_bf16" not in cpu_flags and "amx_bf16" not in cpu_flags:
    warnings.append("--mixed_precision on a CPU without AVX512_BF16/AMX: bfloat16 is emulated "
                    "and trained about 8x slower than float32 in `make bench`.")
  return warnings


def _sum_variable(dtype=tf.float32):
  # Replica-local accumulators, summed over replicas and workers only when read.
  return tf.Variable(0, dtype=dtype, trainable=False,
                     synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.SUM)


class _Trainer:
  """Model, optimizer and the compiled multi-step training function."""

  def __init__(self, config, runtime, splits, total_steps):
    self.config = config
    self.strategy = runtime.strategy
    # Seeded again right before the weights are drawn: whatever ran since start-up (TFDS, a
    # GCS client's retries and multipart boundaries) may have drawn from the global sources,
    # and a seeded run must not depend on how many storage retries it had.
    keras.utils.set_random_seed(config.seed)
    with self.strategy.scope():
      self.model = model_lib.build_model(config, splits.image_shape, splits.num_classes)
      self.optimizer = schedule.make_optimizer(config, total_steps)
      self.optimizer.build(self.model.trainable_variables)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
      self.loss_sum = _sum_variable()
      self.correct = _sum_variable()
      self.count = _sum_variable()
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                          step=self.step)
    self._num_classes = splits.num_classes
    self._seed_generators = [layer.seed_generator for layer in self.model.layers
                             if getattr(layer, "seed_generator", None) is not None]
    self._grads = tf.function(self._compute_grads, jit_compile=True) if config.xla else (
        self._compute_grads)
    self.train_chunk = tf.function(self._train_chunk)

  def _compute_grads(self, images, labels, weights):
    with tf.GradientTape() as tape:
      logits = self.model(images, training=True)
      per_example = keras.losses.categorical_crossentropy(
          tf.one_hot(labels, self._num_classes), logits, from_logits=True,
          label_smoothing=self.config.label_smoothing)
      if self.config.inject_nan_at_step:
        poisoned = self.step + 1 >= self.config.inject_nan_at_step
        per_example *= tf.where(poisoned, float("nan"), 1.0)
      # Scaled by the global batch so summing gradients over replicas gives the mean.
      loss = tf.reduce_sum(per_example * weights) / self.config.global_batch_size
      scaled = (self.optimizer.scale_loss(loss)
                if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer) else loss)
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
      generator.state.assign(tf.stack([self.config.seed * 1000 + replica, self.step]))

  def _replica_step(self, batch):
    images, labels, weights = batch
    self._reseed()
    grads, loss_sum, correct = self._grads(images, labels, weights)
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
    for _ in tf.range(num_steps):
      self.strategy.run(self._replica_step, args=(next(iterator),))
      self.step.assign_add(1)
    votes = self.strategy.reduce(SUM, self.strategy.run(lambda v: tf.identity(v),
                                                        args=(stop_vote,)), axis=None)
    return (self.loss_sum.read_value(), self.correct.read_value(), self.count.read_value(),
            votes)


class _Evaluator:
  """A float32, non-distributed copy of the model (no collectives) for evaluation and export.

  Built and traced once; each use copies the current weights in, so periodic evaluation does not
  rebuild or retrace anything.
  """

  def __init__(self, config, splits):
    self._splits = splits
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
      self.model = model_lib.build_model(config, splits.image_shape, splits.num_classes)
    finally:
      keras.mixed_precision.set_global_policy(policy)
    self._predict = tf.function(lambda x: self.model(x, training=False))

  def evaluate(self, model, batch_size=1000) -> dict:
    """Copies `model`'s weights into the float32 copy and evaluates it on the test split."""
    self.model.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    splits = self._splits
    loss_total, correct, count = 0.0, 0, 0
    for images, labels in data.eval_batches(splits.test_images, splits.test_labels, batch_size):
      logits = tf.cast(self._predict(images), tf.float32)
      loss_total += float(tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True)))
      correct += int(tf.reduce_sum(tf.cast(
          tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.int32)))
      count += int(labels.shape[0])
    return {"test_accuracy": correct / count, "test_loss": loss_total / count,
            "test_examples": count}


class _Chunker:
  """Splits training into calls that end exactly at log, checkpoint and eval boundaries."""

  def __init__(self, config, total_steps):
    self._periods = [config.log_every_steps, config.checkpoint_every_steps]
    if config.eval_every_steps:
      self._periods.append(config.eval_every_steps)
    self._max = config.steps_per_loop
    self._total = total_steps

  def next_size(self, step: int) -> int:
    ends = [self._total, step + self._max] + [(step // p + 1) * p for p in self._periods]
    return min(ends) - step


def _due(step: int, period: int) -> bool:
  return period > 0 and step % period == 0


@dataclasses.dataclass(frozen=True)
class _Run:
  """Everything one call of train_and_evaluate set up, handed to the loop and the finish."""
  config: config_lib.Config
  environ: Mapping[str, str]
  runtime: distribute.Runtime
  splits: data.Splits
  paths: outputs.RunPaths
  trainer: _Trainer
  store: checkpoint_lib.CheckpointStore
  watchdog: preemption.Watchdog
  handler: preemption.PreemptionHandler
  total_steps: int
  steps_per_epoch: int
  start_step: int
  evaluator: _Evaluator | None  # None on workers other than the chief


def train_and_evaluate(config: config_lib.Config, environ=None) -> dict:
  """Trains (resuming from model_dir when it holds a checkpoint), evaluates and exports.

  Returns the metrics dict (the chief also writes it to model_dir/metrics.json).
  """
  environ = os.environ if environ is None else environ
  cluster = cluster_lib.parse_cluster(environ)  # Bad TF_CONFIG fails before any TF work.
  _set_precision_and_seeds(config)
  watchdog = preemption.Watchdog(cluster.peers(), config.collective_timeout_s, cluster.task_name,
                                 is_chief=cluster.is_chief)
  handler = preemption.PreemptionHandler(config.preemption_grace_s)
  store = None
  lock = None
  try:
    if cluster.is_multi_worker:
      preemption.rendezvous(cluster.address_of(cluster.task_type, cluster.task_index),
                            cluster.peers(), config.collective_timeout_s, cluster.task_name)
    # Before any other TF op. MultiWorkerMirroredStrategy waits here for every peer to join,
    # holding the GIL: hence holds_gil, which bounds it without the watchdog's thread.
    with watchdog.phase("strategy creation (every worker must join)", holds_gil=True):
      runtime = distribute.create_runtime(config, cluster)
    # After the strategy: TF's coordination service installs its own SIGTERM handler.
    handler.install()
    builder = data.prepare(config.dataset, config.data_dir, config.mnist_source_dir)
    # The step budget is checked from the dataset's metadata, before decoding anything.
    num_train = data.num_train_examples(builder, config.train_examples)
    data.check_batch_fits(config.global_batch_size, num_train)
    data.check_divisible(config.global_batch_size, runtime.num_replicas)
    steps_per_epoch = data.steps_per_epoch(num_train, config.global_batch_size)
    total_steps = config_lib.resolve_steps(config, steps_per_epoch)
    splits = data.load(config, builder)
    # Inputs are valid; now make sure the outputs can be written, still before any training.
    paths = outputs.resolve(config, cluster.task_name, environ)
    outputs.preflight(paths, runtime.is_chief)
    if runtime.is_chief:  # only the chief writes model_dir, so only it takes the lock
      lock = run_lock.acquire(paths.model_dir, paths.local_model_dir)
    watchdog.arm("model initialization (variables are broadcast from the chief)")
    trainer = _Trainer(config, runtime, splits, total_steps)
    watchdog.disarm()
    if runtime.is_chief:
      for path in (paths.local_model_dir, paths.local_checkpoint_dir, paths.local_log_dir):
        os.makedirs(path, exist_ok=True)
    store = checkpoint_lib.CheckpointStore(trainer.checkpoint, paths.local_checkpoint_dir,
                                           runtime.is_chief, config.keep_checkpoints,
                                           remote_dir=paths.checkpoint_dir)
    store.restore_latest(paths.model_dir, config.restart_from_scratch)
    start_step = int(trainer.step.numpy())
    if runtime.is_chief:
      checkpoint_lib.remove_crash_leftovers(paths.local_checkpoint_dir, paths.local_model_dir)
      restarts.record_start(paths.checkpoint_dir, config.max_job_restarts, start_step)
    run = _Run(config=config, environ=environ, runtime=runtime, splits=splits, paths=paths,
               trainer=trainer, store=store, watchdog=watchdog, handler=handler,
               total_steps=total_steps, steps_per_epoch=steps_per_epoch,
               start_step=start_step,
               # Chief-only: evaluation during and after training and the export use this copy.
               evaluator=_Evaluator(config, splits) if runtime.is_chief else None)
    return _finish(run, _TrainLoop(run).run())
  except _PEER_ERRORS as e:
    if not cluster.is_multi_worker:
      raise
    raise errors.RetryableError(
        f"{cluster.task_name} lost contact with its peers (lost: {_lost_peers(cluster, e)})"
        f": {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
  except (OSError, tf.errors.OpError) as e:
    if not errors.is_disk_full(e):
      raise
    where = getattr(e, "filename", None) or config.model_dir
    raise errors.StorageError(
        f"No space left on the device of {where}: free space and rerun the same command; the "
        "checkpoints saved so far are intact.") from None
  finally:
    handler.uninstall()
    watchdog.close()
    if store is not None:
      store.close()
    if lock is not None:
      lock.release()


def _lost_peers(cluster, error) -> str:
  """Peers whose port is closed, else the tasks TensorFlow's error names, else 'unknown'."""
  lost = preemption.unreachable_peers(cluster.peers())
  if lost:
    return ", ".join(lost)
  # A stopped (SIGSTOP) or overloaded peer still accepts connections; the collective's error
  # names the task it gave up on, e.g. /job:worker/replica:0/task:1.
  named = sorted({f"{t}:{i}" for t, i in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)",
                                                      str(error))} - {cluster.task_name})
  if named:
    return ", ".join(f"{n} (its port answers but it does not: stopped or overloaded?)"
                     for n in named)
  return "unknown: every peer's port still answers; one may be stopped or overloaded"


class _TrainLoop:
  """Runs chunks, logs, checkpoints, and turns NaN, SIGTERM and peer loss into clean exits."""

  def __init__(self, run: _Run):
    self.ctx = run
    self.c, self.runtime, self.t = run.config, run.runtime, run.trainer
    self.last_saved = run.start_step
    if self.runtime.is_chief:
      self.writer = tf.summary.create_file_writer(os.path.join(run.paths.local_log_dir, "train"))
    else:
      self.writer = tf.summary.create_noop_writer()

  def run(self) -> dict:
    c, t = self.c, self.t
    step = self.ctx.start_step
    if step >= self.ctx.total_steps:
      logging.warning(
          "The checkpoint in %s is at step %d, and this run has %d steps: nothing to train. To "
          "train longer, raise --train_steps or --epochs; to start a fresh run, use a new "
          "--model_dir (or --restart_from_scratch).", self.ctx.paths.checkpoint_dir, step,
          self.ctx.total_steps)
      return {}
    logging.info("Training steps %d -> %d (%d per epoch, global batch %d, %d replica(s)).",
                 step, self.ctx.total_steps, self.ctx.steps_per_epoch, c.global_batch_size,
                 self.runtime.num_replicas)
    iterator = distribute.input_iterator(self.runtime, data.train_dataset_fn(
        self.ctx.splits.train_images, self.ctx.splits.train_labels, c.global_batch_size, c.seed,
        start_step=step, total_steps=self.ctx.total_steps))
    chunker = _Chunker(c, self.ctx.total_steps)
    window = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    steady_images, steady_seconds, first = 0, 0.0, True
    started = time.time()
    while step < self.ctx.total_steps:
      n = chunker.next_size(step)
      self.ctx.watchdog.arm("train")
      tic = time.perf_counter()
      stop_vote = 1.0 if self.ctx.handler.requested.is_set() else 0.0
      loss, correct, count, votes = self.t.train_chunk(iterator, tf.constant(n),
                                                       tf.constant(stop_vote))
      loss, correct, count, votes = float(loss), float(correct), float(count), float(votes)
      elapsed = time.perf_counter() - tic
      self.ctx.watchdog.disarm()
      step += n
      if not math.isfinite(loss):
        kept = (f"The last good checkpoint (step {self.last_saved}) is kept" if self.last_saved
                else "No checkpoint was saved before it")
        raise errors.DivergenceError(
            f"Loss became {loss} by step {step} (steps {step - n + 1}-{step}); stopping every "
            f"worker here. {kept}. Lower --learning_rate or raise --warmup_steps, then rerun.")
      if not first:
        steady_images += n * c.global_batch_size
        steady_seconds += elapsed
      first = False
      window["loss"] += loss
      window["correct"] += correct
      window["count"] += count
      if votes > 0:
        self._save(step)
        raise errors.RetryableError(
            f"Preempted: checkpoint saved at step {step}; rerun the same command to resume.")
      if _due(step, c.log_every_steps) or step == self.ctx.total_steps:
        self._log(step, window, steady_images, steady_seconds)
        window = {"loss": 0.0, "correct": 0.0, "count": 0.0}
      if _due(step, c.checkpoint_every_steps) or step == self.ctx.total_steps:
        self._save(step)
      if _due(step, c.eval_every_steps) and self.runtime.is_chief:
        self._eval_summary(step, started)
    rate = steady_images / steady_seconds if steady_seconds else 0.0
    return {"train_images_per_sec": rate, "train_seconds": time.time() - started}

  def _save(self, step: int) -> None:
    if step == self.last_saved and step != self.ctx.start_step:
      return
    self.ctx.watchdog.arm("checkpoint")
    path = self.ctx.store.save(step)
    self.ctx.watchdog.disarm()
    self.last_saved = step
    if self.runtime.is_chief:
      logging.info("Saved checkpoint %s", path)
      self.writer.flush()
      outputs.publish_logs(self.ctx.paths)

  def _log(self, step, window, steady_images, steady_seconds) -> None:
    count = max(window["count"], 1.0)
    loss, accuracy = window["loss"] / count, window["correct"] / count
    rate = steady_images / steady_seconds if steady_seconds else float("nan")
    remaining = (self.ctx.total_steps - step) * self.c.global_batch_size
    eta = remaining / rate if rate and math.isfinite(rate) else float("nan")
    lr = float(self.t.optimizer.learning_rate)
    logging.info("step %d/%d loss %.4f accuracy %.4f lr %.5f images/s %.0f ETA %.0fs", step,
                 self.ctx.total_steps, loss, accuracy, lr, rate, eta)
    with self.writer.as_default(step=step):
      tf.summary.scalar("loss", loss)
      tf.summary.scalar("accuracy", accuracy)
      tf.summary.scalar("learning_rate", lr)
      if math.isfinite(rate):
        tf.summary.scalar("images_per_sec", rate)
    self.writer.flush()

  def _eval_summary(self, step: int, started: float) -> None:
    metrics = self.ctx.evaluator.evaluate(self.t.model)
    logging.info("eval at step %d: test_accuracy %.4f test_loss %.4f (%.1fs into training)",
                 step, metrics["test_accuracy"], metrics["test_loss"], time.time() - started)
    with self.writer.as_default(step=step):
      tf.summary.scalar("test_accuracy", metrics["test_accuracy"])
      tf.summary.scalar("test_loss", metrics["test_loss"])


def weights_fingerprint(model) -> str:
  """SHA-256 of every model weight: equal on all workers iff their models are identical."""
  digest = hashlib.sha256()
  for weight in model.get_weights():
    digest.update(np.ascontiguousarray(weight).tobytes())
  return digest.hexdigest()


def _finish(run: _Run, train_stats: dict) -> dict:
  """Chief-only side effects in one place: evaluation, metrics.json, export, hypertune."""
  runtime, trainer, paths = run.runtime, run.trainer, run.paths
  if not train_stats and runtime.is_chief:  # nothing trained: keep the last run's figures
    train_stats = outputs.previous_train_stats(run.paths)
  metrics = {"global_step": int(trainer.step.numpy()), "start_step": run.start_step,
             "num_replicas": runtime.num_replicas, "num_workers": runtime.num_workers,
             "strategy": runtime.kind, "train_images_per_sec": 0.0, "train_seconds": 0.0,
             **train_stats}
  metrics["weights_sha256"] = weights_fingerprint(trainer.model)
  logging.info("Final step %d weights_sha256 %s", metrics["global_step"],
               metrics["weights_sha256"])
  if runtime.is_chief:
    metrics.update(run.evaluator.evaluate(trainer.model))
    outputs.write_metrics(paths, metrics)
    if run.config.export:
      local_export = export.export_saved_model(
          run.evaluator.model, run.splits.image_shape,
          os.path.join(paths.local_model_dir, "export"))
      outputs.publish_export(paths, local_export)
    outputs.publish_logs(paths)
    outputs.report_hypertune(metrics, run.environ)
    restarts.record_finish(paths.checkpoint_dir)
    logging.info("test_accuracy %.4f test_loss %.4f; outputs in %s", metrics["test_accuracy"],
                 metrics["test_loss"], paths.model_dir)
  if runtime.kind == "multi_worker_mirrored":
    # Workers leave together, so nobody's coordination service sees a peer vanish early.
    run.watchdog.arm("final barrier")
    strategy = runtime.strategy
    strategy.reduce(SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)
    run.watchdog.disarm()
  return metrics

"""What happens at chunk boundaries: divergence stop, preemption vote, log, checkpoint, evaluate,
profile.

The training loop runs a chunk of steps, then hands its ChunkResult to each action in turn (the
shape of orbit's Controller and actions in tensorflow/models). An action decides for itself
whether the step is one of its boundaries; the Chunker makes every chunk end on one.
"""

import dataclasses
import logging
import math
import time

import tensorflow as tf

from trainer import errors
from trainer.runtime import watchdog as watchdog_lib


@dataclasses.dataclass(frozen=True)
class ChunkResult:
  """What one call of the compiled chunk returned, summed over its examples and replicas."""

  step: int  # the global step after the chunk
  steps: int  # steps in the chunk
  loss: float
  correct: float
  count: float
  stop_votes: float  # workers that asked to stop (SIGTERM)
  seconds: float


class Chunker:
  """Chunk sizes that end exactly at every action's boundary and at the last step.

  Periodic boundaries (every N steps) come as `periods`, single steps (a profile's edges) as
  `boundaries`, offset periodic ones (an evaluation schedule) as `schedules` (Every).
  """

  def __init__(self, periods, max_steps: int, total_steps: int, boundaries=(), schedules=()):
    self._periods = [p for p in periods if p > 0]
    self._boundaries = sorted(boundaries)
    self._schedules = schedules
    self._max = max_steps
    self._total = total_steps

  def next_size(self, step: int) -> int:
    ends = [self._total, step + self._max] + [(step // p + 1) * p for p in self._periods]
    ends += [b for b in self._boundaries if b > step][:1]
    ends += [n for n in (s.next_after(step) for s in self._schedules) if n is not None]
    return min(ends) - step


@dataclasses.dataclass(frozen=True)
class Every:
  """The steps first, first + period, first + 2 * period, ... (first 0: period, 2 * period, ...;
  period 0: first alone; both 0: none)."""

  period: int
  first: int = 0

  def is_due(self, step: int) -> bool:
    start = self.first or self.period
    if start <= 0 or step < start:
      return False
    return step == start if self.period <= 0 else (step - start) % self.period == 0

  def next_after(self, step: int):
    """The first due step after `step`, or None."""
    start = self.first or self.period
    if start <= 0:
      return None
    if step < start:
      return start
    if self.period <= 0:
      return None
    return start + ((step - start) // self.period + 1) * self.period


def due(step: int, period: int) -> bool:
  return period > 0 and step % period == 0


class SaveCheckpoint:
  """Saves every `period` steps and at the end (every worker takes part; the chief writes)."""

  def __init__(self, store, outputs, watchdog, period: int, total_steps: int, start_step: int):
    self._store = store
    self._outputs = outputs
    self._watchdog = watchdog
    self._period = period
    self._total = total_steps
    self.last_saved = start_step  # the newest step a checkpoint holds (0: none)

  def __call__(self, result: ChunkResult) -> None:
    if due(result.step, self._period) or result.step == self._total:
      self.save(result.step)

  def save(self, step: int) -> None:
    if step == self.last_saved:
      return
    with self._watchdog.phase(watchdog_lib.CHECKPOINT_PHASE):
      path = self._store.save(step)
    self.last_saved = step
    self._outputs.after_checkpoint(path)


class StopOnDivergence:
  """A NaN or inf loss stops every worker at the same step (they all see the same sum)."""

  def __init__(self, saver: SaveCheckpoint):
    self._saver = saver

  def __call__(self, result: ChunkResult) -> None:
    if math.isfinite(result.loss):
      return
    last = self._saver.last_saved
    kept = (f"The last good checkpoint (step {last}) is kept" if last
            else "No checkpoint was saved before it")
    raise errors.DivergenceError(
        f"Loss became {result.loss} by step {result.step} (steps "
        f"{result.step - result.steps + 1}-{result.step}); stopping every worker here. {kept}. "
        "Lower --learning_rate or raise --warmup_steps, then rerun.")


class PreemptionVote:
  """When any worker got SIGTERM, all save at this same step and exit 143 together."""

  def __init__(self, saver: SaveCheckpoint):
    self._saver = saver

  def __call__(self, result: ChunkResult) -> None:
    if result.stop_votes > 0:
      self._saver.save(result.step)
      raise errors.RetryableError(
          f"Preempted: checkpoint saved at step {result.step}; rerun the same command to "
          "resume.")


class LogProgress:
  """Loss, accuracy, learning rate and images/s: a log line every `period` steps, TensorBoard's
  train/ scalars every `summary_period` steps (each the mean over its own window) and at the
  last step.

  Throughput leaves out the first chunk, which includes tracing.
  """

  def __init__(self, summaries, optimizer, period: int, summary_period: int, total_steps: int,
               global_batch: int):
    self._summaries = summaries
    self._optimizer = optimizer
    self._period = period
    self._summary_period = summary_period
    self._total = total_steps
    self._batch = global_batch
    self._log_window = [0.0, 0.0, 0.0]  # loss, correct, count since the last log line
    self._summary_window = [0.0, 0.0, 0.0]  # the same since the last summary
    self._steady_images, self._steady_seconds, self._first = 0, 0.0, True
    self._started = time.time()

  def __call__(self, result: ChunkResult) -> None:
    if not self._first:
      self._steady_images += result.steps * self._batch
      self._steady_seconds += result.seconds
    self._first = False
    for window in (self._log_window, self._summary_window):
      for i, value in enumerate((result.loss, result.correct, result.count)):
        window[i] += value
    last = result.step == self._total
    if due(result.step, self._summary_period) or last:
      self._summarize(result.step)
      self._summary_window = [0.0, 0.0, 0.0]
    if due(result.step, self._period) or last:
      self._log(result.step)
      self._log_window = [0.0, 0.0, 0.0]

  def images_per_sec(self) -> float:
    return self._steady_images / self._steady_seconds if self._steady_seconds else float("nan")

  def stats(self) -> dict:
    rate = self.images_per_sec()
    return {"train_images_per_sec": rate if math.isfinite(rate) else 0.0,
            "train_seconds": time.time() - self._started}

  def _summarize(self, step: int) -> None:
    loss, accuracy = _means(self._summary_window)
    values = {"loss": loss, "accuracy": accuracy,
              "learning_rate": float(self._optimizer.learning_rate)}
    rate = self.images_per_sec()
    if math.isfinite(rate):
      values["images_per_sec"] = rate
    self._summaries.train_scalars(step, values)

  def _log(self, step: int) -> None:
    loss, accuracy = _means(self._log_window)
    rate = self.images_per_sec()
    lr = float(self._optimizer.learning_rate)
    if math.isfinite(rate) and rate > 0:
      speed = f"images/s {rate:.0f} ETA {(self._total - step) * self._batch / rate:.0f}s"
    else:  # a run of one chunk: its only chunk included tracing
      speed = "images/s n/a"
    logging.info("step %d/%d loss %.4f accuracy %.4f lr %.5f %s", step, self._total, loss,
                 accuracy, lr, speed)
    self._summaries.flush()


def _means(window) -> tuple:
  """(mean loss, accuracy) of a window of summed (loss, correct, count)."""
  loss_sum, correct, count = window
  count = max(count, 1.0)
  return loss_sum / count, correct / count


class EvaluateOnTest:
  """The chief evaluates on the test split at the steps of `schedule` (an Every; the final
  evaluation after training is not one of them)."""

  def __init__(self, eval_model, model, summaries, schedule: Every):
    self._eval_model = eval_model
    self._model = model
    self._summaries = summaries
    self._schedule = schedule
    self._started = time.time()

  def __call__(self, result: ChunkResult) -> None:
    if not self._schedule.is_due(result.step):
      return
    metrics = self._eval_model.evaluate(self._model.get_weights())
    logging.info("eval at step %d: test_accuracy %.4f test_loss %.4f (%.1fs into training)",
                 result.step, metrics["test_accuracy"], metrics["test_loss"],
                 time.time() - self._started)
    self._summaries.eval_scalars(result.step, metrics)


def profile_boundaries(steps) -> tuple:
  """Where chunks end for a trace of steps (first, last): right before first, and at last."""
  return () if steps is None else (steps[0] - 1, steps[1])


class ProfileSteps:
  """A TensorFlow profiler trace of steps first..last (counted from 1) on the chief.

  tf.profiler.experimental.start(log_dir) writes log_dir/plugins/profile/<time>/<host>.xplane.pb
  (checked on TF 2.21), where TensorBoard's profile tab looks for the run "<log_dir's name>/<time>"
  (xprof/profile_plugin.py, _run_dir: "/logdir/train/plugins/profile/run1"). The Chunker ends
  chunks at first - 1 and at last (profile_boundaries), so the trace starts right before step
  `first` and stops right after step `last`. `start` runs as the last action after a chunk and
  `stop` as the first, so no checkpoint or evaluation at those two steps lands in the trace. A
  run resumed inside the range traces from its first step on; one that stops early (preemption,
  divergence) discards the unfinished trace.
  """

  def __init__(self, log_dir: str, first: int, last: int):
    self._log_dir = log_dir
    self._first, self._last = first, last
    self._active = self._done = False

  def start(self, result: ChunkResult) -> None:
    self.start_at(result.step)

  def start_at(self, step: int) -> None:
    """Starts the trace if the next step is within first..last (`step` steps are done)."""
    if self._active or self._done or not self._first - 1 <= step < self._last:
      return
    tf.profiler.experimental.start(self._log_dir)
    self._active = True
    logging.info("Profiling steps %d-%d into %s.", step + 1, self._last, self._log_dir)

  def stop(self, result: ChunkResult) -> None:
    if self._active and result.step >= self._last:
      tf.profiler.experimental.stop()
      self._active, self._done = False, True
      logging.info("Profile of steps up to %d saved under %s/plugins/profile.", result.step,
                   self._log_dir)

  def close(self) -> None:
    """Ends an unfinished trace without saving it (the run stopped before `last`)."""
    if self._active:
      tf.profiler.experimental.stop(save=False)
      self._active = False

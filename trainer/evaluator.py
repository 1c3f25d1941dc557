"""The side-car evaluator: evaluates the newest checkpoints on the test split until the last."""

import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time

import tensorflow as tf

from trainer import checkpoint as checkpoint_lib
from trainer import data
from trainer import errors
from trainer import model as model_lib
from trainer import outputs as outputs_lib
from trainer import step as step_lib
from trainer import storage
from trainer import summaries as summaries_lib

TASK_NAME = "evaluator:0"  # one evaluator per job (trainer/runtime/cluster.py refuses more)
HISTORY_FILE = "eval_metrics.json"  # in model_dir: [{step, test_accuracy, test_loss}]
SUMMARY_RUN = summaries_lib.EVAL_RUN  # under tensorboard_dir, beside the chief's "train"
# How often the checkpoint dir is listed: a local listing is free, a bucket listing is a
# billed request (17k a day at 5 s).
LOCAL_POLL_S = 1.0
BUCKET_POLL_S = 5.0
_CHECKPOINT = re.compile(r"^ckpt-(\d+)$")


def run(config, environ=None) -> list:
  """Evaluates each new complete checkpoint until the run's final one; returns the history.

  Checkpoints that appear faster than they can be evaluated are skipped: the newest is always
  the next one evaluated. Exits (returns) once the step named by the chief's final marker
  (outputs.FINAL_MARKER) has been evaluated. Raises RetryableError (exit 143) when no new
  checkpoint appears for --evaluator_timeout_s while training has not finished, or on SIGTERM.
  """
  environ = os.environ if environ is None else environ
  paths = outputs_lib.resolve(config.outputs, TASK_NAME, environ)
  # The evaluator writes eval_metrics.json into model_dir and summaries into tensorboard_dir:
  # a 403 or a missing bucket fails here, naming the flag, as it does on the chief.
  outputs_lib.preflight(paths, is_chief=True)
  stop = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
  source = _Checkpoints(paths.checkpoint_dir)
  evaluator = None
  try:
    evaluator = _Evaluator(config.data, config.model, paths)
    return _follow(config, paths, source, evaluator, stop)
  finally:
    signal.signal(signal.SIGTERM, previous)
    source.close()
    if evaluator is not None:
      evaluator.close()


def _follow(config, paths, source, evaluator, stop: threading.Event) -> list:
  """The loop: evaluate the newest checkpoint, stop after the final one, time out otherwise."""
  timeout = config.runtime.evaluator_timeout_s
  poll = BUCKET_POLL_S if storage.is_gcs(paths.checkpoint_dir) else LOCAL_POLL_S
  last = None  # step of the last checkpoint evaluated by this process
  deadline = time.monotonic() + timeout
  logging.info("Evaluator watching %s for complete checkpoints (timeout %.0fs).",
               paths.checkpoint_dir, timeout)
  while True:
    if stop.is_set():
      raise errors.RetryableError(
          f"Evaluator stopped by SIGTERM after step {last if last is not None else 'none'}; "
          "rerun it to go on (it starts from the newest checkpoint).")
    # The marker first: the chief writes it after the final checkpoint, so a marker seen here
    # means the listing below already shows that checkpoint.
    final = outputs_lib.final_step(paths, config.training)
    found = source.newest_after(last)
    if found is not None:
      evaluator.evaluate(*found)
      last = found[0]
      deadline = time.monotonic() + timeout
    if final is not None and last is not None and last >= final:
      logging.info("Evaluated the final checkpoint (step %d); history in %s.", final,
                   storage.join(paths.model_dir, HISTORY_FILE))
      return evaluator.history
    if found is not None:
      continue  # another checkpoint may have landed while this one was evaluated
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise errors.RetryableError(_timeout_message(paths, timeout, final, last))
    stop.wait(min(poll, remaining))  # SIGTERM ends the wait at once


def _timeout_message(paths, timeout: float, final, last) -> str:
  evaluated = f"step {last}" if last is not None else "no checkpoint yet"
  if final is not None:
    return (f"Training finished at step {final}, but no complete checkpoint of that step "
            f"appeared in {paths.checkpoint_dir} for {timeout:.0f}s (evaluated: {evaluated}). "
            f"Check that the evaluator gets the training job's --model_dir/--checkpoint_dir.")
  return (f"No new checkpoint appeared in {paths.checkpoint_dir} for {timeout:.0f}s and "
          f"training has not finished (no {outputs_lib.FINAL_MARKER} for this run; evaluated: "
          f"{evaluated}). The training job is stopped or stuck; rerun the evaluator with it, or "
          "raise --evaluator_timeout_s above the longest gap between checkpoints.")


class _Checkpoints:
  """The run's complete checkpoints (local files or gs:// folders), fetched one at a time into
  a private directory, so the chief may prune them while they are being evaluated."""

  def __init__(self, checkpoint_dir: str):
    self._dir = checkpoint_dir
    self._private = tempfile.mkdtemp(prefix="trainer-evaluator-")
    self._reported = set()  # checkpoints already logged as incomplete or damaged
    self._listing, self._complete = None, []  # a local dir's files, and its complete ckpt-N

  def newest_after(self, last):
    """(step, local prefix) of the newest good checkpoint past step `last`, or None."""
    names = self._names()
    newer = [n for n in names if last is None or _number(n) > last]
    for name in newer:
      prefix = self._fetch(name)
      if prefix is None:
        continue
      problem = checkpoint_lib.damage(prefix)
      if problem:
        self._report(name, f"{problem}; not evaluated for now")
        continue
      skipped = [n for n in newer if _number(n) < _number(name)]
      if skipped:
        logging.info("Skipping %s: only the newest checkpoint is evaluated.", ", ".join(skipped))
      return _number(name), prefix
    return None

  def close(self) -> None:
    shutil.rmtree(self._private, ignore_errors=True)

  def _names(self) -> list:
    """ckpt-N names, newest first: complete ones locally; every folder in a bucket (checked
    for its marker when fetched, which costs requests, so only for those past `last`)."""
    if storage.is_gcs(self._dir):
      names = [c.rstrip("/") for c in storage.listdir(self._dir)]
      return sorted((n for n in names if _CHECKPOINT.match(n)), key=_number, reverse=True)
    listing = frozenset(storage.listdir(self._dir))
    if listing != self._listing:
      # Only when the files changed: complete_checkpoints logs each torn checkpoint it skips,
      # which a crash can leave for good, and this runs every second.
      self._listing = listing
      self._complete = [os.path.basename(p)
                        for p in checkpoint_lib.complete_checkpoints(self._dir)]
    return self._complete

  def _fetch(self, name: str):
    """Copies checkpoint `name` into the private dir (emptied first); its prefix, or None when it
    is incomplete or vanished meanwhile (pruned by the chief)."""
    shutil.rmtree(self._private, ignore_errors=True)
    os.makedirs(self._private)
    try:
      if storage.is_gcs(self._dir):
        remote = storage.join(self._dir, name)
        if not storage.is_complete(remote, checkpoint_lib.MARKER, verify_files=True):
          self._report(name, f"{remote} has no {checkpoint_lib.MARKER} yet (upload unfinished)")
          return None
        storage.download_dir(remote, self._private, marker=checkpoint_lib.MARKER)
      else:
        for file_name in os.listdir(self._dir):
          if file_name.startswith(name + "."):
            shutil.copyfile(os.path.join(self._dir, file_name),
                            os.path.join(self._private, file_name))
    except FileNotFoundError:
      logging.info("%s vanished while it was fetched (pruned by the chief); moving on.", name)
      return None
    return os.path.join(self._private, name)

  def _report(self, name: str, message: str) -> None:
    if name not in self._reported:
      self._reported.add(name)
      logging.warning("%s", message)


class _Evaluator:
  """The test split, the model checkpoints are restored into, the float32 EvalModel the chief
  evaluates with, the eval summaries and the history."""

  def __init__(self, data_config, model_config, paths):
    self._paths = paths
    splits = data.load(data_config, with_train=False)
    self._eval_model = step_lib.EvalModel(model_config, splits)
    # The same model as the chief's, built once; each checkpoint's weights are restored into it.
    # This process keeps Keras' float32 policy (a mixed-precision run's variables are float32).
    self._model = model_lib.build_model(model_config, splits.image_shape, splits.num_classes)
    self._checkpoint = tf.train.Checkpoint(model=self._model)
    self._writer = tf.summary.create_file_writer(os.path.join(paths.local_log_dir, SUMMARY_RUN))
    self.history = _read_history(paths)

  def evaluate(self, step: int, prefix: str) -> dict:
    """Restores checkpoint `prefix` (of `step`), evaluates it, records and publishes the result."""
    self._restore(prefix)
    metrics = self._eval_model.evaluate(self._model.get_weights())
    logging.info("eval of checkpoint step %d: test_accuracy %.4f test_loss %.4f", step,
                 metrics["test_accuracy"], metrics["test_loss"])
    with self._writer.as_default(step=step):
      tf.summary.scalar("test_accuracy", metrics["test_accuracy"])
      tf.summary.scalar("test_loss", metrics["test_loss"])
    self._writer.flush()
    outputs_lib.publish_logs(self._paths)
    # Keyed by step: a checkpoint evaluated again (after a restart) replaces its entry.
    entries = {e["step"]: e for e in self.history}
    entries[step] = {"step": step, "test_accuracy": metrics["test_accuracy"],
                     "test_loss": metrics["test_loss"]}
    self.history = [entries[s] for s in sorted(entries)]
    storage.write_text(storage.join(self._paths.model_dir, HISTORY_FILE),
                       json.dumps({"history": self.history}, indent=1) + "\n")
    return metrics

  def close(self) -> None:
    self._writer.close()

  def _restore(self, prefix: str) -> None:
    """The checkpoint's model weights (its optimizer and step are not needed: expect_partial);
    every weight of this model must get a value, or the run has another model."""
    try:
      self._checkpoint.restore(prefix).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
      raise errors.IncompatibleCheckpointError(
          f"Checkpoint {prefix} does not match the model these flags build ({e}): give the "
          "evaluator the training job's flags.") from None


def _read_history(paths) -> list:
  """The history an earlier evaluator of this run wrote, so a restarted one extends it."""
  found = storage.read_json(storage.join(paths.model_dir, HISTORY_FILE), {})
  history = found.get("history", []) if isinstance(found, dict) else []
  return [e for e in history if isinstance(e, dict) and isinstance(e.get("step"), int)]


def _number(name: str) -> int:
  return int(_CHECKPOINT.match(name).group(1))

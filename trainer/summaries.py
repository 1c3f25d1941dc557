"""What TensorBoard shows of a run: the runs `train` and `eval`, the HParams dashboard's row,
and the final pictures. Only the chief writes; every other task gets writers that write nothing.

Layout under the TensorBoard log dir (TensorBoard names a run by its folder):
  train/   loss, accuracy, learning_rate, images_per_sec every --summary_every_steps
  eval/    test_accuracy, test_loss of every evaluation (the final one included; the side-car
           evaluator writes here too); at the end the confusion matrix and misclassified test
           images; and the run's configuration as an HParams session, judged by those
           metrics, so runs and tuning trials compare side by side
"""

import logging
import os

import numpy as np
import tensorflow as tf

from trainer import pictures

TRAIN_RUN = "train"
EVAL_RUN = "eval"


class Summaries:
  """The chief's TensorBoard writers (no-op writers on other tasks)."""

  def __init__(self, log_dir: str, is_chief: bool):
    self._log_dir = log_dir
    self._is_chief = is_chief
    if is_chief:
      self.train = tf.summary.create_file_writer(os.path.join(log_dir, TRAIN_RUN))
      self.eval = tf.summary.create_file_writer(os.path.join(log_dir, EVAL_RUN))
    else:
      self.train = self.eval = tf.summary.create_noop_writer()

  def train_scalars(self, step: int, values: dict) -> None:
    with self.train.as_default(step=step):
      for tag, value in values.items():
        tf.summary.scalar(tag, value)

  def eval_scalars(self, step: int, metrics: dict) -> None:
    with self.eval.as_default(step=step):
      tf.summary.scalar("test_accuracy", metrics["test_accuracy"])
      tf.summary.scalar("test_loss", metrics["test_loss"])
    self.eval.flush()

  def hparams(self, config, extra: dict) -> None:
    """The run's configuration (every Config field, plus `extra`: the cluster's shape, the
    precision policy) as one HParams session in eval/."""
    if not self._is_chief:
      return
    # TensorBoard's own summary API for the plugin, loaded only where it is used.
    from tensorboard.plugins.hparams import api as hp  # pylint: disable=import-outside-toplevel
    values = {**hparam_values(config), **extra}
    # The session lives in eval/, beside the metrics it is judged by: the plugin reads a
    # session's metrics from its own run and the runs below it (metrics.py,
    # run_tag_from_session_and_metric joins session and group without normalizing, so a
    # session at the log dir's top, the run ".", would find none).
    with self.eval.as_default():
      hp.hparams(values)
    self.eval.flush()

  def final_pictures(self, step: int, images, labels, predictions, class_names=()) -> None:
    """The test split's confusion matrix (an image, and a text table with the counts) and a
    grid of misclassified images, captioned with their true and predicted labels."""
    if not self._is_chief or images is None:
      return
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    num_classes = max(len(class_names), int(labels.max()) + 1, int(predictions.max()) + 1)
    counts = pictures.confusion_matrix(labels, predictions, num_classes)
    with self.eval.as_default(step=step):
      tf.summary.image("confusion_matrix", pictures.confusion_image(counts)[None], step=step,
                       description="Rows: true class; columns: predicted class. Green: the "
                                   "diagonal, red: errors; shade: the share of the row (log).")
      tf.summary.text("confusion_matrix_counts", _counts_table(counts, class_names), step=step)
      grid = pictures.misclassified_grid(images, labels, predictions, class_names)
      if grid is not None:
        tf.summary.image("misclassified", grid[None], step=step,
                         description="Test images the model got wrong: T = true label, "
                                     "P = predicted label.")
    self.eval.flush()
    logging.info("TensorBoard: confusion matrix and %d misclassified test images in %s",
                 int((labels != predictions).sum()), os.path.join(self._log_dir, EVAL_RUN))

  def flush(self) -> None:
    self.train.flush()
    self.eval.flush()

  def close(self) -> None:
    self.train.close()
    self.eval.close()


def hparam_values(config) -> dict:
  """Config's fields as HParams values: bools, numbers and strings (tuples joined, None as "")."""
  values = {}
  for name, value in config.flat().items():
    if isinstance(value, tuple):
      value = ",".join(str(v) for v in value)
    elif value is None:
      value = ""
    if isinstance(value, (bool, int, float, str)):
      values[name] = value
  return values


def _counts_table(counts, class_names) -> str:
  """The confusion matrix as a Markdown table (TensorBoard's text plugin renders it)."""
  n = counts.shape[0]
  names = [class_names[i] if i < len(class_names) else str(i) for i in range(n)]
  lines = ["| true \\ predicted | " + " | ".join(names) + " |",
           "|---" * (n + 1) + "|"]
  lines += [f"| {names[i]} | " + " | ".join(str(int(c)) for c in counts[i]) + " |"
            for i in range(n)]
  return "\n".join(lines)

"""Measurements that run inside one fresh TensorFlow process: `python -m bench.probes --probe=...`.

Each probe writes one JSON object to --out; bench.run starts them as subprocesses so no
measurement inherits another's threads, caches or traced functions.
"""

import json
import os
import time

from absl import app
from absl import flags

from bench import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

FLAGS = flags.FLAGS
flags.DEFINE_enum("probe", None, ["keras_time_to_99", "keras_throughput", "input_pipeline",
                                  "hardware"], "Which measurement to run.")
flags.DEFINE_string("out", None, "Where to write the JSON result.")
flags.DEFINE_string("data_dir", "bench/.cache/tfds", "Prepared TFDS directory.")
flags.DEFINE_integer("seed", 1, "Random seed (keras_time_to_99).")
flags.DEFINE_integer("max_epochs", 15, "Epoch cap for keras_time_to_99.")
flags.DEFINE_float("threshold", 0.99, "Test accuracy that counts as reached.")
flags.DEFINE_integer("steps", 300, "Steps per timed epoch (keras_throughput).")
flags.DEFINE_integer("timed_epochs", 2, "Epochs timed after one warm-up epoch (keras_throughput).")
flags.DEFINE_integer("batches", 3000, "Batches drawn from the input pipeline (input_pipeline).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")

BATCH = 128


def _splits():
  from trainer import config as config_lib
  from trainer import data
  return data.load(config_lib.Config(model_dir="unused", data_dir=FLAGS.data_dir, epochs=1))


def _as_float(images):
  # The keras.io recipe: float32 in [0, 1] with a trailing channel axis.
  import numpy as np
  x = images.astype(np.float32) / 255.0
  return x.reshape(x.shape[0], 28, 28, 1) if x.ndim == 3 else x


def _epoch_timer_class():
  import keras

  class EpochTimer(keras.callbacks.Callback):
    """Training seconds per epoch: epoch start to validation start (or epoch end).

    Only epoch-level hooks, so Keras keeps dispatching batches asynchronously.
    """

    def __init__(self, threshold=None):
      super().__init__()
      self.threshold, self.epochs, self._t0, self._train = threshold, [], 0.0, None

    def on_epoch_begin(self, epoch, logs=None):
      self._t0, self._train = time.perf_counter(), None

    def on_test_begin(self, logs=None):
      self._train = time.perf_counter() - self._t0

    def on_epoch_end(self, epoch, logs=None):
      train = self._train if self._train is not None else time.perf_counter() - self._t0
      accuracy = (logs or {}).get("val_accuracy")
      self.epochs.append({"epoch": epoch + 1, "train_s": train, "val_accuracy": accuracy})
      if self.threshold is not None and accuracy is not None and accuracy >= self.threshold:
        self.model.stop_training = True

  return EpochTimer


def _reset_optimizer(optimizer):
  """Back to a never-stepped optimizer: zero step counter and moments, learning rate kept."""
  for v in optimizer.variables:
    if "learning_rate" not in v.path:
      v.assign(v.numpy() * 0)


def keras_time_to_99(splits) -> dict:
  """The keras.io recipe, evaluated on the test set after every epoch, warm-up excluded."""
  import keras
  keras.utils.set_random_seed(FLAGS.seed)
  x, xt = _as_float(splits.train_images), _as_float(splits.test_images)
  y = keras.utils.to_categorical(splits.train_labels, 10)
  yt = keras.utils.to_categorical(splits.test_labels, 10)
  model = harness.keras_io_model()
  model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
  initial = model.get_weights()
  # Traces the train and test functions (full and ragged last batch) before the clock starts.
  model.fit(x[:BATCH + 96], y[:BATCH + 96], batch_size=BATCH, epochs=1, verbose=0)
  model.evaluate(xt[:BATCH + 16], yt[:BATCH + 16], batch_size=BATCH, verbose=0)
  model.set_weights(initial)
  _reset_optimizer(model.optimizer)
  timer = _epoch_timer_class()(FLAGS.threshold)
  model.fit(x, y, batch_size=BATCH, epochs=FLAGS.max_epochs, validation_data=(xt, yt),
            callbacks=[timer], verbose=0)
  return _time_to_threshold(timer.epochs, FLAGS.threshold, len(x))


def _time_to_threshold(epochs, threshold, num_examples) -> dict:
  cumulative, reached = 0.0, None
  for e in epochs:
    cumulative += e["train_s"]
    e["cumulative_train_s"] = cumulative
    if reached is None and e["val_accuracy"] >= threshold:
      reached = e
  steady = [e["train_s"] for e in epochs[1:]] or [epochs[0]["train_s"]]
  return {"epochs": epochs, "reached": reached is not None,
          "time_to_threshold_s": reached["cumulative_train_s"] if reached else None,
          "epochs_to_threshold": reached["epoch"] if reached else None,
          "final_accuracy": epochs[-1]["val_accuracy"],
          "best_accuracy": max(e["val_accuracy"] for e in epochs),
          "images_per_sec": num_examples / (sum(steady) / len(steady))}


def keras_throughput(splits) -> dict:
  """Plain `fit` on the trainer's own model built from harness.SAME_MODEL, steady state."""
  import keras
  from trainer import config as config_lib
  from trainer import model as model_lib
  keras.utils.set_random_seed(FLAGS.seed)
  config = config_lib.Config(epochs=1, **harness.SAME_MODEL)
  model = model_lib.build_model(config, splits.image_shape, splits.num_classes)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  n = FLAGS.steps * FLAGS.batch_size
  timer = _epoch_timer_class()()
  model.fit(_as_float(splits.train_images[:n]), splits.train_labels[:n],
            batch_size=FLAGS.batch_size, epochs=1 + FLAGS.timed_epochs, callbacks=[timer],
            verbose=0)
  timed = timer.epochs[1:]
  seconds = sum(e["train_s"] for e in timed)
  return {"images_per_sec": n * len(timed) / seconds, "timed_steps": FLAGS.steps * len(timed),
          "timed_seconds": seconds, "first_epoch_s": timer.epochs[0]["train_s"],
          "jit_compile": bool(model.jit_compile)}


def input_pipeline(splits) -> dict:
  """Our training input function alone, drained in-graph and from Python."""
  import tensorflow as tf
  from trainer import data
  n = FLAGS.batches
  fn = data.train_dataset_fn(splits.train_images, splits.train_labels, FLAGS.batch_size,
                             seed=42, total_steps=2 * n + 100)
  ds = fn(tf.distribute.InputContext())

  def drain_in_graph(batches):
    # Summing the pixels forces every gather and cast to run.
    return ds.take(batches).reduce(tf.constant(0.0), lambda acc, b: acc + tf.reduce_sum(b[0]))

  drain_in_graph(50)
  tic = time.perf_counter()
  drain_in_graph(n).numpy()
  graph_s = time.perf_counter() - tic
  eager_s = _drain_eagerly(ds, n)
  return {"batches": n, "batch_size": FLAGS.batch_size,
          "graph_images_per_sec": n * FLAGS.batch_size / graph_s,
          "eager_images_per_sec": n * FLAGS.batch_size / eager_s}


def _drain_eagerly(ds, n) -> float:
  iterator = iter(ds)
  for _ in range(50):
    next(iterator)
  tic = time.perf_counter()
  for _ in range(n):
    next(iterator)
  return time.perf_counter() - tic


def _matmul_gflops(dtype, n=2048, reps=10) -> float:
  import tensorflow as tf
  a = tf.random.normal([n, n], dtype=tf.float32)
  a = tf.cast(a, dtype)
  matmul = tf.function(lambda m: tf.linalg.matmul(m, m))
  matmul(a).numpy()
  tic = time.perf_counter()
  for _ in range(reps):
    out = matmul(a)
  out.numpy()
  return 2 * n ** 3 * reps / (time.perf_counter() - tic) / 1e9


def hardware(splits) -> dict:
  """Analytic FLOPs of the models we time, and what a large matmul achieves on this CPU."""
  import tensorflow as tf
  from bench import flops
  from trainer import config as config_lib
  from trainer import model as model_lib
  shape, classes = splits.image_shape, splits.num_classes
  default = model_lib.build_model(config_lib.Config(epochs=1), shape, classes)
  same = model_lib.build_model(config_lib.Config(epochs=1, **harness.SAME_MODEL), shape, classes)
  heavy = model_lib.build_model(config_lib.Config(epochs=1, **harness.COMPUTE_BOUND_MODEL),
                                shape, classes)
  return {"default_model": flops.model_flops(default),
          "same_model": flops.model_flops(same),
          "compute_bound_model": flops.model_flops(heavy),
          "keras_io_model": flops.model_flops(harness.keras_io_model()),
          "matmul_fp32_gflops": _matmul_gflops(tf.float32),
          "matmul_bf16_gflops": _matmul_gflops(tf.bfloat16)}


_PROBES = {"keras_time_to_99": keras_time_to_99, "keras_throughput": keras_throughput,
           "input_pipeline": input_pipeline, "hardware": hardware}


def main(argv):
  del argv
  result = _PROBES[FLAGS.probe](_splits())
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["probe", "out"])
  app.run(main)

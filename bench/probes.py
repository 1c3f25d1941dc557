"""What runs inside a measurement's own process: `python -m bench.probes --probe=NAME ...`.

Each probe prints its result as a line `result {json}` (the Keras reference also prints one
`epoch_end {json}` line per epoch, with the wall-clock time the evaluation's result was known).
bench.run starts every probe as a fresh subprocess, so none inherits another's threads, caches or
traced functions.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
BATCH = 128  # the keras.io recipe's batch
# The keras.io convnet, layer for layer, as trainer flags (same_model_throughput_ratio).
SAME_MODEL = {"model_widths": (32, 64), "kernel_sizes": (3, 3), "pool_sizes": (2, 2),
              "conv_padding": "valid", "space_to_depth": 1, "batch_norm": False, "dropout": 0.5,
              "dense_units": 0}


def model_flags(model: dict) -> list:
  """A model dict as trainer flags; explicit, so changed trainer defaults cannot leak in."""
  def value(v):
    if isinstance(v, tuple):
      return ",".join(str(x) for x in v)
    return str(v).lower() if isinstance(v, bool) else str(v)
  return [f"--{k}={value(v)}" for k, v in model.items()]


def _emit(tag: str, value: dict) -> None:
  print(f"{tag} {json.dumps(value)}", flush=True)


def reference() -> dict:
  """keras.io "Simple MNIST convnet" as a whole process, data from an .npz on local disk as
  keras.datasets.mnist.load_data reads it; the test set is evaluated after every epoch (instead
  of the recipe's validation_split, so it trains on all 60,000 images like ours) and training
  stops at the first epoch-end evaluation >= --threshold, or after --max_epochs (15 in the
  recipe)."""
  import numpy as np
  import keras
  with np.load(FLAGS.npz) as f:
    x_train, y_train, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
  keras.utils.set_random_seed(FLAGS.seed)
  x_train = np.expand_dims(x_train.astype("float32") / 255, -1)
  x_test = np.expand_dims(x_test.astype("float32") / 255, -1)
  y_train = keras.utils.to_categorical(y_train, 10)
  y_test = keras.utils.to_categorical(y_test, 10)
  model = keras_io_model()
  model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
  timer = _epoch_timer(FLAGS.threshold)
  model.fit(x_train, y_train, batch_size=BATCH, epochs=FLAGS.max_epochs,
            validation_data=(x_test, y_test), callbacks=[timer], verbose=0)
  return {"epochs": timer.epochs}


def keras_io_model():
  """The keras.io convnet: valid padding, dropout 0.5, softmax output."""
  import keras
  from keras import layers
  return keras.Sequential([
      keras.Input(shape=(28, 28, 1)),
      layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
      layers.MaxPooling2D(pool_size=(2, 2)),
      layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
      layers.MaxPooling2D(pool_size=(2, 2)),
      layers.Flatten(),
      layers.Dropout(0.5),
      layers.Dense(10, activation="softmax"),
  ])


def _epoch_timer(threshold=None):
  """A callback timing each epoch's training (epoch start to validation start) and stamping its
  end; only epoch-level hooks, so Keras keeps dispatching batches asynchronously."""
  import keras

  class EpochTimer(keras.callbacks.Callback):

    def __init__(self):
      super().__init__()
      self.epochs, self._t0, self._train = [], 0.0, None

    def on_epoch_begin(self, epoch, logs=None):
      self._t0, self._train = time.perf_counter(), None

    def on_test_begin(self, logs=None):
      self._train = time.perf_counter() - self._t0

    def on_epoch_end(self, epoch, logs=None):
      train = self._train if self._train is not None else time.perf_counter() - self._t0
      accuracy = (logs or {}).get("val_accuracy")
      self.epochs.append({"epoch": epoch + 1, "train_s": train, "val_accuracy": accuracy,
                          "time": time.time()})
      _emit("epoch_end", self.epochs[-1])
      if threshold is not None and accuracy is not None and accuracy >= threshold:
        self.model.stop_training = True

  return EpochTimer()


def _config(**fields):
  from trainer import config as config_lib
  return config_lib.Config(model_dir="unused", data_dir=FLAGS.data_dir, epochs=1, **fields)


def keras_throughput() -> dict:
  """Plain `fit` on the trainer's own model with SAME_MODEL's layers; the first epoch (tracing)
  is left out."""
  import keras
  from trainer import data
  from trainer import model as model_lib
  splits = data.load(_config().data)
  keras.utils.set_random_seed(FLAGS.seed)
  model = model_lib.build_model(_config(**SAME_MODEL).model, splits.image_shape, splits.num_classes)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  n = FLAGS.steps * BATCH
  timer = _epoch_timer()
  model.fit(splits.train_images[:n].astype("float32") / 255, splits.train_labels[:n],
            batch_size=BATCH, epochs=3, callbacks=[timer], verbose=0)
  seconds = sum(e["train_s"] for e in timer.epochs[1:])
  return {"images_per_sec": 2 * n / seconds}


def pipeline() -> dict:
  """The trainer's training input function alone (--mode in_memory or stream), one pipeline at
  the default global batch, drained inside one graph (as the training loop consumes it)."""
  import tensorflow as tf
  from trainer import data
  from trainer.data import stream
  config = _config()
  batch, n = config.training.global_batch_size, FLAGS.batches
  if FLAGS.mode == "stream":
    builder = data.prepare(config.data.dataset, config.data.data_dir)
    # As in training: the run reads its files whole, so they are decoded once, up front.
    source = data.record_source(builder, examples_read=(n + 250) * batch)
    fn = stream.train_dataset_fn(source, batch, seed=1,
                                 shuffle_buffer=config.data.shuffle_buffer, total_steps=n + 200)
  else:
    splits = data.load(config.data)
    fn = data.train_dataset_fn(splits.train_images, splits.train_labels, batch, seed=1,
                               total_steps=n + 200)
  iterator = iter(fn(tf.distribute.InputContext()))

  @tf.function
  def drain(k):  # as the training loop does: next() inside one graph; summing forces the work
    total = 0.0
    for _ in tf.range(k):
      total += tf.reduce_sum(next(iterator)[0])
    return total

  drain(tf.constant(50)).numpy()  # traces, and fills stream mode's shuffle buffer
  tic = time.perf_counter()
  drain(tf.constant(n)).numpy()
  return {"images_per_sec": n * batch / (time.perf_counter() - tic), "batches": n,
          "batch": batch}


def hardware() -> dict:
  """Analytic training FLOPs per image of the default model, and the best matmul rates: float32,
  and bfloat16 where the CPU computes it natively (what `--precision=auto` then trains with)."""
  import tensorflow as tf
  from bench import flops
  from trainer import model as model_lib
  from trainer import step
  model = model_lib.build_model(_config().model, (28, 28, 1), 10)
  out = {"default_model": flops.model_flops(model)}
  dtypes = [("", tf.float32)]
  if step.cpu_computes_bfloat16():
    dtypes.append(("bf16_", tf.bfloat16))
  for prefix, dtype in dtypes:
    rates = {str(n): _matmul_gflops(tf, n, dtype) for n in (1024, 2048, 3072)}
    out[f"matmul_{prefix}gflops"] = rates
    out[f"matmul_{prefix}best_gflops"] = max(rates.values())
  return out


def _matmul_gflops(tf, n: int, dtype) -> float:
  """The best of 3 timed repetitions of an n x n matmul, enough repetitions for ~40 GFLOP each."""
  a = tf.cast(tf.random.normal([n, n]), dtype)
  matmul = tf.function(lambda m: tf.linalg.matmul(m, m))
  matmul(a).numpy()
  reps = max(2, int(4e10 / (2 * n ** 3)))
  best = 0.0
  for _ in range(3):
    tic = time.perf_counter()
    for _ in range(reps):
      out = matmul(a)
    out.numpy()
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - tic) / 1e9)
  return best


def prepare() -> dict:
  """--mode mnist: MNIST as TFDS in --data_dir with 4 train files (stream mode reads one per
  pipeline) plus mnist.npz for the reference; --mode synth: the --multiples synthetic datasets,
  and the decoded-split cache of the --in_memory ones, so no measured run decodes."""
  import numpy as np
  from trainer import data
  if FLAGS.mode == "mnist":
    data.prepare("mnist", FLAGS.data_dir, num_shards=4)
    splits = data.load(_config().data)
    if not os.path.exists(FLAGS.npz):
      np.savez_compressed(FLAGS.npz + ".tmp.npz", x_train=splits.train_images[..., 0],
               y_train=splits.train_labels.astype(np.uint8), x_test=splits.test_images[..., 0],
               y_test=splits.test_labels.astype(np.uint8))
      os.replace(FLAGS.npz + ".tmp.npz", FLAGS.npz)
  else:
    from bench import synth
    for multiple in FLAGS.multiples:
      name = synth.name_for(multiple)
      synth.write(FLAGS.data_dir, name, int(multiple) * synth.MNIST_TRAIN)
      if multiple in FLAGS.in_memory:
        data.load(_config(dataset=name).data)
  with open(FLAGS.marker, "w"):
    pass
  return {}


def first_contact() -> dict:
  """A new user's first contact, as it feels: `git clone` of this checkout's HEAD (committed
  code only) into a fresh directory, then README's `make train` there, with an empty TFDS
  directory and cache; the installer's download cache is left as it is (warm after the first
  time on a machine, as for a user who has installed Python packages before). `make` runs
  twice, so the install (`.venv/.installed-runtime`) and the first run are timed apart."""
  import shutil
  import subprocess
  import tempfile
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  top = tempfile.mkdtemp(prefix="first-contact-")
  clone = os.path.join(top, "clone")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
  env["TRAINER_CACHE_DIR"] = os.path.join(top, "cache")
  venv_bin = os.path.dirname(os.path.abspath(sys.executable))  # the clone makes its own venv
  env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                if os.path.abspath(p) != venv_bin)
  times = {}

  def timed(name, command, cwd):
    tic = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    times[name] = round(time.perf_counter() - tic, 2)

  timed("clone_s", ["git", "clone", "--quiet", root, clone], top)
  timed("install_s", ["make", ".venv/.installed-runtime"], clone)
  timed("first_run_s", ["make", "train", f"ARGS=--data_dir={os.path.join(top, 'tfds')}"], clone)
  with open(os.path.join(clone, "runs", "mnist", "metrics.json")) as f:
    metrics = json.load(f)
  times["total_s"] = round(sum(times.values()), 2)
  shutil.rmtree(top, ignore_errors=True)
  return {**times, "test_accuracy": metrics.get("test_accuracy"),
          "phases": metrics.get("phase_seconds", {})}


_PROBES = {"reference": reference, "keras_throughput": keras_throughput, "pipeline": pipeline,
           "hardware": hardware, "prepare": prepare, "first_contact": first_contact}


def _define_flags() -> None:
  """Flags exist only when this module is the entry point (importing it defines none)."""
  flags.DEFINE_enum("probe", None, list(_PROBES), "Which measurement to run.")
  flags.DEFINE_string("data_dir", "", "Prepared TFDS directory.")
  flags.DEFINE_string("npz", "", "MNIST as keras.datasets.mnist's .npz (reference, prepare).")
  flags.DEFINE_string("mode", "", "pipeline: in_memory or stream; prepare: mnist or synth.")
  flags.DEFINE_integer("seed", 1, "Random seed.")
  flags.DEFINE_integer("max_epochs", 15, "reference: epoch cap (the recipe's 15).")
  flags.DEFINE_float("threshold", 0.99, "reference: test accuracy that stops training.")
  flags.DEFINE_integer("steps", 150, "keras_throughput: steps per epoch (3 epochs, 2 timed).")
  flags.DEFINE_integer("batches", 1000, "pipeline: batches drained.")
  flags.DEFINE_list("multiples", [], "prepare --mode=synth: dataset sizes in MNIST train splits.")
  flags.DEFINE_list("in_memory", [], "prepare --mode=synth: multiples to decode ahead.")
  flags.DEFINE_string("marker", "", "prepare: a file written once everything is prepared.")
  flags.mark_flag_as_required("probe")


def main(argv):
  del argv
  _emit("result", _PROBES[FLAGS.probe]())


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  _define_flags()
  app.run(main)

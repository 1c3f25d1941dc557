"""What every tf.data input pipeline of the trainer (in memory and stream mode) is built with."""

import tensorflow as tf


def no_autograph(fn):
  """fn, for tf.data to trace as it is: tf.data runs AutoGraph on every function it traces, and
  our input functions branch on Python values only, so converting them (parsing their source,
  writing a module to a temporary file) is start-up time and nothing else."""
  return tf.autograph.experimental.do_not_convert(fn)


def without_autotune_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Turns off tf.data's autotuning thread; AUTOTUNE sizes then stay at tf.data's defaults.

  Deleting an iterator waits out that thread's current sleep, which doubles up to 60 s (see
  distribute.input_iterator), after the last step. Both input modes use it; in memory the
  pipeline runs far faster than training needs (bench's input_headroom).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)

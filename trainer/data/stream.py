"""Stream mode: record files read by tf.data, sharded by file per input pipeline, each example once.

Nothing is decoded ahead of training and no worker holds the split in memory. The step count of
an epoch is fixed from the file sizes before training and is the same on every worker; a
pipeline with fewer examples pads with zero-weight ones, as the in-memory path does, and none
runs past the fixed count, so no worker ever waits in a collective for a peer that ran out.
"""

import dataclasses
import functools
import logging
import time
from typing import Callable

import tensorflow as tf

from trainer.data import pipeline


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """The record files of one split, how many examples each holds, and how to decode one."""

  files: tuple  # paths, in the order the dataset lists them
  counts: tuple  # examples per file
  image_shape: tuple
  # serialized records [B] -> (uint8 images [B, *image_shape], int labels [B]): a batch at a
  # time, after the shuffle, so the buffer holds small encoded records, not decoded images
  decode: Callable = dataclasses.field(compare=False)
  # path -> dataset of the file's serialized records (TFRecord files; decoded copies are
  # fixed-length records: trainer/data/decoded_records.py)
  reader: Callable = dataclasses.field(compare=False, default=tf.data.TFRecordDataset)
  # Decoded copies cost next to nothing to read: read in turn, on one input thread, so input
  # never takes turns with the training step. Encoded records are read and decoded in parallel.
  decoded: bool = False
  # The gs:// object each file is a local copy of (messages name it); empty for local data.
  origins: tuple = ()

  def name_of(self, index: int) -> str:
    """File `index` as messages name it: its object, and the local copy, for gs:// data."""
    if self.origins:
      return f"{self.origins[index]} (local copy {self.files[index]})"
    return self.files[index]


def train_dataset_fn(source: RecordSource, global_batch_size: int, seed: int,
                     shuffle_buffer: int, start_step: int = 0, total_steps: int = 0,
                     epoch_plan: "EpochPlan | None" = None):
  """The input function (InputContext -> dataset) of stream mode, for distribute.input_iterator.

  Epoch e of pipeline p reads p's files in an order drawn from (seed, e), shuffles within a
  buffer seeded by (seed, e, p), pads to the epoch's fixed length and batches. The order is a
  function of (seed, step) alone, so a resumed run skips to its step and continues exactly as
  an uninterrupted run would (the skipped records are read again, not trained on).

  epoch_plan is the plan the run's step count was computed from (trainer/data/input_plan.py);
  the pipelines tf.distribute builds must be the ones it was made for. Without it, the plan is
  made from the InputContext.
  """

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    per_pipeline = per_replica * local_replicas
    plan = epoch_plan or plan_epoch(source.counts, ctx.num_input_pipelines, per_pipeline)
    if (plan.num_pipelines, plan.batch) != (ctx.num_input_pipelines, per_pipeline):
      # A bug, not bad input: the step count would not be the one every pipeline yields.
      raise RuntimeError(
          f"Stream mode planned {plan.num_pipelines} input pipelines of {plan.batch} examples "
          f"a step, but tf.distribute builds {ctx.num_input_pipelines} of {per_pipeline}.")
    start_epoch, offset = divmod(start_step, plan.steps)
    end_epoch = max(start_epoch + 1, -(-max(total_steps, 1) // plan.steps))
    epochs = [_epoch(source, plan, ctx.input_pipeline_id, seed, epoch, shuffle_buffer)
              for epoch in range(start_epoch, end_epoch + 1)]
    ds = epochs[0]
    for more in epochs[1:]:
      ds = ds.concatenate(more)
    weights = functools.partial(
        _weights, per_replica=per_replica, batches_per_epoch=plan.steps * local_replicas,
        real=plan.examples[ctx.input_pipeline_id])
    # Skipped batches (a resumed run) are read but never decoded.
    ds = ds.batch(per_replica, drop_remainder=True).enumerate().skip(offset * local_replicas)
    decode = pipeline.no_autograph(
        lambda index, records: _decoded(source, records, weights(index), per_replica))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = pipeline.without_autotune_thread(ds.prefetch(tf.data.AUTOTUNE))
    return _on_one_thread(ds) if source.decoded else ds

  return dataset_fn


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """Who reads what in one epoch: identical on every worker, computed before training."""

  by_file: bool  # False: fewer files than pipelines, so every pipeline reads every file
  num_pipelines: int
  examples: tuple  # examples each pipeline reads per epoch (before padding)
  batch: int  # examples per pipeline per step
  steps: int  # steps per epoch: every pipeline yields steps * batch examples

  @property
  def padding(self) -> tuple:
    """Zero-weight examples each pipeline adds per epoch."""
    return tuple(self.steps * self.batch - n for n in self.examples)

  def files_of(self, pipeline_id: int, num_files: int) -> list:
    return files_read_by(num_files, self.num_pipelines, [pipeline_id])


def files_read_by(num_files: int, num_pipelines: int, pipeline_ids) -> list:
  """Indices of the files that the pipelines `pipeline_ids` (of num_pipelines) read, sorted.

  Pipeline p reads files p, p + P, ... (file-level sharding); with fewer files than pipelines,
  every pipeline reads every file (record-level sharding). A worker fetches just these.
  """
  if num_files < num_pipelines:
    return list(range(num_files))
  return sorted({i for p in pipeline_ids for i in range(p, num_files, num_pipelines)})


def plan_epoch(counts, num_pipelines: int, per_pipeline_batch: int) -> EpochPlan:
  """File-level sharding when there are enough files, record-level otherwise."""
  total = sum(counts)
  if len(counts) >= num_pipelines:
    examples = tuple(sum(counts[p::num_pipelines]) for p in range(num_pipelines))
    by_file = True
  else:
    # Record r of the files' concatenation goes to pipeline r % P.
    examples = tuple(len(range(p, total, num_pipelines)) for p in range(num_pipelines))
    by_file = False
  steps = max(1, -(-max(examples) // per_pipeline_batch))
  return EpochPlan(by_file=by_file, num_pipelines=num_pipelines, examples=examples,
                   batch=per_pipeline_batch, steps=steps)


def warn_if_record_sharded(source: RecordSource, num_pipelines: int) -> None:
  if len(source.files) < num_pipelines:
    logging.warning(
        "Stream mode: %d record file(s) for %d input pipelines, so every pipeline reads every "
        "file and keeps one record in %d (correct, but each reads %dx the bytes it needs). "
        "Prepare the dataset with at least %d files: --num_shards=%d with a new --data_dir.",
        len(source.files), num_pipelines, num_pipelines, num_pipelines, num_pipelines,
        num_pipelines)


def _epoch(source: RecordSource, plan: EpochPlan, pipeline_id: int, seed: int, epoch: int,
           shuffle_buffer: int) -> tf.data.Dataset:
  """One epoch of one pipeline: plan.steps * per_pipeline records, the pipeline's
  plan.examples real ones first, then padding (copies of its first record: _weights gives them
  weight 0). Nothing runs per record but reading, shuffling and batching: tf.data's per-element
  function calls cost more than a decoded record's whole journey."""
  files = [source.files[i] for i in plan.files_of(pipeline_id, len(source.files))]
  order = tf.random.experimental.stateless_shuffle(
      tf.constant(files), seed=[seed, epoch]) if plan.by_file else tf.constant(files)
  # Decoded copies (local files) read faster in turn than in parallel.
  ds = tf.data.Dataset.from_tensor_slices(order).interleave(
      source.reader, cycle_length=max(1, min(4, len(files))),
      num_parallel_calls=None if source.decoded else tf.data.AUTOTUNE)
  if not plan.by_file:
    ds = ds.shard(plan.num_pipelines, pipeline_id)
  if shuffle_buffer > 1:
    shuffle_seed = (seed * 1_000_003 + epoch * 1_009 + pipeline_id) % (2 ** 31)
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  padding = source.reader(files[0]).take(1).repeat()  # real bytes, so every batch decodes alike
  return ds.concatenate(padding).take(plan.steps * plan.batch)


def _on_one_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  """The pipeline on one thread of its own: the training step keeps every core busy, and more
  input threads only take turns with it (reading decoded copies, stream mode trained ~10%
  faster on one; bench's stream_input_headroom shows one thread outruns training)."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def _weights(batch_index, per_replica: int, batches_per_epoch: int, real: int):
  """1 for the real examples of the batch, 0 for padding: each epoch of a pipeline holds its
  `real` examples first, then padding, in batches_per_epoch batches of per_replica."""
  first = (batch_index % batches_per_epoch) * per_replica
  positions = first + tf.range(per_replica, dtype=tf.int64)
  return tf.cast(positions < real, tf.float32)


def _decoded(source: RecordSource, records, weights, per_replica: int):
  """A batch of records, decoded. Every batch holds per_replica records (drop_remainder, after
  padding), and saying so keeps the batch dimension static, as the in-memory path's is, so the
  step is traced for the one shape it runs (bench/README.md has the measured difference)."""
  images, labels = source.decode(records)
  images = tf.ensure_shape(images, [per_replica, *source.image_shape])
  labels = tf.ensure_shape(labels, [per_replica])
  return tf.cast(images, tf.float32) / 255.0, tf.cast(labels, tf.int32), weights


def find_damaged(source: RecordSource, max_seconds: float = 120.0) -> str:
  """The first of the source's record files that does not read back whole (a record's checksum
  or length), or "" (always for decoded copies, which were checked when they were made).

  TensorFlow's error for a damaged record names its offset, not its file; this reads the files
  again to name it, for at most max_seconds (a huge dataset is not scanned in full). Files not
  here are skipped: of a bucket, a worker fetches only those it reads.
  """
  if source.decoded:
    return ""
  deadline = time.monotonic() + max_seconds
  for i, path in enumerate(source.files):
    try:
      for _ in tf.data.TFRecordDataset(path).batch(1024):
        if time.monotonic() > deadline:
          return ""
    except tf.errors.DataLossError:
      return source.name_of(i)
    except tf.errors.NotFoundError:
      continue
  return ""

"""The input plan: the input mode a run trains in, its steps, and who reads which files, decided
once, from the prepared dataset's metadata and before anything is decoded. The training loop,
the checkpoint's run shape and the input functions read the plan; none decides again."""

import dataclasses
import logging

import numpy as np

from trainer import config as config_lib
from trainer import errors
from trainer.data import in_memory
from trainer.data import sources
from trainer.data import stream
from trainer.data import stream_source
from trainer.runtime import distribute


@dataclasses.dataclass(frozen=True)
class InputPlan:
  """How this process reads the training data, the same decision on every worker."""

  mode: str  # "in_memory" or "stream"
  reason: str  # why: "--input_mode", or the decoded size against --in_memory_limit_mb
  builder: object  # the prepared dataset (a TFDS builder or tfds_metadata.PreparedDataset)
  num_train: int  # training examples (--train_examples applied)
  steps_per_epoch: int
  total_steps: int  # --train_steps, or --epochs in steps (config.resolve_steps)
  # Stream mode's alone; in memory (0, (), None) the order depends on none of them.
  pipelines: int = 0  # input pipelines in the whole job: the record files are sharded over them
  local_pipeline_ids: tuple = ()  # the pipelines this process builds (of gs:// data, fetched)
  epoch: stream.EpochPlan | None = None  # who reads what in every epoch
  source: stream.RecordSource | None = None  # the train files this process reads

  @property
  def record_files(self) -> int:
    """Stream mode's train record files (0 in memory)."""
    return len(self.source.files) if self.source is not None else 0


def plan(data: config_lib.DataConfig, training: config_lib.TrainingConfig,
         runtime: distribute.Runtime) -> InputPlan:
  """Prepares --dataset and plans the input of this process of the run, from the DataConfig
  and TrainingConfig (trainer/config.py) and the strategy.

  ConfigError (exit 2) for a global batch that does not fit the train split or divide over the
  replicas, and for --train_steps contradicting --epochs: all before anything is decoded. In
  stream mode the train files this process reads are here when it returns (of gs:// data,
  fetched; decoded once when the run reads them whole: stream_source.record_source).
  """
  builder = sources.prepare_data(data)
  mode, reason = choose_input_mode(data, builder)
  logging.info("Input mode %s (%s)." if reason == "--input_mode" else "Input mode %s: %s.", mode,
               reason)
  num_train = num_train_examples(builder, data.train_examples)
  check_batch_fits(training.global_batch_size, num_train)
  in_memory.check_divisible(training.global_batch_size, runtime.num_replicas)
  if mode == "in_memory":
    steps = in_memory.steps_per_epoch(num_train, training.global_batch_size)
    return InputPlan(mode, reason, builder, num_train, steps,
                     config_lib.resolve_steps(training, steps))
  pipelines = distribute.num_input_pipelines(runtime)
  per_pipeline = training.global_batch_size // pipelines
  epoch = stream.plan_epoch(stream_source.shard_lengths(builder), pipelines, per_pipeline)
  total_steps = config_lib.resolve_steps(training, epoch.steps)
  local_ids = distribute.local_pipeline_ids(runtime)
  # Of gs:// data, only the files this worker's pipelines read are fetched.
  source = stream_source.record_source(
      builder, "train", data.data_dir, pipelines, local_ids,
      examples_read=total_steps * per_pipeline * len(local_ids))
  stream.warn_if_record_sharded(source, pipelines)
  return InputPlan(mode, reason, builder, num_train, epoch.steps, total_steps, pipelines,
                   local_ids, epoch, source)


def train_input(input_plan: InputPlan, splits: in_memory.Splits, data: config_lib.DataConfig,
                training: config_lib.TrainingConfig, start_step: int):
  """The training input function (InputContext -> dataset) of the plan's mode, for
  distribute.input_iterator; both modes continue exactly at start_step. data and training:
  the run's DataConfig and TrainingConfig."""
  if input_plan.mode == "stream":
    return stream.train_dataset_fn(input_plan.source, training.global_batch_size, training.seed,
                                   data.shuffle_buffer, start_step=start_step,
                                   total_steps=input_plan.total_steps,
                                   epoch_plan=input_plan.epoch)
  return in_memory.train_dataset_fn(splits.train_images, splits.train_labels,
                                    training.global_batch_size, training.seed,
                                    start_step=start_step, total_steps=input_plan.total_steps)


def choose_input_mode(data: config_lib.DataConfig, builder) -> tuple:
  """(mode, reason): in_memory or stream, by the DataConfig's --input_mode, or for auto by the
  decoded size of the train split from the metadata."""
  if data.input_mode != "auto":
    return data.input_mode, "--input_mode"
  decoded_mb = decoded_train_mb(builder, data.train_examples)
  mode = "stream" if decoded_mb > data.in_memory_limit_mb else "in_memory"
  return mode, (f"the decoded train split is about {decoded_mb:.0f} MB, "
                f"{'over' if mode == 'stream' else 'within'} "
                f"--in_memory_limit_mb={int(data.in_memory_limit_mb)}")


def decoded_train_mb(builder, limit: int = 0) -> float:
  """What the decoded train split would take in memory, from the TFDS metadata alone."""
  shape = builder.info.features["image"].shape
  if any(d is None for d in shape):
    return float("inf")  # images of varying size cannot be held as one array anyway
  return num_train_examples(builder, limit) * (int(np.prod(shape)) + 4) / 2 ** 20


def num_train_examples(builder, limit: int = 0) -> int:
  """Size of the train split from the TFDS metadata, without decoding anything."""
  total = builder.info.splits["train"].num_examples
  return min(total, limit) if limit else total


def check_batch_fits(global_batch_size: int, num_examples: int) -> None:
  """A global batch larger than the train split is a config error, found before any allocation."""
  if global_batch_size > num_examples:
    raise errors.ConfigError(
        f"--global_batch_size={global_batch_size} is larger than the {num_examples} training "
        f"examples: use at most {num_examples} (or more --train_examples).")

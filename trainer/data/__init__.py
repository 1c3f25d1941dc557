"""Input data: prepares --dataset, plans how a run reads it, and builds its input pipelines.

The training loop asks for a plan (input_plan.plan: mode, steps, who reads which files), the
splits held in memory (in_memory.load) and the input function of the plan's mode
(input_plan.train_input). The modules, each importing only those listed after it:

  input_plan     the one decision: in_memory or stream, steps per epoch and in all, pipelines
  in_memory      Splits and load (arrays in memory), the in-memory sharded pipeline, eval batches
  stream_source  stream mode's RecordSource of a prepared TFDS split (fetched, maybe decoded)
  decoded_records  stream mode's decoded copies of record files, checksummed
  stream         stream mode's pipeline: files sharded over pipelines, each example once an epoch
  pipeline       what every tf.data pipeline here is built with (no AutoGraph, no autotune thread)
  sources        --dataset as a prepared dataset: TFDS (MNIST from local files) or image_folder
  image_folder   --dataset=image_folder:DIR prepared as TFDS records
  image_scan     an image folder's layout: class folders, splits, a DataError for anything else
  tfds_metadata  a prepared TFDS dataset opened from its metadata alone (no TFDS import)
  mnist_tfds     MNIST's files written as TFDS's own mnist, without TFDS's per-example Python
  mnist          MNIST's files: canonical hashes, the bounded download, IDX reading
  cache          a split's decoded arrays beside the prepared data, checksummed
  staging        gs:// inputs as local copies: staged metadata, record files fetched and checked
  files          locks, partial folders and the atomic replace every preparation uses

Below data/ only storage/, runtime/ and the base modules; nothing here imports the training
loop. The names below are the package's public face, re-exported for its callers.
"""

from trainer.data.in_memory import (Splits, check_divisible, eval_batches, load,  # noqa: F401
                                    steps_per_epoch, train_dataset_fn)
from trainer.data.input_plan import (InputPlan, check_batch_fits, choose_input_mode,  # noqa: F401
                                     decoded_train_mb, num_train_examples, plan, train_input)
from trainer.data.mnist import (MNIST_SHA256, MNIST_URL, download_mnist, read_idx,  # noqa: F401
                                vendored_mnist_dir, verify_mnist_files)
from trainer.data.sources import check_download_hosts, prepare, tfds_builder  # noqa: F401
from trainer.data.staging import STAGED_MARKER, is_record_file, stage, staged_dir  # noqa: F401
from trainer.data.stream_source import record_source, shard_lengths  # noqa: F401


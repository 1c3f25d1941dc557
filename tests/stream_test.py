"""Stream mode on record files written here: every example once per epoch, equal steps, resume."""

import collections
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import decoded_records
from trainer.data import stream

SHAPE = (4, 4, 1)


def _write(tmp_path, counts):
  """Record files whose examples carry their id (as the label); returns a RecordSource."""
  files, next_id = [], 0
  for i, count in enumerate(counts):
    path = str(tmp_path / f"toy-train.tfrecord-{i:05d}-of-{len(counts):05d}")
    with tf.io.TFRecordWriter(path) as writer:
      for _ in range(count):
        example = tf.train.Example(features=tf.train.Features(feature={
            "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[next_id]))}))
        writer.write(example.SerializeToString())
        next_id += 1
    files.append(path)

  def decode(records):
    ids = tf.io.parse_example(records, {"id": tf.io.FixedLenFeature([], tf.int64)})["id"]
    pixels = tf.cast(tf.reshape(ids % 256, [-1, 1, 1, 1]), tf.uint8)
    return tf.broadcast_to(pixels, [tf.shape(ids)[0], *SHAPE]), ids

  return stream.RecordSource(files=tuple(files), counts=tuple(counts), image_shape=SHAPE,
                             decode=decode)


def _epoch_ids(source, pipelines, per_replica, seed=1, start_step=0, steps=None):
  """{pipeline: [batches of (ids, weights)]} of one epoch, one replica per pipeline."""
  fn = stream.train_dataset_fn(source, per_replica * pipelines, seed, shuffle_buffer=16,
                               start_step=start_step, total_steps=steps or 1)
  out = {}
  for p in range(pipelines):
    ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=p,
                                     num_replicas_in_sync=pipelines)
    plan = stream.plan_epoch(source.counts, pipelines, per_replica)
    batches = []
    for images, labels, weights in fn(ctx).take(plan.steps - start_step % plan.steps):
      batches.append((labels.numpy().tolist(), weights.numpy().tolist()))
      assert images.shape == (per_replica, *SHAPE)
    out[p] = batches
  return out


def test_stream_functions_are_not_converted_by_autograph(tmp_path, monkeypatch):
  """As in memory (data_test): AutoGraph would write a module per converted function here."""
  source = _write(tmp_path, [5, 6])
  generated_dir = tmp_path / "tmp"
  generated_dir.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(generated_dir))
  _epoch_ids(source, 2, 2)
  assert not [f for f in os.listdir(generated_dir) if f.startswith("__autograph_generated")]


@pytest.mark.parametrize("decoded", [False, True])
def test_batches_have_a_static_shape(tmp_path, decoded):
  """As in memory: the training step is traced for [per_replica, ...], not an unknown batch."""
  source = _write(tmp_path, [5, 6])
  if decoded:
    source = decoded_records.decoded_source(source, [0, 1], 10 ** 9)
    assert source.decoded
  fn = stream.train_dataset_fn(source, 6, seed=1, shuffle_buffer=4, total_steps=4)
  images, labels, weights = fn(tf.distribute.InputContext()).element_spec
  assert images.shape == (6, *SHAPE)
  assert labels.shape == weights.shape == (6,)


@pytest.mark.parametrize("counts, pipelines", [
    ([10, 7, 13, 5], 2),  # files divisible by pipelines, uneven sizes
    ([10, 7, 13, 5, 9], 2),  # not divisible
    ([6, 6, 6, 6, 6, 6, 6, 6], 4),
    ([11, 3, 8, 20, 1, 9], 4),
    ([30, 17], 4),  # fewer files than pipelines: record-level sharding
])
def test_every_example_exactly_once_and_equal_steps(tmp_path, counts, pipelines):
  source = _write(tmp_path, counts)
  epoch = _epoch_ids(source, pipelines, per_replica=4)
  plan = stream.plan_epoch(counts, pipelines, 4)
  assert plan.by_file == (len(counts) >= pipelines)
  assert {len(b) for b in epoch.values()} == {plan.steps}, "every pipeline, the same steps"
  seen = collections.Counter(i for batches in epoch.values() for ids, weights in batches
                             for i, w in zip(ids, weights) if w == 1.0)
  assert seen == collections.Counter(range(sum(counts))), "each example exactly once"
  padded = sum(w == 0.0 for batches in epoch.values() for _, ws in batches for w in ws)
  assert padded == sum(plan.padding)


def test_file_sharding_reads_only_own_files(tmp_path):
  source = _write(tmp_path, [5, 5, 5, 5])
  epoch = _epoch_ids(source, 2, per_replica=5)
  firsts = {p: {i // 5 for ids, ws in b for i, w in zip(ids, ws) if w} for p, b in epoch.items()}
  assert firsts == {0: {0, 2}, 1: {1, 3}}, "pipeline p reads files p, p+P, ..."


def test_resume_continues_the_epoch_exactly(tmp_path):
  source = _write(tmp_path, [10, 7, 13, 5, 9])
  whole = _epoch_ids(source, 2, per_replica=4, steps=40)
  resumed = _epoch_ids(source, 2, per_replica=4, start_step=3, steps=40)
  assert all(resumed[p] == whole[p][3:] for p in whole), "no batch replayed or skipped"


def test_epochs_differ_and_repeat_with_the_seed(tmp_path):
  source = _write(tmp_path, [10, 7, 13, 5])
  fn = stream.train_dataset_fn(source, 8, seed=3, shuffle_buffer=16, total_steps=20)
  ctx = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                   num_replicas_in_sync=1)
  plan = stream.plan_epoch(source.counts, 1, 8)
  labels = [b[1].numpy() for b in fn(ctx).take(2 * plan.steps)]
  first, second = np.concatenate(labels[:plan.steps]), np.concatenate(labels[plan.steps:])
  assert not np.array_equal(first, second)
  again = [b[1].numpy() for b in fn(ctx).take(plan.steps)]
  assert np.array_equal(np.concatenate(again), first)


@pytest.mark.slow
def test_two_workers_stream_resume_after_sigterm(tmp_path):
  """A real 2-worker job in stream mode on MNIST prepared as 4 files: SIGTERM, then relaunch."""
  import json
  import os
  import re
  import signal
  import subprocess
  import sys
  import time
  from conftest import ROOT, child_env, run_module, tiny_flags
  args = tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds"), input_mode="stream",
                    num_shards=4, train_examples=0, train_steps=300, log_every_steps=5,
                    checkpoint_every_steps=100, collective_timeout_s=60, shuffle_buffer=256)
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "trainer.launcher", "--workers=2", "--",
                             *args], env=child_env(), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not re.search(r"\[worker:1\].*step 15/300", log_path.read_text()):
      assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
      time.sleep(0.3)
    for pid in re.findall(r"\[launcher\] worker:\d pid (\d+)", log_path.read_text()):
      os.kill(int(pid), signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log_path.read_text()[-3000:]
  out = log_path.read_text()
  assert "Input mode stream" in out and "record file(s) for 2 input pipelines" not in out
  saved = {int(s) for s in re.findall(r"checkpoint saved at step (\d+)", out)}
  assert len(saved) == 1, saved
  rerun = run_module("trainer.launcher", "--workers=2", "--", *args, timeout=400)
  assert rerun.returncode == 0, rerun.stdout[-3000:]
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["start_step"] == saved.pop() and metrics["global_step"] == 300
  finals = re.findall(r"\[(worker:\d)\].*Final step (\d+) weights_sha256 (\w+)", rerun.stdout)
  assert len(finals) == 2 and finals[0][1:] == finals[1][1:], finals


@pytest.mark.slow
def test_damaged_record_file_exits_3_naming_it(tmp_path, tiny):
  import os
  from trainer import data
  from trainer import errors
  from trainer import train
  data_dir = str(tmp_path / "tfds")
  builder = data.prepare("mnist", data_dir, num_shards=4)
  victim = str(builder.info.splits["train"].filepaths[1])
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 50)  # early in the file: read within the first steps
    f.write(b"\xde\xad\xbe\xef" * 64)  # flip bytes inside a record: its CRC no longer matches
  config = tiny(data_dir=data_dir, input_mode="stream", train_examples=0, train_steps=400,
                shuffle_buffer=8, checkpoint_every_steps=1000, export=False)
  with pytest.raises(errors.DataError) as raised:
    train.train_and_evaluate(config)
  assert raised.value.exit_code == errors.EXIT_DATA
  assert os.path.basename(victim) in str(raised.value), str(raised.value)


@pytest.mark.slow
def test_missing_record_file_exits_3_naming_it(tmp_path, tiny):
  import os
  from trainer import data
  from trainer import errors
  from trainer import train
  data_dir = str(tmp_path / "tfds")
  builder = data.prepare("mnist", data_dir, num_shards=2)
  victim = str(builder.info.splits["train"].filepaths[1])
  os.remove(victim)
  config = tiny(data_dir=data_dir, input_mode="stream", train_examples=0, export=False)
  with pytest.raises(errors.DataError, match=os.path.basename(victim)) as raised:
    train.train_and_evaluate(config)
  assert raised.value.exit_code == errors.EXIT_DATA
  assert not os.path.exists(os.path.join(config.outputs.model_dir, "checkpoints"))


def test_files_read_by_matches_the_plan():
  """What a worker fetches of a bucket is exactly what its pipelines read."""
  for num_files, pipelines in [(4, 2), (5, 2), (8, 4), (6, 4), (2, 4), (1, 2)]:
    plan = stream.plan_epoch([3] * num_files, pipelines, 4)
    for p in range(pipelines):
      assert stream.files_read_by(num_files, pipelines, [p]) == plan.files_of(p, num_files)
    everyone = stream.files_read_by(num_files, pipelines, range(pipelines))
    assert everyone == list(range(num_files))
  assert stream.files_read_by(5, 2, [1]) == [1, 3]
  assert stream.files_read_by(5, 2, [0]) == [0, 2, 4]
  assert stream.files_read_by(2, 4, [3]) == [0, 1], "record-level: every pipeline, every file"

"""Decoded copies of stream mode's record files: the same examples in the same order, made once."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import stream_test
from trainer import data
from trainer import decoded_records
from trainer import errors
from trainer import stream


@pytest.mark.parametrize("counts, pipelines", [([10, 7, 13, 5], 2), ([11, 3, 8, 20, 1, 9], 4),
                                               ([30, 17], 4)])
def test_decoded_copies_yield_the_same_epoch(tmp_path, counts, pipelines):
  encoded = stream_test._write(tmp_path, counts)
  decoded = decoded_records.decoded_source(encoded, range(len(counts)), 10 ** 9)
  assert decoded.reader is not tf.data.TFRecordDataset
  assert all(p.endswith(decoded_records.SUFFIX) and os.path.isfile(p) for p in decoded.files)
  for start_step in (0, 2):  # a resumed run too
    assert stream_test._epoch_ids(decoded, pipelines, 4, start_step=start_step, steps=12) == \
        stream_test._epoch_ids(encoded, pipelines, 4, start_step=start_step, steps=12)


def test_pixels_match_the_tfds_decoder(synthetic_tfds_dir, tmp_path):
  copy = str(tmp_path / "tfds")
  shutil.copytree(synthetic_tfds_dir, copy)
  builder = data.prepare("mnist", copy)
  source = data.record_source(builder, examples_read=10 ** 9)
  assert source.reader is not tf.data.TFRecordDataset
  images, labels = [], []
  for batch in source.reader(list(source.files)).batch(500):
    decoded_images, decoded_labels = source.decode(batch)
    images.append(decoded_images.numpy())
    labels.append(decoded_labels.numpy())
  import tensorflow_datasets as tfds
  # One file after another, as the copies were written (TFDS interleaves files by default).
  want = tfds.as_numpy(builder.as_dataset(
      split="train", batch_size=-1, shuffle_files=False,
      read_config=tfds.ReadConfig(interleave_cycle_length=1)))
  np.testing.assert_array_equal(np.concatenate(images), want["image"])
  np.testing.assert_array_equal(np.concatenate(labels), want["label"])


def test_a_run_shorter_than_its_files_decodes_while_training(tmp_path):
  encoded = stream_test._write(tmp_path, [10, 10])
  assert decoded_records.decoded_source(encoded, [0, 1], examples_read=19) is encoded
  assert not [f for f in os.listdir(tmp_path) if f.endswith(decoded_records.SUFFIX)]
  assert decoded_records.decoded_source(encoded, [1], examples_read=10) is not encoded


def test_too_little_disk_room_decodes_while_training(tmp_path, monkeypatch, caplog):
  encoded = stream_test._write(tmp_path, [10, 10])
  monkeypatch.setattr(decoded_records, "MAX_DISK_SHARE", 1e-15)
  with caplog.at_level("INFO"):
    assert decoded_records.decoded_source(encoded, [0, 1], 10 ** 9) is encoded
  assert "MB free" in caplog.text


def test_copies_are_reused_and_remade_when_damaged_or_stale(tmp_path):
  encoded = stream_test._write(tmp_path, [10, 7])
  first = decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  made = os.stat(first.files[0]).st_mtime_ns
  again = decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  assert again.files == first.files and os.stat(again.files[0]).st_mtime_ns == made
  # A truncated copy (a crash can leave none: copies land by rename) is remade whole.
  with open(first.files[1], "r+b") as f:
    f.truncate(5)
  remade = decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  assert os.path.getsize(remade.files[1]) == 7 * (4 + 16)
  # The record file replaced: a new copy, and the old one is removed.
  os.utime(encoded.files[0], ns=(made + 10 ** 9, made + 10 ** 9))
  newer = decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  assert newer.files[0] != first.files[0]
  assert os.path.isfile(newer.files[0]) and not os.path.exists(first.files[0])
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_damaged_record_file_is_a_data_error_naming_it(tmp_path):
  encoded = stream_test._write(tmp_path, [40, 40])
  victim = encoded.files[1]
  with open(victim, "r+b") as f:
    f.seek(30)
    f.write(b"\xde\xad\xbe\xef" * 8)
  with pytest.raises(errors.DataError, match=os.path.basename(victim)) as raised:
    decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  assert raised.value.exit_code == errors.EXIT_DATA
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_record_count_other_than_the_metadata_is_a_data_error(tmp_path):
  encoded = stream_test._write(tmp_path, [10, 7])
  wrong = stream.RecordSource(files=encoded.files, counts=(10, 8),
                              image_shape=encoded.image_shape, decode=encoded.decode)
  with pytest.raises(errors.DataError, match="holds 7 examples where the dataset's metadata"):
    decoded_records.decoded_source(wrong, [0, 1], 10 ** 9)


def test_images_without_a_fixed_shape_decode_while_training(tmp_path):
  encoded = stream_test._write(tmp_path, [10])
  loose = stream.RecordSource(files=encoded.files, counts=encoded.counts,
                              image_shape=(None, None, 3), decode=encoded.decode)
  assert decoded_records.decoded_source(loose, [0], 10 ** 9) is loose


@pytest.mark.parametrize("small_disk", ["1m"], indirect=True)
def test_a_disk_that_fills_up_while_copying_decodes_while_training(small_disk, monkeypatch):
  """A real 1 MiB tmpfs: the record files fit, their decoded copies do not."""
  encoded = stream_test._write(small_disk, [12000, 12000])
  monkeypatch.setattr(decoded_records, "MAX_DISK_SHARE", 100.0)  # filled by someone else since
  assert decoded_records.decoded_source(encoded, [0, 1], 10 ** 9) is encoded
  leftovers = [f for f in os.listdir(small_disk)
               if f.endswith(".tmp") or
               f.endswith(decoded_records.SUFFIX)]
  assert not leftovers


def test_partial_copies_of_killed_runs_are_removed(tmp_path):
  encoded = stream_test._write(tmp_path, [10])
  copy = os.path.basename(decoded_records._decoded_path(encoded.files[0], encoded.image_shape))
  # atomic_write_local's temp names: one of a killed run, one another worker is writing.
  stale, fresh = (tmp_path / f".{copy}.killed.tmp", tmp_path / f".{copy}.in-progress.tmp")
  for path in (stale, fresh):
    path.write_bytes(b"partial")
  old = os.path.getmtime(stale) - decoded_records.STALE_PARTIAL_S - 60
  os.utime(stale, (old, old))
  decoded_records.decoded_source(encoded, [0], 10 ** 9)
  assert not stale.exists() and fresh.exists(), "another worker's copy in progress is kept"


def test_copies_are_as_readable_as_their_record_files(tmp_path):
  encoded = stream_test._write(tmp_path, [10])
  os.chmod(encoded.files[0], 0o644)
  decoded = decoded_records.decoded_source(encoded, [0], 10 ** 9)
  assert os.stat(decoded.files[0]).st_mode & 0o777 == 0o644

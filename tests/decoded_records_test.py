"""Decoded copies of stream mode's record files: the same examples in the same order, made once."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import stream_test
from trainer import data
from trainer.data import decoded_records
from trainer import errors
from trainer.data import stream


@pytest.mark.parametrize("counts, pipelines", [([10, 7, 13, 5], 2), ([11, 3, 8, 20, 1, 9], 4),
                                               ([30, 17], 4)])
def test_decoded_copies_yield_the_same_epoch(tmp_path, counts, pipelines):
  encoded = stream_test._write(tmp_path, counts)
  decoded = decoded_records.decoded_source(encoded, range(len(counts)), 10 ** 9)
  assert decoded.reader is not tf.data.TFRecordDataset
  assert all(p.endswith(decoded_records.SUFFIX) and os.path.isfile(p) for p in decoded.files)
  # A 3-step run, and that run resumed at step 2: within the first epoch (3-6 steps here), the
  # one compared; a longer run would only build later epochs that nothing reads (1 s of CPU).
  for start_step in (0, 2):
    assert stream_test._epoch_ids(decoded, pipelines, 4, start_step=start_step, steps=3) == \
        stream_test._epoch_ids(encoded, pipelines, 4, start_step=start_step, steps=3)


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
  assert os.path.getsize(remade.files[1]) == 7 * (4 + 16) + decoded_records.FOOTER.size
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


def test_a_damaged_copy_is_remade_with_one_warning(tmp_path, caplog):
  """Issue 33: a same-size overwrite of a third of a copy trained silently. Its footer's CRC-32
  no longer matches: the copy is made again (the same bytes as at first), one warning line."""
  encoded = stream_test._write(tmp_path, [30, 30])
  first = decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  victim = first.files[1]
  with open(victim, "rb") as f:
    good = f.read()
  with open(victim, "r+b") as f:
    f.seek(len(good) // 3)
    f.write(bytes(255 - b for b in good[len(good) // 3:2 * len(good) // 3]))
  assert os.path.getsize(victim) == len(good)
  with caplog.at_level("INFO"):
    again = decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, warnings
  assert victim in warnings[0] and "does not match the checksum" in warnings[0]
  assert encoded.files[1] in warnings[0], "names what the copy is decoded from"
  assert again.files == first.files
  with open(victim, "rb") as f:
    assert f.read() == good
  assert stream_test._epoch_ids(again, 2, 4, steps=8) == stream_test._epoch_ids(encoded, 2, 4,
                                                                                steps=8)
  caplog.clear()
  with caplog.at_level("INFO"):
    decoded_records.decoded_source(encoded, [0, 1], 10 ** 9)
  assert not [r for r in caplog.records if r.levelname == "WARNING"], "a sound copy: no word"


def test_copies_of_the_older_layout_are_replaced(tmp_path):
  """Copies without the checksum footer (made before it existed) are never read: a copy's name
  carries its layout, so the new copy gets a new name and the old one is removed."""
  encoded = stream_test._write(tmp_path, [10])
  old = f"{encoded.files[0]}.0123456789ab{decoded_records.SUFFIX}"
  with open(old, "wb") as f:
    f.write(b"\0" * 10 * (4 + 16))  # the old layout's size: records only
  decoded = decoded_records.decoded_source(encoded, [0], 10 ** 9)
  assert decoded.files[0] != old and not os.path.exists(old)
  assert os.path.getsize(decoded.files[0]) == 10 * (4 + 16) + decoded_records.FOOTER.size


@pytest.mark.slow
def test_a_run_on_a_damaged_copy_trains_the_same_model(synthetic_tfds_dir, tmp_path, caplog):
  """Issue 33's repro: a same-size overwrite of a third of a stream copy trained to rc 0 with
  another weights_sha256 and no warning. Now the copy is remade (one warning line) and the run
  ends with the same weights as one on sound copies."""
  from trainer import config as config_lib
  from trainer import train
  copy = tmp_path / "tfds"
  shutil.copytree(synthetic_tfds_dir, copy, ignore=shutil.ignore_patterns("*.decoded"))

  def run(name):
    return train.train_and_evaluate(config_lib.Config(
        model_dir=str(tmp_path / name), data_dir=str(copy), input_mode="stream",
        train_steps=40, global_batch_size=32, steps_per_loop=20, checkpoint_every_steps=40,
        model_widths=(8, 16), eval_examples=100, export=False, deterministic=True))

  sound = run("sound")
  copies = [os.path.join(copy, "mnist", "3.0.1", n)
            for n in os.listdir(os.path.join(copy, "mnist", "3.0.1"))
            if n.endswith(decoded_records.SUFFIX)]
  assert len(copies) == 4, "one epoch: every file was decoded first"
  size = os.path.getsize(copies[0])
  with open(copies[0], "r+b") as f:
    f.seek(size // 3)
    f.write(os.urandom(size // 3))
  caplog.clear()
  with caplog.at_level("WARNING"):
    again = run("again")
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
              and "Decoded copy" in r.getMessage()]
  assert len(warnings) == 1 and copies[0] in warnings[0], warnings
  assert again["weights_sha256"] == sound["weights_sha256"]

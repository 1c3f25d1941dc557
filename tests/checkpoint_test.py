"""Checkpoints decide from their files: damage falls back, nothing good is overwritten, leftovers go."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from trainer import checkpoint
from trainer import errors
from trainer.runtime import restarts
from trainer.storage import lock as run_lock
from trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_40(tfds_dir, tmp_path_factory):
  """A model_dir trained 40 steps with ckpt-20 and ckpt-40, copied fresh for each test."""
  from trainer import config as config_lib
  base = str(tmp_path_factory.mktemp("trained") / "run")
  config = config_lib.Config(model_dir=base, data_dir=tfds_dir, train_steps=40,
                             global_batch_size=32, train_examples=512, eval_examples=200,
                             log_every_steps=10, checkpoint_every_steps=20, steps_per_loop=5,
                             model_widths=(8, 16), learning_rate=0.05, export=False)
  train.train_and_evaluate(config)
  return config


@pytest.fixture
def run_40(trained_40, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(trained_40.outputs.model_dir, model_dir)
  return trained_40.replace(model_dir=model_dir)


def _ckpt_dir(config):
  return os.path.join(config.outputs.model_dir, "checkpoints")


def _digests(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _damage_state(path, how):
  if how == "deleted":
    os.remove(path)
  elif how == "empty":
    open(path, "w").close()
  elif how == "garbage":
    with open(path, "w") as f:
      f.write("this is { not a checkpoint state\n")
  elif how == "binary":
    with open(path, "wb") as f:
      f.write(b"\xff\xfe\x00\x9c binary")
  elif how == "lists_only_missing":
    with open(path, "w") as f:
      f.write('model_checkpoint_path: "ckpt-999"\nall_model_checkpoint_paths: "ckpt-999"\n')


@pytest.mark.parametrize("how", ["deleted", "empty", "garbage", "binary", "lists_only_missing"])
def test_damaged_state_file_resumes_from_the_files(run_40, how, caplog):
  ckpt_dir = _ckpt_dir(run_40)
  before = {k: v for k, v in _digests(ckpt_dir).items() if k.startswith("ckpt-")}
  _damage_state(os.path.join(ckpt_dir, "checkpoint"), how)
  with caplog.at_level("INFO"):
    metrics = train.train_and_evaluate(run_40.replace(train_steps=60))
  assert metrics["start_step"] == 40 and metrics["global_step"] == 60
  assert any("Checkpoints found in" in r.getMessage() and "ckpt-40, ckpt-20" in r.getMessage()
             for r in caplog.records)
  after = _digests(ckpt_dir)
  assert all(after[name] == digest for name, digest in before.items()), "nothing overwritten"
  assert "ckpt-60.index" in after


@pytest.mark.parametrize("how", ["truncated_data", "zero_data", "truncated_index", "zero_index"])
def test_damaged_newest_checkpoint_falls_back_naming_the_file(run_40, how, caplog):
  prefix = os.path.join(_ckpt_dir(run_40), "ckpt-40")
  path = prefix + (".index" if how.endswith("index") else ".data-00000-of-00001")
  with open(path, "r+b") as f:
    f.truncate(0 if how.startswith("zero") else os.path.getsize(path) // 2)
  with caplog.at_level("ERROR"):
    metrics = train.train_and_evaluate(run_40.replace(train_steps=60))
  assert metrics["start_step"] == 20 and metrics["global_step"] == 60
  errors_logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
  assert len(errors_logged) == 1 and os.path.basename(path) in errors_logged[0], errors_logged


def test_no_restorable_checkpoint_exits_3_and_leaves_every_file(run_40):
  ckpt_dir = _ckpt_dir(run_40)
  for name in os.listdir(ckpt_dir):
    if ".data-" in name:
      with open(os.path.join(ckpt_dir, name), "r+b") as f:
        f.truncate(7)
  before = _digests(run_40.outputs.model_dir)
  with pytest.raises(errors.DataError) as raised:
    train.train_and_evaluate(run_40.replace(train_steps=60))
  assert raised.value.exit_code == errors.EXIT_DATA == 3
  assert ckpt_dir in str(raised.value) and "--restart_from_scratch" in str(raised.value)
  after = _digests(run_40.outputs.model_dir)
  assert {k: v for k, v in after.items() if not k.startswith(".trainer-lock")} == {
      k: v for k, v in before.items() if not k.startswith(".trainer-lock")}


def test_restart_from_scratch_moves_old_checkpoints_aside(run_40):
  ckpt_dir = _ckpt_dir(run_40)
  old = {k: v for k, v in _digests(ckpt_dir).items() if k.startswith("ckpt-")}
  metrics = train.train_and_evaluate(run_40.replace(train_steps=20, restart_from_scratch=True))
  assert metrics["start_step"] == 0 and metrics["global_step"] == 20
  discarded = [d for d in os.listdir(ckpt_dir) if d.startswith("discarded-")]
  assert len(discarded) == 1
  kept = _digests(os.path.join(ckpt_dir, discarded[0]))
  assert all(kept[name] == digest for name, digest in old.items()), "old checkpoints kept aside"


def test_crash_leftovers_are_removed_at_the_next_start(run_40, tmp_path, monkeypatch):
  ckpt_dir = _ckpt_dir(run_40)
  os.makedirs(os.path.join(ckpt_dir, "ckpt-60_temp"))
  export_tmp = os.path.join(run_40.outputs.model_dir, ".export-abc123")
  os.makedirs(export_tmp)
  proc = subprocess.Popen(["true"])  # its pid belongs to no live process once it exited
  proc.wait()
  monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
  os.makedirs(tmp_path / "tmp")
  stale = tmp_path / "tmp" / f"trainer-worker-ckpt-{proc.pid}-xyz"
  live = tmp_path / "tmp" / f"trainer-worker-ckpt-{os.getpid()}-abc"
  os.makedirs(stale)
  os.makedirs(live)
  train.train_and_evaluate(run_40.replace(train_steps=50))
  assert not os.path.exists(os.path.join(ckpt_dir, "ckpt-60_temp"))
  assert not os.path.exists(export_tmp)
  # The non-chief's clean-up, on this host: dead owners' dirs go, live ones stay.
  removed = checkpoint.remove_stale_worker_dirs(str(tmp_path / "tmp"))
  assert removed == [str(stale)] and os.path.isdir(live)


def test_second_run_on_one_model_dir_is_refused(run_40):
  lock = run_lock.acquire(run_40.outputs.model_dir, run_40.outputs.model_dir)
  try:
    with pytest.raises(errors.ConfigError) as raised:
      train.train_and_evaluate(run_40.replace(train_steps=60))
  finally:
    lock.release()
  assert f"pid {os.getpid()}" in str(raised.value) and "in use by another run" in str(raised.value)
  assert not os.path.exists(os.path.join(_ckpt_dir(run_40), "ckpt-60.index"))


def test_stale_lock_of_a_dead_run_is_taken_over(run_40, caplog):
  with open(os.path.join(run_40.outputs.model_dir, run_lock.LOCK_NAME), "w") as f:
    json.dump({"host": "old-host", "pid": 999999, "started": "2026-01-01T00:00:00Z"}, f)
  with caplog.at_level("WARNING"):
    metrics = train.train_and_evaluate(run_40.replace(train_steps=60))
  assert metrics["global_step"] == 60
  assert any("Took over the lock" in r.getMessage() and "old-host" in r.getMessage()
             for r in caplog.records)


def test_divergence_before_any_checkpoint_claims_none(tiny):
  with pytest.raises(errors.DivergenceError) as raised:
    train.train_and_evaluate(tiny(train_steps=20, checkpoint_every_steps=10, inject_nan_at_step=3,
                                  export=False))
  assert "No checkpoint was saved before it" in str(raised.value)
  assert "(0)" not in str(raised.value) and "step 0" not in str(raised.value)


def test_max_job_restarts_stops_a_run_that_never_finishes(tiny):
  config = tiny(train_steps=30, checkpoint_every_steps=10, inject_nan_at_step=25,
                max_job_restarts=1, export=False)
  for _ in range(2):  # the first start and one restart: both diverge at step 25
    with pytest.raises(errors.DivergenceError):
      train.train_and_evaluate(config)
  with pytest.raises(errors.RestartsExhaustedError) as raised:
    train.train_and_evaluate(config)
  assert raised.value.exit_code == errors.EXIT_RESTARTS_EXHAUSTED == 7
  assert "--max_job_restarts=1" in str(raised.value)
  starts_file = os.path.join(config.outputs.model_dir, "checkpoints", restarts.FILE_NAME)
  assert len(json.load(open(starts_file))["starts"]) == 2
  # A finished run starts the count afresh.
  train.train_and_evaluate(config.replace(inject_nan_at_step=0, max_job_restarts=5))
  assert not os.path.exists(starts_file)


def test_rerun_with_nothing_to_train_keeps_the_throughput(tiny, caplog):
  config = tiny(train_steps=20, export=False)
  first = train.train_and_evaluate(config)
  with caplog.at_level("WARNING"):
    second = train.train_and_evaluate(config)
  assert second["start_step"] == 20
  assert second["train_images_per_sec"] == first["train_images_per_sec"] > 0
  assert second["train_seconds"] == first["train_seconds"] > 0
  assert any("nothing to train" in r.getMessage() and "new\n--model_dir" not in r.getMessage()
             and "--model_dir" in r.getMessage() for r in caplog.records)


def test_global_batch_larger_than_the_data_is_a_config_error(tiny):
  with pytest.raises(errors.ConfigError, match="--global_batch_size=3000000000 is larger than"):
    train.train_and_evaluate(tiny(global_batch_size=3_000_000_000))


def test_epochs_and_steps_disagreement_found_before_decoding(tiny, monkeypatch):
  from trainer import data
  def refuse(*args, **kwargs):
    raise AssertionError("the data was loaded before the flags were checked")
  monkeypatch.setattr(data, "load", refuse)
  with pytest.raises(errors.ConfigError, match="--train_steps=7 contradicts --epochs=1"):
    train.train_and_evaluate(tiny(train_steps=7, epochs=1))


def test_full_disk_while_saving_exits_6_and_keeps_the_previous_checkpoint(small_disk, trained_40):
  model_dir = str(small_disk / "run")
  shutil.copytree(trained_40.outputs.model_dir, model_dir)
  config = trained_40.replace(model_dir=model_dir, train_steps=60)
  ckpt_dir = _ckpt_dir(config)
  before = {k: v for k, v in _digests(ckpt_dir).items() if k.startswith("ckpt-40")}
  filler = small_disk / "filler"
  with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError:
      pass
  with pytest.raises(errors.StorageError) as raised:
    train.train_and_evaluate(config)
  assert raised.value.exit_code == errors.EXIT_STORAGE == 6
  assert "No space left" in str(raised.value) and model_dir in str(raised.value)
  after = _digests(ckpt_dir)
  assert all(after[name] == digest for name, digest in before.items())
  assert checkpoint.damage(os.path.join(ckpt_dir, "ckpt-40")) == ""
  os.remove(filler)  # with room again, the same command resumes from step 40
  assert train.train_and_evaluate(config)["start_step"] == 40

"""metrics.json's precision tells every stretch of a resumed run (real files, a real dir)."""

from trainer import history


def test_one_policy_throughout(tmp_path):
  history.record_start(str(tmp_path), 0, "float32")
  history.record_start(str(tmp_path), 120, "float32")  # resumed on the same kind of machine
  assert history.summary(str(tmp_path), 235, "float32") == {
      "precision": "float32", "precision_segments": [{"steps": [1, 235], "precision": "float32"}]}


def test_a_resume_on_another_cpu_is_a_second_segment(tmp_path):
  history.record_start(str(tmp_path), 0, "mixed_bfloat16")
  history.record_start(str(tmp_path), 120, "float32")
  out = history.summary(str(tmp_path), 235, "float32")
  assert out["precision"] == "mixed_bfloat16 (steps 1-120), float32 (steps 121-235)"


def test_resuming_from_an_older_checkpoint_or_from_scratch_drops_what_is_retrained(tmp_path):
  history.record_start(str(tmp_path), 0, "mixed_bfloat16")
  history.record_start(str(tmp_path), 120, "float32")
  history.record_start(str(tmp_path), 100, "mixed_bfloat16")  # ckpt-120 was damaged
  assert history.summary(str(tmp_path), 235, "x")["precision"] == "mixed_bfloat16"
  history.record_start(str(tmp_path), 0, "float32")  # --restart_from_scratch
  assert history.summary(str(tmp_path), 235, "x")["precision"] == "float32"


def test_a_missing_or_damaged_record_falls_back_to_this_run(tmp_path):
  assert history.summary(str(tmp_path), 10, "float32")["precision"] == "float32"
  (tmp_path / history.FILE_NAME).write_text('{"segments": [{"from_step": "x"}')
  assert history.summary(str(tmp_path), 10, "float32")["precision"] == "float32"

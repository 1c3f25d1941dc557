"""Tests for trainer.actions that need no training: where chunks end, when a profile runs."""

import pytest
import tensorflow as tf

from trainer import actions


@pytest.mark.parametrize("periods, max_steps, total, expected", [
    ([100, 500, 0], 20, 470, [20] * 23 + [10]),  # the default: 20-step chunks, the last short
    ([10, 25], 100, 50, [10, 10, 5, 5, 10, 10]),  # every log (10) and checkpoint (25) boundary
    ([7], 3, 10, [3, 3, 1, 3]),
])
def test_chunks_end_on_every_boundary_and_at_the_end(periods, max_steps, total, expected):
  chunker, step, sizes = actions.Chunker(periods, max_steps, total), 0, []
  while step < total:
    sizes.append(chunker.next_size(step))
    step += sizes[-1]
  assert sizes == expected and step == total
  ends = {sum(sizes[:i + 1]) for i in range(len(sizes))}
  assert all(b in ends for p in periods if p for b in range(p, total + 1, p))


def test_due():
  assert actions.due(20, 10) and not actions.due(25, 10) and not actions.due(20, 0)


@pytest.mark.parametrize("boundaries, expected", [
    ((3, 12), [3, 5, 2, 2, 5, 3]),  # a profile of steps 4-12 with 5-step chunks, checkpoints at 10
    ((0, 1), [1, 5, 4, 5, 5]),  # steps 1-1: nothing ends at step 0, the first chunk is 1 step
    ((), [5, 5, 5, 5]),
])
def test_chunks_also_end_at_single_boundaries(boundaries, expected):
  chunker, step, sizes = actions.Chunker([10], 5, 20, boundaries=boundaries), 0, []
  while step < 20:
    sizes.append(chunker.next_size(step))
    step += sizes[-1]
  assert sizes == expected


def test_profile_boundaries():
  assert actions.profile_boundaries((4, 12)) == (3, 12)
  assert actions.profile_boundaries(None) == ()


class _FakeProfiler:
  """Records what ProfileSteps asks of tf.profiler.experimental."""

  def __init__(self, monkeypatch):
    self.calls = []
    monkeypatch.setattr(tf.profiler.experimental, "start",
                        lambda logdir: self.calls.append(("start", logdir)))
    monkeypatch.setattr(tf.profiler.experimental, "stop",
                        lambda save=True: self.calls.append(("stop", save)))


def _result(step):
  return actions.ChunkResult(step=step, steps=1, loss=1.0, correct=0.0, count=1.0,
                             stop_votes=0.0, seconds=0.1)


def test_profile_starts_before_first_and_stops_after_last(monkeypatch):
  fake = _FakeProfiler(monkeypatch)
  profile = actions.ProfileSteps("/logs/train", 4, 12)
  profile.start_at(0)  # before training: step 1 comes next, not 4
  calls_after = {}
  for step in (3, 8, 10, 12, 15, 20):  # chunk ends, as the Chunker makes them
    profile.stop(_result(step))
    profile.start(_result(step))
    calls_after[step] = list(fake.calls)
  assert calls_after[3] == calls_after[10] == [("start", "/logs/train")]
  assert calls_after[12] == calls_after[20] == [("start", "/logs/train"), ("stop", True)]
  profile.close()
  assert len(fake.calls) == 2, "a saved trace is not stopped again"


@pytest.mark.parametrize("start_step, calls", [
    (0, [("start", "/l")]),  # --profile_steps=1,N starts before the first chunk
    (6, [("start", "/l")]),  # resumed inside the range: traces the rest
    (12, []),  # resumed after it: nothing left to trace
])
def test_profile_at_the_first_step_of_a_run(monkeypatch, start_step, calls):
  fake = _FakeProfiler(monkeypatch)
  actions.ProfileSteps("/l", 1, 12).start_at(start_step)
  assert fake.calls == calls


def test_profile_of_a_run_that_stops_early_is_discarded(monkeypatch):
  fake = _FakeProfiler(monkeypatch)
  profile = actions.ProfileSteps("/l", 4, 12)
  profile.start(_result(3))
  profile.stop(_result(8))
  profile.close()  # e.g. preempted at step 8
  assert fake.calls == [("start", "/l"), ("stop", False)]


@pytest.mark.parametrize("period, first, expected", [
    (10, 0, [10, 20, 30]),  # --eval_every_steps alone: as before
    (5, 22, [22, 27]),  # late and dense
    (0, 17, [17]),  # --first_eval_step alone: one evaluation during training
    (0, 0, []),  # only the final evaluation
])
def test_evaluation_schedule(period, first, expected):
  schedule = actions.Every(period, first)
  assert [s for s in range(31) if schedule.is_due(s)] == expected
  nexts, step = [], 0
  while (step := schedule.next_after(step)) is not None and step <= 30:
    nexts.append(step)
  assert nexts == expected


def test_chunks_end_at_every_scheduled_evaluation():
  chunker, step, ends = actions.Chunker([20], 20, 60, schedules=[actions.Every(4, 45)]), 0, []
  while step < 60:
    step += chunker.next_size(step)
    ends.append(step)
  assert ends == [20, 40, 45, 49, 53, 57, 60]

"""Tests for trainer.actions that need no training: where chunks end."""

import pytest

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

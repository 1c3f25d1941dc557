"""conftest.ONE_WORKER_GROUPS names tests that exist: a renamed module or test would silently
leave its group, and `make test-fast` would again have four workers waiting at once."""

import ast
import os

import pytest

import conftest


@pytest.mark.parametrize("key", sorted(conftest.ONE_WORKER_GROUPS))
def test_every_grouped_module_and_test_exists(key):
  path, _, test = key.partition("::")
  source = os.path.join(conftest.ROOT, path)
  assert os.path.isfile(source), f"{key}: no such test module"
  if test:
    with open(source) as f:
      tree = ast.parse(f.read(), source)
    tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert test in tests, f"{key}: no such test in {path}"

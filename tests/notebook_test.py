"""notebooks/quickstart.ipynb: committed clean, and it runs headless end to end on a tiny run."""

import importlib.machinery
import json
import os
import re
import sys

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat", reason="needs the test extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="needs the test extra (nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="needs the test extra (ipykernel)")
# The kernel imports matplotlib; this process keeps it out (conftest.py), so look on sys.path.
if importlib.machinery.PathFinder.find_spec("matplotlib") is None:
  pytest.skip("needs the test extra (matplotlib)", allow_module_level=True)

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
KERNEL_NAME = "mnist-trainer-test"


def _tags(cell):
  return cell.get("metadata", {}).get("tags", [])


def _cell(nb, tag):
  (cell,) = [c for c in nb.cells if tag in _tags(c)]
  return cell


def _text(cell):
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _has_png(cell):
  return any("image/png" in o.get("data", {}) for o in cell.outputs)


def test_notebook_is_clean_and_parameterized():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  # The first cell installs on Colab and skips when trainer is importable.
  assert "REPO_URL" in code[0].source and "%pip install" in code[0].source
  assert "find_spec(\"trainer\")" in code[0].source
  params = [c for c in nb.cells if "parameters" in _tags(c)]
  assert len(params) == 1, "exactly one papermill 'parameters' cell"
  for name in ("TRAIN_STEPS", "MODEL_DIR", "DATA_DIR", "TRAIN_EXAMPLES"):
    assert re.search(rf"^{name} = ", params[0].source, re.M), name
  for c in code:  # Committed without outputs, so diffs stay readable.
    assert not c.outputs and c.execution_count is None, c.source[:60]


def _kernel_manager(tmp_path):
  """A kernel manager whose only kernelspec runs ipykernel with this interpreter (the venv)."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  spec_dir = tmp_path / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "test venv", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _kernel_env(tmp_path):
  env = dict(os.environ)
  for name in ("TF_CONFIG", "CLUSTER_SPEC", "AIP_MODEL_DIR"):
    env.pop(name, None)
  env.update(MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             IPYTHONDIR=str(tmp_path / "ipython"))
  return env


@pytest.mark.slow
def test_notebook_runs_tiny(tfds_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files
  nb = nbformat.read(NOTEBOOK, as_version=4)
  model_dir = tmp_path / "run"
  overrides = dict(TRAIN_STEPS=30, GLOBAL_BATCH_SIZE=32, LEARNING_RATE=0.05, MODEL_WIDTHS=(8, 16),
                   TRAIN_EXAMPLES=1024, EVAL_EXAMPLES=500, LOG_EVERY_STEPS=10,
                   EVAL_EVERY_STEPS=15, MODEL_DIR=str(model_dir), DATA_DIR=tfds_dir,
                   NUM_SAMPLES=6)
  index = nb.cells.index(_cell(nb, "parameters"))
  injected = nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in overrides.items()),
      metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, injected)

  client = nbclient.NotebookClient(
      nb, km=_kernel_manager(tmp_path), timeout=240, startup_timeout=120,
      resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute(env=_kernel_env(tmp_path))  # Raises CellExecutionError on any error.

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  assert all(c.execution_count for c in code), "every code cell ran"
  assert "Skipping install" in _text(code[0]), _text(code[0])

  curves = _cell(nb, "training-curves")
  assert _has_png(curves), curves.outputs
  for tag in ("loss", "accuracy", "learning_rate", "test_accuracy"):
    assert re.search(rf"\b{tag}\b", _text(curves)), _text(curves)

  predictions = _cell(nb, "predictions")
  assert _has_png(predictions), "grid of digits"
  predicted = re.findall(r"true (\d)  predicted (\d)", _text(predictions))
  assert len(predicted) == overrides["NUM_SAMPLES"], _text(predictions)

  with open(model_dir / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["global_step"] == 30
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  assert metrics["test_examples"] == 500
  assert "test_accuracy" in _text(_cell(nb, "metrics"))

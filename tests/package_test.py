"""The sdist (what Vertex AI python-package jobs run) installs in a clean venv and starts, and so
do its console scripts."""

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_sdist_installs_and_runs(tmp_path):
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist),
                  ROOT], check=True, capture_output=True, timeout=600)
  sdists = list(dist.glob("*.tar.gz"))
  wheels = list(dist.glob("*.whl"))
  assert len(sdists) == 1 and len(wheels) == 1
  with tarfile.open(sdists[0]) as tar:
    names = tar.getnames()
  assert any(n.endswith("trainer/task.py") for n in names)
  assert any(n.endswith("trainer/storage/__init__.py") for n in names)
  # Neither the tests nor the vendored MNIST (the top-level data/, not trainer/data/) ship.
  top_level = [n.split("/", 1)[1] for n in names if "/" in n]
  assert not any(n.startswith(("tests/", "data/")) or n.endswith(".gz") for n in top_level), names

  with zipfile.ZipFile(wheels[0]) as wheel:
    metadata = next(wheel.read(n).decode() for n in wheel.namelist()
                    if n.endswith(".dist-info/METADATA"))
  required = {re.match(r"[\w.-]+", line.split(":", 1)[1].strip()).group().lower().replace("_", "-")
              for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
  assert {"tensorflow", "tensorflow-datasets", "importlib-resources", "google-cloud-storage",
          "absl-py", "tensorboard", "numpy"} <= required, required

  # The dependencies come from this interpreter's site-packages (every CI run resolves them
  # from setup.py in `make venv`): installing the ~1 GB of TensorFlow again would only
  # re-test pip. A .pth line adds that directory after the venv's own one.
  env_dir = tmp_path / "venv"
  venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
  python = str(env_dir / "bin" / "python")
  own_site = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(own_site, "zz_outer_site_packages.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(sdists[0])],
                           capture_output=True, text=True, timeout=900)
  assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
  check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True,
                         timeout=300)
  assert "mnist-dist-trainer" not in check.stdout.lower(), check.stdout[-3000:]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CONFIG")}
  result = subprocess.run([python, "-m", "trainer.task", "--helpfull"], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  for flag in ("--model_dir", "--global_batch_size", "--strategy", "--collective_timeout_s"):
    assert flag in result.stdout
  where = subprocess.run([python, "-c", "import trainer; print(trainer.__file__)"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=env)
  assert str(env_dir) in where.stdout, "the installed package, not the checkout, was used"

  # The console scripts run the modules as `python -m` does: the same help, the same exits.
  with zipfile.ZipFile(wheels[0]) as wheel:
    entry_points = next(wheel.read(n).decode() for n in wheel.namelist()
                        if n.endswith(".dist-info/entry_points.txt"))
  for script, module, flag in (("mnist-train", "trainer.task", "--global_batch_size"),
                               ("mnist-predict", "trainer.predict", "--samples"),
                               ("mnist-launch", "trainer.launcher", "--workers")):
    assert f"{script} = trainer.cli:" in entry_points, entry_points
    command = str(env_dir / "bin" / script)
    helped = subprocess.run([command, "--helpfull"], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path), env=env)
    assert helped.returncode == 0 and flag in helped.stdout, helped.stdout[-2000:] + helped.stderr
    as_module = subprocess.run([python, "-m", module, "--helpfull"], capture_output=True,
                               text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert helped.stdout == as_module.stdout
    bad = subprocess.run([command, "--no_such_flag=1"], capture_output=True, text=True,
                         timeout=300, cwd=str(tmp_path), env=env)
    assert bad.returncode == 2 and "no_such_flag" in bad.stderr, bad.stderr[-2000:]

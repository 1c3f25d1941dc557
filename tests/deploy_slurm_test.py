"""Slurm: TF_CONFIG from TensorFlow's SlurmClusterResolver, the exec wrapper, the sbatch script."""

import importlib.util
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from deploy import slurm_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
SBATCH = ROOT / "deploy" / "slurm" / "train.sbatch"
SLURM_VARS = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
              "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_ID", "SLURM_RESTART_COUNT",
              "SLURM_SUBMIT_DIR", "TF_CONFIG", "CUDA_VISIBLE_DEVICES")


def two_node_step(procid: int) -> dict:
  """What srun exports to task `procid` of `srun --nodes=2 --ntasks-per-node=1`."""
  return {"SLURM_PROCID": str(procid), "SLURM_STEP_NUM_TASKS": "2",
          "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


@pytest.fixture
def slurm(monkeypatch, tmp_path):
  """Sets a fake step environment; PATH holds no nvidia-smi or scontrol to shell out to."""
  for name in SLURM_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))

  def set_step(env):
    for name, value in env.items():
      monkeypatch.setenv(name, value)

  return set_step


def test_two_nodes_give_two_workers_indexed_by_procid(slurm):
  slurm(two_node_step(1))
  config = slurm_env.tf_config(port_base=23456)
  assert config == {"cluster": {"worker": ["node01:23456", "node02:23456"]},
                    "task": {"type": "worker", "index": 1}}
  assert "CUDA_VISIBLE_DEVICES" not in os.environ, "GPU binding is Slurm's, not the resolver's"


def test_slurm_gpu_binding_is_left_alone(slurm):
  slurm({**two_node_step(0), "CUDA_VISIBLE_DEVICES": "2,3"})
  config = slurm_env.tf_config()
  assert config["task"] == {"type": "worker", "index": 0}
  assert config["cluster"]["worker"] == ["node01:8888", "node02:8888"]
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_several_tasks_per_node_get_consecutive_ports_and_none_is_dropped(slurm):
  slurm({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "5",
         "SLURM_STEP_NODELIST": "gpu-a[7-8],gpu-b3", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"})
  config = slurm_env.tf_config(port_base=9000)
  assert config["cluster"]["worker"] == ["gpu-a7:9000", "gpu-a7:9001", "gpu-a8:9000",
                                         "gpu-a8:9001", "gpu-b3:9000"]
  assert config["task"]["index"] == 3


def test_outside_a_slurm_step_is_a_clear_error(slurm):
  with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_STEP_NUM_TASKS"):
    slurm_env.tf_config()
  slurm({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]"})
  with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_STEP_TASKS_PER_NODE"):
    slurm_env.tf_config()


def test_the_trainer_accepts_the_tf_config(slurm):
  if importlib.util.find_spec("trainer.cluster") is None:
    pytest.skip("trainer/cluster.py (parse_cluster) is not in the tree yet")
  from trainer import cluster
  for procid in (0, 1):
    slurm(two_node_step(procid))
    info = cluster.parse_cluster({"TF_CONFIG": json.dumps(slurm_env.tf_config())})
    assert info.num_workers == 2
    assert (info.task_type, info.task_index) == ("worker", procid)
    assert info.is_chief == (procid == 0)


def _child_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
  env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", **extra)
  return env


def test_wrapper_execs_the_command_with_tf_config_and_keeps_its_exit_code():
  probe = ("import os, sys; print(os.environ['TF_CONFIG']); "
           "sys.exit(143)")
  result = subprocess.run(
      [sys.executable, "-m", "deploy.slurm_env", "--port_base=24000", "--",
       sys.executable, "-c", probe],
      env=_child_env(**two_node_step(1)), cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 143, result.stderr
  assert json.loads(result.stdout) == {"cluster": {"worker": ["node01:24000", "node02:24000"]},
                                       "task": {"type": "worker", "index": 1}}


def test_wrapper_without_a_command_fails_fast():
  result = subprocess.run([sys.executable, "-m", "deploy.slurm_env"], env=_child_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert "after `--`" in result.stderr


# ---- deploy/slurm/train.sbatch ----

def test_sbatch_is_valid_bash_with_one_task_per_node():
  subprocess.run(["bash", "-n", str(SBATCH)], check=True)
  text = SBATCH.read_text()
  directives = [line.split(None, 1)[1] for line in text.splitlines()
                if line.startswith("#SBATCH")]
  assert "--ntasks-per-node=1" in directives
  assert "--requeue" in directives
  assert "-m deploy.slurm_env" in text and "-m trainer.task" in text


def _fake_tools(tmp_path, srun_rc, scontrol_rc):
  """srun and scontrol stand-ins that record their arguments (the script is under test)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, rc in (("srun", srun_rc), ("scontrol", scontrol_rc)):
    tool = bin_dir / name
    tool.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\nexit {rc}\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
  return bin_dir


def run_sbatch(tmp_path, srun_rc, restarts="0", model_dir="gs://b/runs/slurm", scontrol_rc=0):
  env = {"PATH": f"{_fake_tools(tmp_path, srun_rc, scontrol_rc)}:/usr/bin:/bin",
         "SLURM_JOB_ID": "4242",
         "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_RESTART_COUNT": restarts}
  if model_dir:
    env["MODEL_DIR"] = model_dir
  result = subprocess.run(["bash", str(SBATCH), "--epochs=2"], env=env, capture_output=True,
                          text=True, timeout=30)
  requeue = tmp_path / "scontrol.args"
  return result, requeue.read_text().split() if requeue.exists() else None


def test_sbatch_launches_the_wrapper_then_the_trainer(tmp_path):
  result, requeued = run_sbatch(tmp_path, srun_rc=0)
  assert result.returncode == 0, result.stderr
  assert requeued is None
  args = (tmp_path / "srun.args").read_text().split("\n")
  wrapper, trainer = args[:args.index("--")], args[args.index("--") + 1:]
  assert wrapper[-3:-1] == ["-m", "deploy.slurm_env"]
  assert trainer[1:3] == ["-m", "trainer.task"]
  assert "--model_dir=gs://b/runs/slurm" in trainer
  assert "--strategy=multi_worker_mirrored" in trainer
  assert "--epochs=2" in trainer


@pytest.mark.parametrize("srun_rc, restarts, requeue", [
    (143, "0", True),    # preempted or lost a peer: run again from the checkpoint
    (143, "3", False),   # MAX_REQUEUES reached
    (2, "0", False),     # bad flags: permanent
    (5, "0", False),     # diverged: permanent
])
def test_sbatch_requeues_only_retryable_exits(tmp_path, srun_rc, restarts, requeue):
  result, requeued = run_sbatch(tmp_path, srun_rc=srun_rc, restarts=restarts)
  assert result.returncode == srun_rc
  assert requeued == (["requeue", "4242"] if requeue else None)


def test_a_failed_requeue_keeps_the_trainers_exit_code(tmp_path):
  result, requeued = run_sbatch(tmp_path, srun_rc=143, scontrol_rc=1)
  assert requeued == ["requeue", "4242"]
  assert result.returncode == 143
  assert "requeue failed" in result.stderr


def test_sbatch_needs_model_dir(tmp_path):
  result, _ = run_sbatch(tmp_path, srun_rc=0, model_dir="")
  assert result.returncode != 0
  assert "MODEL_DIR" in result.stderr
  assert not (tmp_path / "srun.args").exists()

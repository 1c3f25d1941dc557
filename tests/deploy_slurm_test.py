"""Slurm: TF_CONFIG in Slurm's own node order, the exec wrapper, and the sbatch script."""

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
              "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE",
              "SLURM_NTASKS", "SLURMD_NODENAME", "SLURM_LOCALID", "SLURM_JOB_ID",
              "SLURM_RESTART_COUNT", "SLURM_SUBMIT_DIR", "SLURM_GPUS_ON_NODE", "TF_CONFIG",
              "CUDA_VISIBLE_DEVICES", "NODES", "GPUS_PER_NODE", "GPU_REQUEST", "APPTAINER_IMAGE",
              "PYXIS_IMAGE", "MODEL_DIR", "SLURM_HET_SIZE", "SLURM_PACK_SIZE")


def step(nodelist: str, tasks_per_node: str, procid: int) -> dict:
  """What srun exports to task `procid` of a step, with the node and local id that block
  distribution (srun's default) gives it."""
  hosts = slurm_env.expand_hostlist(nodelist)
  counts = slurm_env.expand_tasks_per_node(tasks_per_node)
  node = next(i for i in range(len(counts)) if procid < sum(counts[:i + 1]))
  return {"SLURM_PROCID": str(procid), "SLURM_STEP_NUM_TASKS": str(sum(counts)),
          "SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
          "SLURMD_NODENAME": hosts[node], "SLURM_LOCALID": str(procid - sum(counts[:node]))}


def two_node_step(procid: int) -> dict:
  """`srun --nodes=2 --ntasks-per-node=1` on node01 and node02."""
  return step("node[01-02]", "1(x2)", procid)


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


# ---- Hostlists and tasks per node, as Slurm writes them ----

@pytest.mark.parametrize("expr, hosts", [
    ("node[9-10]", ["node9", "node10"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("n[1,3-4,10]", ["n1", "n3", "n4", "n10"]),
    ("c[098-101]", ["c098", "c099", "c100", "c101"]),
    ("login,gpu-a[7-8],gpu-b3", ["login", "gpu-a7", "gpu-a8", "gpu-b3"]),
    ("node10,node9", ["node10", "node9"]),  # Slurm's order, whatever it is, is kept
])
def test_hostlists_expand_in_slurms_order(expr, hosts):
  assert slurm_env.expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr", ["node[1-", "node[3-1]", "node[a-b]", "n[[1-2]]", "n]1[", "",
                                  "n[1-2],n2"])
def test_bad_hostlists_are_errors(expr):
  with pytest.raises(slurm_env.SlurmEnvError, match="Hostlist"):
    slurm_env.expand_hostlist(expr)


def test_tasks_per_node_expand():
  assert slurm_env.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
  assert slurm_env.expand_tasks_per_node("4") == [4]
  with pytest.raises(slurm_env.SlurmEnvError, match="cannot read"):
    slurm_env.expand_tasks_per_node("2(3)")


# ---- TF_CONFIG ----

def test_node9_and_node10_keep_slurms_order():
  """TensorFlow's SlurmClusterResolver sorts these as strings and puts node10 first."""
  for procid, host in ((0, "node9"), (1, "node10")):
    config = slurm_env.tf_config(port_base=23456, environ=step("node[9-10]", "1(x2)", procid))
    assert config == {"cluster": {"worker": ["node9:23456", "node10:23456"]},
                      "task": {"type": "worker", "index": procid}}
    assert config["cluster"]["worker"][procid].startswith(host + ":")


def test_zero_padded_and_mixed_prefix_nodes():
  config = slurm_env.tf_config(environ=step("gpu[001-003]", "1(x3)", 2))
  assert config["cluster"]["worker"] == ["gpu001:8888", "gpu002:8888", "gpu003:8888"]
  config = slurm_env.tf_config(environ=step("a[1-2],b3", "1(x3)", 2))
  assert config["cluster"]["worker"] == ["a1:8888", "a2:8888", "b3:8888"]
  assert config["task"]["index"] == 2


def test_several_tasks_per_node_get_distinct_ports_and_agree_on_the_cluster():
  nodelist, tasks = "rack[1-2]-n[01-02],b3", "2(x2),1,3,1"
  configs = [slurm_env.tf_config(port_base=9000, environ=step(nodelist, tasks, procid))
             for procid in range(9)]
  workers = configs[0]["cluster"]["worker"]
  assert workers == ["rack1-n01:9000", "rack1-n01:9001", "rack1-n02:9000", "rack1-n02:9001",
                     "rack2-n01:9000", "rack2-n02:9000", "rack2-n02:9001", "rack2-n02:9002",
                     "b3:9000"]
  assert len(set(workers)) == len(workers), "two tasks would bind the same host:port"
  for procid, config in enumerate(configs):
    assert config["cluster"]["worker"] == workers, "every task must see the same cluster"
    assert config["task"] == {"type": "worker", "index": procid}
    # Each task's own address is on the node srun started it on.
    assert workers[procid].split(":")[0] == step(nodelist, tasks, procid)["SLURMD_NODENAME"]


def test_the_job_variables_serve_outside_a_step():
  environ = {"SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "node[9-10]",
             "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NTASKS": "2", "SLURMD_NODENAME": "node10"}
  assert slurm_env.tf_config(environ=environ)["cluster"]["worker"] == ["node9:8888",
                                                                      "node10:8888"]


def test_a_task_on_another_node_than_the_layout_says_is_an_error():
  environ = {**step("node[9-10]", "1(x2)", 0), "SLURMD_NODENAME": "node10"}
  with pytest.raises(slurm_env.SlurmEnvError, match="runs on node10.*puts it on node9"):
    slurm_env.tf_config(environ=environ)


def test_cyclic_distribution_is_caught():
  """srun --distribution=cyclic puts rank 1 on the second node; block puts it on the first."""
  environ = {**step("n[1-2]", "2(x2)", 1), "SLURMD_NODENAME": "n2", "SLURM_LOCALID": "0"}
  with pytest.raises(slurm_env.SlurmEnvError, match="--distribution=block"):
    slurm_env.tf_config(environ=environ)
  environ = {**step("n[1-2]", "2(x2)", 1), "SLURM_LOCALID": "0"}
  with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_LOCALID=0"):
    slurm_env.tf_config(environ=environ)


# What task 1 of `srun --het-group=0,1` saw in `sbatch -N1 : -N1` on Slurm 22.05 (a subset;
# tests/slurm_cluster_test.py runs the wrapper in such a job).
HET_STEP_TASK_1 = {
    "SLURMD_NODENAME": "node10", "SLURM_HET_SIZE": "2", "SLURM_PACK_SIZE": "2",
    "SLURM_JOB_NODELIST": "node[9-10]", "SLURM_JOB_NODELIST_HET_GROUP_0": "node9",
    "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
    "SLURM_STEP_NODELIST": "node[9-10]", "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_TASKS_PER_NODE": "1(x2)"}


@pytest.mark.parametrize("environ, named", [
    (HET_STEP_TASK_1, "SLURM_HET_SIZE=2"),
    # Slurm before 20.02 called them packs; 22.05 still sets both names.
    ({**two_node_step(1), "SLURM_PACK_SIZE": "2"}, "SLURM_PACK_SIZE=2"),
    # A het step whose ranks do not follow the node list used to get the --distribution advice.
    ({**HET_STEP_TASK_1, "SLURMD_NODENAME": "node9"}, "SLURM_HET_SIZE=2"),
])
def test_heterogeneous_jobs_are_refused_with_the_fix(environ, named):
  with pytest.raises(slurm_env.SlurmEnvError) as raised:
    slurm_env.tf_config(environ=environ)
  message = str(raised.value)
  assert f"heterogeneous Slurm job ({named})" in message
  assert "heterogeneous jobs are not supported" in message
  assert "one homogeneous allocation with one task per node" in message
  assert "--distribution" not in message, "the wrong fix for a heterogeneous job"


def test_a_normal_step_with_per_component_variables_is_not_heterogeneous():
  """srun sets SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0 in every task of a normal 22.05 job."""
  environ = {**two_node_step(0), "SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0": "8(x2)",
             "SLURM_HET_SIZE": ""}
  assert slurm_env.tf_config(environ=environ)["task"] == {"type": "worker", "index": 0}


@pytest.mark.parametrize("change, message", [
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x3)"}, "gives 3 nodes"),
    ({"SLURM_STEP_NUM_TASKS": "3"}, "adds up to 2 tasks"),
    ({"SLURM_PROCID": "2"}, "outside the step's 2 tasks"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID"),
    ({"SLURMD_NODENAME": ""}, "SLURMD_NODENAME is not set"),
    ({"SLURM_STEP_NUM_TASKS": "two"}, "not a number"),
])
def test_inconsistent_step_variables_are_errors(change, message):
  with pytest.raises(slurm_env.SlurmEnvError, match=message):
    slurm_env.tf_config(environ={**two_node_step(0), **change})


def test_ports_must_fit():
  with pytest.raises(slurm_env.SlurmEnvError, match="--port_base=65535"):
    slurm_env.tf_config(port_base=65535, environ=step("n1", "2", 0))


def test_slurm_gpu_binding_is_left_alone(slurm):
  slurm({**two_node_step(0), "CUDA_VISIBLE_DEVICES": "2,3"})
  config = slurm_env.tf_config()
  assert config["task"] == {"type": "worker", "index": 0}
  assert config["cluster"]["worker"] == ["node01:8888", "node02:8888"]
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_outside_a_slurm_step_is_a_clear_error(slurm):
  with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_JOB_NODELIST"):
    slurm_env.tf_config()
  slurm({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]"})
  with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_STEP_TASKS_PER_NODE"):
    slurm_env.tf_config()


def test_the_trainer_accepts_the_tf_config(slurm):
  if importlib.util.find_spec("trainer.runtime.cluster") is None:
    pytest.skip("trainer/runtime/cluster.py (parse_cluster) is not in the tree yet")
  from trainer.runtime import cluster
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


def test_wrapper_refuses_a_misplaced_task_before_running_the_command(tmp_path):
  marker = tmp_path / "ran"
  env = _child_env(**{**two_node_step(1), "SLURMD_NODENAME": "node01"})
  result = subprocess.run(
      [sys.executable, "-m", "deploy.slurm_env", "--", sys.executable, "-c",
       f"open({str(marker)!r}, 'w')"], env=env, cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2
  assert "runs on node01" in result.stderr
  assert not marker.exists()


def test_wrapper_refuses_a_heterogeneous_step_before_running_the_command(tmp_path):
  marker = tmp_path / "ran"
  result = subprocess.run(
      [sys.executable, "-m", "deploy.slurm_env", "--", sys.executable, "-c",
       f"open({str(marker)!r}, 'w')"], env=_child_env(**HET_STEP_TASK_1), cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert "heterogeneous jobs are not supported" in result.stderr
  assert not marker.exists()


def test_wrapper_without_a_command_fails_fast():
  result = subprocess.run([sys.executable, "-m", "deploy.slurm_env"], env=_child_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert "after `--`" in result.stderr


# ---- deploy/slurm/train.sbatch ----

def test_sbatch_is_executable_in_git_and_on_disk():
  """README runs `deploy/slurm/train.sbatch ...` directly: a clone must get mode 100755."""
  assert os.access(SBATCH, os.X_OK), f"chmod +x {SBATCH.relative_to(ROOT)}"
  result = subprocess.run(["git", "ls-files", "-s", "--", "deploy/slurm/train.sbatch"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
  if result.returncode or not result.stdout:
    pytest.skip("not a git checkout (an sdist, say): only the mode on disk is checked")
  mode = result.stdout.split()[0]
  assert mode == "100755", (f"git has deploy/slurm/train.sbatch as {mode}: run "
                            "`git update-index --chmod=+x deploy/slurm/train.sbatch`")


def test_sbatch_is_valid_bash_with_one_task_per_node():
  subprocess.run(["bash", "-n", str(SBATCH)], check=True)
  text = SBATCH.read_text()
  directives = [line.split(None, 1)[1] for line in text.splitlines()
                if line.startswith("#SBATCH")]
  assert "--ntasks-per-node=1" in directives
  assert "--requeue" in directives
  # The GPU request is GPUS_PER_NODE (or GPU_REQUEST), not a directive to edit.
  assert not any(d.startswith(("--gpus", "--gres")) for d in directives), directives
  assert "-m deploy.slurm_env" in text and "-m trainer.task" in text


def _fake_tools(tmp_path, srun_rc, scontrol_rc):
  """sbatch, srun and scontrol stand-ins that record their arguments (the script is under test;
  no Slurm here)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, rc in (("sbatch", 0), ("srun", srun_rc), ("scontrol", scontrol_rc)):
    tool = bin_dir / name
    tool.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\nexit {rc}\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
  return bin_dir


def run_sbatch(tmp_path, srun_rc, restarts="0", model_dir="gs://b/runs/slurm", scontrol_rc=0,
               in_job=True, **knobs):
  env = {"PATH": f"{_fake_tools(tmp_path, srun_rc, scontrol_rc)}:/usr/bin:/bin",
         "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_RESTART_COUNT": restarts,
         "SLURM_GPUS_ON_NODE": "1", **knobs}
  if in_job:
    env["SLURM_JOB_ID"] = "4242"
  if model_dir:
    env["MODEL_DIR"] = model_dir
  result = subprocess.run(["bash", str(SBATCH), "--epochs=2"], env=env, capture_output=True,
                          text=True, timeout=30)
  requeue = tmp_path / "scontrol.args"
  return result, requeue.read_text().split() if requeue.exists() else None


def recorded(tmp_path, tool):
  path = tmp_path / f"{tool}.args"
  return path.read_text().split("\n")[:-1] if path.exists() else None


def test_sbatch_launches_the_wrapper_then_the_trainer(tmp_path):
  result, requeued = run_sbatch(tmp_path, srun_rc=0)
  assert result.returncode == 0, result.stderr
  assert requeued is None
  args = (tmp_path / "srun.args").read_text().split("\n")
  wrapper, trainer = args[:args.index("--")], args[args.index("--") + 1:]
  assert wrapper[-3:-1] == ["-m", "deploy.slurm_env"]
  assert trainer[1:3] == ["-m", "trainer.task"]
  assert "--model_dir=gs://b/runs/slurm" in trainer
  # auto: multi_worker_mirrored from a TF_CONFIG of several workers, one worker's devices on
  # NODES=1 (the trainer refuses multi_worker_mirrored with a one-worker TF_CONFIG).
  assert "--strategy=auto" in trainer
  assert "--label" in wrapper, "each output line says which worker wrote it"
  # The trainer's own cap counts every start, Slurm's node-failure requeues included.
  assert trainer.index("--max_job_restarts=3") < trainer.index("--epochs=2")


@pytest.mark.parametrize("srun_rc, restarts, requeue", [
    (143, "0", True),    # preempted or lost a peer: run again from the checkpoint
    (143, "3", False),   # MAX_REQUEUES reached
    # A worker killed by SIGKILL (kill -9, an OOM kill): srun returns 128 + 9 even when its
    # peer exited 143 (tests/slurm_cluster_test.py sees it on a real cluster).
    (137, "0", True),
    (137, "2", True),
    (137, "3", False),
    (2, "0", False),     # bad flags: permanent
    (5, "0", False),     # diverged: permanent
    (1, "0", False),     # a bug, or an OOM kill that Slurm's task/cgroup reports: permanent
    (134, "0", False),   # SIGABRT: not a retry signal
])
def test_sbatch_requeues_only_retryable_exits(tmp_path, srun_rc, restarts, requeue):
  result, requeued = run_sbatch(tmp_path, srun_rc=srun_rc, restarts=restarts)
  assert result.returncode == srun_rc
  assert requeued == (["requeue", "4242"] if requeue else None)
  if srun_rc in (137, 143) and not requeue:
    assert "not requeued: 3 of MAX_REQUEUES=3 requeues used" in result.stderr


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


# ---- Submitting: the GPU request is a variable ----

@pytest.mark.parametrize("knobs, request_args", [
    ({}, ["--gpus-per-node=1"]),
    ({"NODES": "3", "GPUS_PER_NODE": "4"}, ["--nodes=3", "--gpus-per-node=4"]),
    ({"GPUS_PER_NODE": "0"}, []),
    ({"GPU_REQUEST": "--gres=gpu:a100:4", "GPUS_PER_NODE": "4"}, ["--gres=gpu:a100:4"]),
])
def test_run_directly_the_script_submits_itself_with_the_gpu_request(tmp_path, knobs,
                                                                      request_args):
  result, _ = run_sbatch(tmp_path, srun_rc=0, in_job=False, **knobs)
  assert result.returncode == 0, result.stderr
  assert recorded(tmp_path, "sbatch") == [*request_args, str(SBATCH), "--epochs=2"]
  assert recorded(tmp_path, "srun") is None, "submitting must not start trainers"


@pytest.mark.parametrize("knobs, message", [
    ({"GPUS_PER_NODE": "four"}, "GPUS_PER_NODE=four"),
    ({"NODES": "0"}, "NODES=0"),
    ({"APPTAINER_IMAGE": "a.sif", "PYXIS_IMAGE": "nvcr.io#x"}, "not both"),
])
def test_bad_knobs_fail_before_submitting(tmp_path, knobs, message):
  result, _ = run_sbatch(tmp_path, srun_rc=0, in_job=False, **knobs)
  assert result.returncode == 2
  assert message in result.stderr
  assert recorded(tmp_path, "sbatch") is None


def test_a_job_without_gpus_is_warned_about(tmp_path):
  result, _ = run_sbatch(tmp_path, srun_rc=0, SLURM_GPUS_ON_NODE="0")
  assert result.returncode == 0
  assert "warning: the job has no GPUs" in result.stderr
  (tmp_path / "cpu").mkdir()
  result, _ = run_sbatch(tmp_path / "cpu", srun_rc=0, SLURM_GPUS_ON_NODE="0", GPUS_PER_NODE="0")
  assert "warning" not in result.stderr


# ---- Container variants ----

def test_apptainer_runs_the_trainer_in_the_image(tmp_path):
  result, _ = run_sbatch(tmp_path, srun_rc=0, APPTAINER_IMAGE="/images/mnist.sif")
  assert result.returncode == 0, result.stderr
  args = recorded(tmp_path, "srun")
  wrapper, trainer = args[:args.index("--")], args[args.index("--") + 1:]
  assert wrapper[-3:-1] == ["-m", "deploy.slurm_env"], "TF_CONFIG is built on the host"
  assert trainer[:7] == ["apptainer", "exec", "--nv", "/images/mnist.sif", "python", "-m",
                         "trainer.task"]
  assert "--model_dir=gs://b/runs/slurm" in trainer


def test_pyxis_runs_the_whole_task_in_the_image(tmp_path):
  model_dir = tmp_path / "shared" / "run"
  result, _ = run_sbatch(tmp_path, srun_rc=0, PYXIS_IMAGE="nvcr.io#me/mnist:1",
                         model_dir=str(model_dir))
  assert result.returncode == 0, result.stderr
  args = recorded(tmp_path, "srun")
  step_args = args[:args.index("-m")]
  assert "--container-image=nvcr.io#me/mnist:1" in step_args
  assert f"--container-mounts={ROOT}:{ROOT}:ro,{model_dir}:{model_dir}" in step_args
  assert f"--container-workdir={ROOT}" in step_args
  assert "--no-container-entrypoint" in step_args, "the image's ENTRYPOINT is the trainer"
  assert model_dir.is_dir(), "pyxis can only mount a directory that exists"

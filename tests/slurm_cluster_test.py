"""deploy/slurm/train.sbatch on a real Slurm cluster (tests/slurm/harness.py: Debian's Slurm
22.05, nodes node9, node10, node99 and node100, each a network namespace with its own host
name). Jobs are submitted from the login node as README tells a user, with `sbatch` and by
running the script directly, and trained on CPUs with tiny flags."""

import contextlib
import json
import os
import re
import signal
import sys
import time

import pytest

from conftest import ROOT, child_env, tiny_flags
from deploy import slurm_env
from slurm import harness

pytestmark = pytest.mark.slow

# As README writes it: run from the repository root, which becomes the job's submit directory.
SCRIPT = "deploy/slurm/train.sbatch"
TRAIN_STEPS = 300
WAIT_S = 180


@pytest.fixture(scope="session")
def cluster():
  """One cluster for every test process of the session; the last one out stops it."""
  reason = harness.unavailable()
  if reason:
    if os.environ.get("CI") and os.geteuid() == 0:
      pytest.fail(f"CI runs as root, where the Slurm cluster must start, but: {reason}")
    pytest.skip(f"no Slurm cluster on this machine: {reason}")
  with harness.shared() as shared_cluster:
    yield shared_cluster


class Job:
  """A test's submissions: the environment a user would have, and what Slurm says of them."""

  def __init__(self, cluster, tmp_path, data_dir, **knobs):
    self.cluster = cluster
    self.model_dir = tmp_path / "run"
    self.out_dir = tmp_path
    self.data_dir = data_dir
    self.ids = []
    self.env = cluster.env(
        child_env(), MODEL_DIR=self.model_dir, PYTHON=sys.executable, GPUS_PER_NODE="0",
        # The job's output next to the test's files instead of slurm-%x-%j.out in the checkout.
        SBATCH_OUTPUT=tmp_path / "slurm-%j.out", TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="-1", **knobs)

  def flags(self, **overrides):
    # The synthetic data set's test split has 300 examples. A killed peer is noticed at once
    # (its connection fails), so the watchdog's bound can be generous for a loaded machine.
    values = dict(train_steps=TRAIN_STEPS, checkpoint_every_steps=10, log_every_steps=10,
                  collective_timeout_s=60, eval_examples=300)
    values.update(overrides)
    return [f for f in tiny_flags(str(self.model_dir), self.data_dir, **values)
            if not f.startswith("--model_dir=")]  # the script passes MODEL_DIR itself

  def submit(self, *argv) -> int:
    result = self.cluster.run(argv, env=self.env, cwd=ROOT, timeout=60)
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert result.returncode == 0 and match, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"
    self.ids.append(int(match.group(1)))
    return self.ids[-1]

  def info(self, job_id: int) -> dict:
    return self.cluster.job(job_id)

  def output(self, job_id: int) -> str:
    path = self.out_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""

  def wait(self, job_id: int, ready, what: str, timeout: float = WAIT_S):
    """Polls until ready(info) holds; fails with the job, its output and slurmctld's log."""
    deadline = time.monotonic() + timeout
    while True:
      try:
        info = self.info(job_id)
      except harness.ClusterError as e:  # slurmctld busy for a moment: ask again
        info = {"JobState": "UNKNOWN", "Restarts": "", "error": str(e)}
      if "error" not in info and ready(info):
        return info
      if time.monotonic() > deadline:
        pytest.fail(f"job {job_id}: no {what} within {timeout:.0f}s: {info}\n--- output:\n"
                    f"{self.output(job_id)[-6000:]}\n--- slurmctld:\n{self.cluster.log_tail()}")
      time.sleep(0.5)

  def wait_done(self, job_id: int, state: str = "COMPLETED", timeout: float = WAIT_S) -> dict:
    info = self.wait(job_id, lambda i: i["JobState"] not in ("PENDING", "RUNNING", "REQUEUED",
                                                            "CONFIGURING", "COMPLETING"),
                     "end", timeout)
    assert info["JobState"] == state, f"{info}\n{self.output(job_id)[-6000:]}"
    return info

  def checkpoint(self) -> int:
    steps = [int(m.group(1)) for name in os.listdir(self.model_dir / "checkpoints")
             for m in [re.match(r"ckpt-(\d+)\.index$", name)] if m] if (
                 self.model_dir / "checkpoints").is_dir() else []
    return max(steps, default=0)

  def wait_checkpoint(self, job_id: int, above: int, timeout: float = WAIT_S) -> int:
    self.wait(job_id, lambda i: i["JobState"] == "RUNNING" and self.checkpoint() > above,
              f"checkpoint after step {above}", timeout)
    return self.checkpoint()

  def trainers(self) -> dict:
    """{pid: node} of this test's trainer processes: the wrapper, which execs the trainer. (srun
    on the first node has the same arguments after its own.)"""
    return self.cluster.processes(
        rf"^{re.escape(sys.executable)} -m (deploy\.slurm_env|trainer\.task) .*"
        rf"--model_dir={re.escape(str(self.model_dir))}( |$)")

  def wait_trainers(self, job_id: int, count: int) -> dict:
    self.wait(job_id, lambda i: len(set(self.trainers().values())) == count,
              f"{count} trainer processes")
    return self.trainers()

  def cleanup(self):
    for job_id in self.ids:
      self.cluster.run(["scancel", str(job_id)], timeout=30)
    for pid in self.trainers():  # frozen by a test that failed half-way
      with contextlib.suppress(ProcessLookupError):  # exited meanwhile
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while self.trainers() and time.monotonic() < deadline:
      time.sleep(0.5)


@pytest.fixture
def job(cluster, tmp_path, synthetic_tfds_dir):
  def make(**knobs):
    made = Job(cluster, tmp_path, synthetic_tfds_dir, **knobs)
    jobs.append(made)
    return made

  jobs = []
  yield make
  for made in jobs:
    made.cleanup()


def finals(output: str) -> dict:
  """{task rank: (step, weights sha256)} from each worker's last 'Final step' line."""
  return {int(rank): (int(step), sha) for rank, step, sha in re.findall(
      r"^(\d+): .*Final step (\d+) weights_sha256 (\w+)", output, re.M)}


def starts(output: str) -> list:
  """The step each start of worker 0 trained from, in order."""
  return [int(step) for step in re.findall(r"^0: .*Training steps (\d+) -> \d+", output, re.M)]


def tf_configs(output: str) -> dict:
  return {int(rank): json.loads(config) for rank, config in re.findall(
      r"^(\d+): deploy\.slurm_env: TF_CONFIG=(.*)$", output, re.M)}


def assert_trained_to_the_end(job: Job, output: str, workers: int = 2) -> dict:
  got = finals(output)
  assert sorted(got) == list(range(workers)), output[-6000:]
  assert {step for step, _ in got.values()} == {TRAIN_STEPS}, got
  assert len({sha for _, sha in got.values()}) == 1, f"the workers' weights differ: {got}"
  metrics = json.loads((job.model_dir / "metrics.json").read_text())
  assert metrics["global_step"] == TRAIN_STEPS
  assert metrics["num_workers"] == workers
  assert {sha for _, sha in finals(output).values()} == {metrics["weights_sha256"]}, (
      "every worker ends with the chief's weights")
  assert (job.model_dir / "export" / "saved_model.pb").exists()
  return metrics


# ---- Two nodes: requeues, kills, cancels, time limits ----

def test_sbatch_two_workers_survive_scontrol_requeue_and_a_kill_9(job):
  """`sbatch deploy/slurm/train.sbatch ...`: Slurm's own requeue, then one worker killed by
  SIGKILL (an OOM kill looks the same); both runs resume from the checkpoint and the job ends
  with equal weights on both workers."""
  j = job()
  job_id = j.submit("sbatch", SCRIPT, *j.flags())
  first = j.wait_checkpoint(job_id, above=0)
  j.cluster.run(["scontrol", "requeue", str(job_id)], check=True)
  j.wait(job_id, lambda i: i["Restarts"] == "1" and len(starts(j.output(job_id))) == 2,
         "second start after scontrol requeue")
  j.wait_checkpoint(job_id, above=max(first, starts(j.output(job_id))[1]))
  # A requeued job may land on other nodes: these are the second run's.
  node0, node1 = slurm_env.expand_hostlist(j.info(job_id)["NodeList"])
  victims = [pid for pid, node in j.trainers().items() if node == node1]
  assert len(victims) == 1, j.trainers()
  os.kill(victims[0], signal.SIGKILL)
  info = j.wait_done(job_id)
  out = j.output(job_id)
  assert info["ExitCode"] == "0:0" and info["Restarts"] == "2", info
  # The second run: worker 1 killed, the survivor exited 143 (lost its peer), srun returned 137,
  # and the script requeued the job.
  second = out[[m.start() for m in re.finditer(r"^0: .*Training steps", out, re.M)][1]:
               out.index("train.sbatch: exit 137 (retryable), requeue 2/3")]
  assert f"srun: error: {node1}: task 1: Killed" in second, second[-6000:]
  assert f"srun: error: {node0}: task 0: Exited with exit code 143" in second, second[-6000:]
  steps = starts(out)
  assert len(steps) == 3 and steps[0] == 0 and 0 < steps[1] <= steps[2], steps
  hosts = slurm_env.expand_hostlist(info["NodeList"])
  for rank, config in tf_configs(out).items():  # the last run's
    # Slurm's node order (node9 before node10, node99 before node100), not the string order.
    assert config == {"cluster": {"worker": [f"{h}:8888" for h in hosts]},
                      "task": {"type": "worker", "index": rank}}
  metrics = assert_trained_to_the_end(j, out)
  assert metrics["strategy"] == "multi_worker_mirrored"


def test_run_directly_scancel_then_resubmit_resumes(job):
  """`NODES=2 deploy/slurm/train.sbatch ...` submits itself; scancel ends it for good (no
  requeue), and the same command again resumes from its last checkpoint."""
  j = job(NODES="2")
  job_id = j.submit(SCRIPT, *j.flags())
  j.wait_checkpoint(job_id, above=0)
  j.cluster.run(["scancel", str(job_id)], check=True)
  info = j.wait_done(job_id, state="CANCELLED")
  assert info["Restarts"] == "0"
  j.wait(job_id, lambda i: not j.trainers(), "trainers to exit")
  saved = j.checkpoint()
  assert "requeue" not in j.output(job_id)
  again = j.submit(SCRIPT, *j.flags())
  info = j.wait_done(again)
  out = j.output(again)
  assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
  assert starts(out) == [saved], out[-6000:]
  assert_trained_to_the_end(j, out)


def test_a_real_time_limit_requeues_until_done(job):
  """--time=1 with --signal=TERM@5 (sbatch's own SBATCH_TIMELIMIT and SBATCH_SIGNAL): Slurm
  sends SIGTERM before the limit, the trainers checkpoint and exit 143, the script requeues,
  and the job runs again until it is done. The first run is frozen (SIGSTOP) after its first
  checkpoint so it cannot finish within the limit; Slurm's warning sends SIGCONT first."""
  j = job(SBATCH_TIMELIMIT="1", SBATCH_SIGNAL="TERM@5", MAX_REQUEUES="4")
  # Frozen for up to a minute: the trainers' watchdog must not call that a stuck peer.
  job_id = j.submit("sbatch", SCRIPT, *j.flags(collective_timeout_s=120))
  j.wait_checkpoint(job_id, above=0)
  frozen = j.trainers()
  assert len(set(frozen.values())) == 2, frozen
  for pid in frozen:
    os.kill(pid, signal.SIGSTOP)
  # Slurm's check runs every 30 s; the warning comes at the first with now >= end - 5 - 30.
  j.wait(job_id, lambda i: i["Restarts"] != "0", "requeue after the time-limit signal", 120)
  info = j.wait_done(job_id, timeout=240)
  out = j.output(job_id)
  assert info["TimeLimit"] == "00:01:00" and info["ExitCode"] == "0:0", info
  assert "train.sbatch: exit 143 (retryable), requeue 1/4" in out, out[-6000:]
  for rank in (0, 1):
    assert re.search(rf"^{rank}: .*SIGTERM received", out, re.M), out[-6000:]
  assert len(starts(out)) == int(info["Restarts"]) + 1 and starts(out)[1] > 0
  assert_trained_to_the_end(j, out)


def test_the_requeue_cap_ends_the_job(job):
  """MAX_REQUEUES=1: the first kill is requeued, the second ends the job with srun's 137."""
  j = job(NODES="2", MAX_REQUEUES="1")
  job_id = j.submit(SCRIPT, *j.flags())
  for restarts in ("0", "1"):
    j.wait(job_id, lambda i, r=restarts: i["Restarts"] == r and i["JobState"] == "RUNNING",
           f"run with Restarts={restarts}")
    for pid in j.wait_trainers(job_id, count=2):
      with contextlib.suppress(ProcessLookupError):  # exited meanwhile
        os.kill(pid, signal.SIGKILL)
  info = j.wait_done(job_id, state="FAILED")
  out = j.output(job_id)
  assert info["ExitCode"] == "137:0" and info["Restarts"] == "1", info
  assert "train.sbatch: exit 137 (retryable), requeue 1/1" in out, out[-6000:]
  assert ("train.sbatch: exit 137 (retryable), not requeued: 1 of MAX_REQUEUES=1 requeues "
          "used") in out


# ---- One node, and what is refused ----

def test_one_node_trains_as_a_single_worker(job):
  """NODES=1: a one-worker TF_CONFIG, and --strategy=auto trains on that node's cores."""
  j = job(NODES="1")
  job_id = j.submit(SCRIPT, *j.flags(checkpoint_every_steps=100))
  info = j.wait_done(job_id)
  out = j.output(job_id)
  assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
  assert tf_configs(out) == {0: {"cluster": {"worker": [f"{info['NodeList']}:8888"]},
                                 "task": {"type": "worker", "index": 0}}}
  metrics = assert_trained_to_the_end(j, out, workers=1)
  assert metrics["strategy"] in ("mirrored", "one_device")


def test_a_heterogeneous_step_is_refused_before_the_trainer_starts(job, tmp_path):
  """`sbatch -N1 : -N1` with `srun --het-group=0,1`: both tasks exit 2 naming the fix."""
  j = job()
  script = tmp_path / "het.sbatch"
  script.write_text("#!/bin/bash\n"
                    f'srun --label --het-group=0,1 "$PYTHON" -m deploy.slurm_env -- '
                    f'"$PYTHON" -c "print(\'trainer ran\')"\n')
  job_id = j.submit("sbatch", "--nodes=1", ":", "--nodes=1", str(script))
  info = j.wait_done(job_id, state="FAILED", timeout=120)
  out = j.output(job_id)
  assert info["ExitCode"] == "2:0", info
  assert len(re.findall(r"^[01]: deploy\.slurm_env: error: This is a heterogeneous Slurm job "
                        r"\(SLURM_HET_SIZE=2\), and heterogeneous jobs are not supported", out,
                        re.M)) == 2, out
  assert "trainer ran" not in out

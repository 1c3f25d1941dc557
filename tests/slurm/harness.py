"""A real Slurm cluster on this one machine, for the tests: four nodes and a controller.

  python tests/slurm/harness.py start     # installs slurm-wlm and munge with apt if needed
  python tests/slurm/harness.py run -- sbatch --wrap=hostname   # a command on the login node
  python tests/slurm/harness.py status
  python tests/slurm/harness.py stop      # stops what start started, removes the namespaces

Layout. Every host is a network namespace this module creates (names starting NETNS_PREFIX),
with its own host name (a UTS namespace) and its own /etc/hosts (a private mount namespace
with BASE/state/hosts bind-mounted over it):
  slurmctl   SUBNET.1    slurmctld, a bridge to the nodes; tests run sbatch & co. here
  node9      SUBNET.9    slurmd -N node9        (node9/node10 sort differently as strings
  node10     SUBNET.10   slurmd -N node10        and as numbers: Slurm's order is numeric)
  node99     SUBNET.99   slurmd -N node99
  node100    SUBNET.100  slurmd -N node100
Four nodes, so that two test processes can each run a two-node job at once (train.sbatch asks
for whole nodes). The addresses exist only inside those namespaces: nothing is added to this machine's own
network, and nothing routes out. One munged (own key, own socket, in the controller's namespace)
serves all of them through the file system. Every file lives under BASE.

Facts this relies on, seen on this machine kind and read in Slurm 22.05's source:
- slurmd runs under `nsenter --net=/run/netns/NAME`, not `ip netns exec`, which mounts a new
  /sys whose /sys/fs/cgroup is empty, and slurmd then finds no cgroup file system.
- ProctrackType=proctrack/linuxproc and TaskPlugin=task/none need no cgroup of their own; no
  accounting daemon; SlurmdParameters=config_overrides lets a node claim more CPUs than the
  machine has (train.sbatch asks for 8 per task).
- AuthInfo=socket=... points Slurm's munge plugins at our munged (src/common/
  slurm_protocol_api.c, slurm_auth_opts_to_socket); cred_expire=5, the smallest value
  src/common/slurm_cred.c accepts, makes a requeued job eligible again after 6 s instead of
  121 (src/slurmctld/job_mgr.c, _job_requeue_op: begin_time = now + cred lifetime + 1).
- SchedulerParameters=sched_interval=2,bf_interval=2: the scheduler's full pass and the
  backfill pass, which start a requeued job once its begin time passes, run every 2 s instead
  of 60 and 30 (src/slurmctld/controller.c, _slurmctld_background; src/plugins/sched/backfill/
  backfill.c). Backfill, not sched/builtin, because slurmctld refuses heterogeneous jobs
  without it.
- The time-limit check, and with it `--signal=SIG@N`, runs every 30 s (PERIODIC_TIMEOUT in
  src/slurmctld/slurmctld.h); the warning goes out at the first check with
  now >= end - N - 30 (src/slurmctld/job_mgr.c, send_job_warn_signal).

Bounded and idempotent: start() on a running, healthy cluster returns at once; on leftovers of
a crashed run it stops them first. Every wait has a timeout. stop() ends only processes this
module started (their PIDs are recorded, and checked against their command line) and the
processes living in its own namespaces, one PID at a time, then deletes the namespaces.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

BASE = pathlib.Path(os.environ.get("MNIST_SLURM_BASE", "/tmp/mnist-slurm"))
NETNS_PREFIX = "mnist-slurm-"
# A private /24 that exists only inside the namespaces below.
SUBNET = "10.99.32"
CONTROLLER = "slurmctl"
NODES = ("node9", "node10", "node99", "node100")
# Every node says it has this many CPUs (train.sbatch asks for --cpus-per-task=8).
NODE_CPUS = 8
PACKAGES = ("slurm-wlm", "munge")
START_TIMEOUT_S = 90


class ClusterError(RuntimeError):
  """The cluster should have started (or answered) here and did not."""


def unavailable() -> Optional[str]:
  """Why the cluster cannot run on this machine, or None when it can. Changes nothing but a probe
  network namespace, deleted at once."""
  if not sys.platform.startswith("linux"):
    return f"needs Linux network namespaces; this is {sys.platform}"
  if os.geteuid() != 0:
    return "needs root (network namespaces, munged, slurmd); run the tests as root, as CI does"
  for tool in ("ip", "nsenter", "unshare", "mount", "hostname"):
    if not shutil.which(tool):
      return f"{tool} is not installed"
  if not _installed() and not shutil.which("apt-get"):
    return "Slurm is not installed and there is no apt-get to install slurm-wlm and munge"
  probe = f"{NETNS_PREFIX}probe{os.getpid()}"  # processes may ask at the same time
  _quiet(["ip", "netns", "del", probe])
  result = _quiet(["ip", "netns", "add", probe])
  if result.returncode:
    return f"cannot create a network namespace: {result.stderr.strip()}"
  _quiet(["ip", "netns", "del", probe])
  return None


def _quiet(argv: Sequence[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)


def _installed() -> bool:
  return all(shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
             for tool in ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "munged"))


def install() -> None:
  """apt-get install slurm-wlm munge (Debian bookworm: Slurm 22.05), once."""
  if _installed():
    return
  env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
  steps = ([*apt, "update"],
           [*apt, "install", "-y", "--no-install-recommends", *PACKAGES])
  for argv in steps:
    result = _quiet(argv, timeout=900, env=env)
    if result.returncode:
      raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                         f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
  if not _installed():
    raise ClusterError(f"apt-get installed {' '.join(PACKAGES)} but slurmctld, slurmd or munged "
                       "is still missing")


def address(host: str) -> str:
  """The host's address, inside the namespaces only."""
  return f"{SUBNET}.{1 if host == CONTROLLER else int(re.sub(r'[^0-9]', '', host))}"


def netns(host: str) -> str:
  return f"{NETNS_PREFIX}{host}"


class Cluster:
  """The cluster under BASE/state; every method is safe to call in any state."""

  def __init__(self, base: pathlib.Path = BASE):
    self.base = pathlib.Path(base)
    self.state = self.base / "state"
    self.conf = self.state / "slurm.conf"
    self.hosts = self.state / "hosts"
    self.pids_file = self.state / "pids.json"

  # ---- Commands on the login node ----

  def env(self, base: Optional[Dict[str, str]] = None, **extra) -> Dict[str, str]:
    """An environment for Slurm commands: base (default os.environ) without any Slurm variable
    of an enclosing job, with SLURM_CONF pointing at this cluster, plus extra."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(self.conf)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    env.update({k: str(v) for k, v in extra.items()})
    return env

  def run(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 60,
          cwd=None, check: bool = False) -> subprocess.CompletedProcess:
    """Runs argv on the login node (the controller's network namespace), as a user would on a
    cluster's login node. env defaults to self.env()."""
    result = _quiet(["nsenter", f"--net=/run/netns/{netns(CONTROLLER)}", "--", *argv],
                    timeout=timeout, env=env or self.env(), cwd=cwd)
    if check and result.returncode:
      raise ClusterError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}"
                         f"{result.stderr}")
    return result

  def job(self, job_id: int) -> Dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, NodeList, ...); of a
    heterogeneous job, its first component."""
    result = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
    if result.returncode or not result.stdout.strip():
      raise ClusterError(f"scontrol show job {job_id}: {result.stderr.strip()}")
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout.splitlines()[0]))

  def log_tail(self, chars: int = 3000) -> str:
    """The end of slurmctld's log, for failure messages."""
    path = self.state / "slurmctld.log"
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no slurmctld log)"

  # ---- Start and stop ----

  def healthy(self) -> bool:
    """slurmctld answers and every node is up (idle, allocated or mixed)."""
    if not self.conf.exists() or not self._recorded_alive():
      return False
    try:
      result = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=15)
    except subprocess.TimeoutExpired:
      return False
    states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
    return (result.returncode == 0 and set(states) == set(NODES) and
            all(state.rstrip("*") in ("idle", "alloc", "mix", "comp") for state in states.values()))

  def start(self) -> "Cluster":
    """Starts the cluster unless it is already running and healthy; leftovers are stopped, and
    so is a start that fails half-way."""
    if self.healthy():
      return self
    self.stop()
    install()
    try:
      self._start()
    except BaseException:
      self._save_logs()
      self.stop()
      raise
    return self

  def _start(self) -> None:
    self.state.mkdir(parents=True, exist_ok=True)
    # munged wants every directory above its socket searchable by all (and none writable).
    for directory in (self.base, self.state):
      os.chmod(directory, 0o711)
    self._write_config()
    self._network_up()
    pids = {}
    munge_dir = self.state / "munge"
    # In the controller's namespace too, so that stop() finds it even without pids.json; its
    # socket is a file, which every namespace reaches.
    pids["munged"] = self._spawn(CONTROLLER, [
        "munged", "--foreground", f"--socket={munge_dir / 'munge.socket'}",
        f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
        f"--seed-file={munge_dir / 'munged.seed'}", f"--log-file={munge_dir / 'munged.log'}"],
        munge_dir / "munged.out")
    self._record(pids)
    self._wait(lambda: (munge_dir / "munge.socket").exists(), 20, "munged's socket", pids)
    pids["slurmctld"] = self._spawn(CONTROLLER, ["slurmctld", "-D", "-c", "-f", str(self.conf)],
                                    self.state / "slurmctld.out")
    self._record(pids)
    for node in NODES:
      (self.state / node).mkdir(exist_ok=True)
      pids[f"slurmd:{node}"] = self._spawn(node, ["slurmd", "-D", "-N", node, "-f",
                                                  str(self.conf)], self.state / node / "slurmd.out")
      self._record(pids)
    self._wait(self.healthy, START_TIMEOUT_S, "slurmctld and the four slurmd to come up", pids)

  def _save_logs(self) -> None:
    """Keeps the daemons' logs of a failed start in BASE/failed-start (stop() removes state)."""
    kept = self.base / "failed-start"
    shutil.rmtree(kept, ignore_errors=True)
    for path in list(self.state.rglob("*.log")) + list(self.state.rglob("*.out")):
      target = kept / path.relative_to(self.state)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(path, target)

  def stop(self) -> None:
    """Cancels every job, stops the daemons and whatever runs in the namespaces, by PID, then
    deletes the namespaces and the state directory. Safe on a stopped or half-started cluster."""
    pids = self._read_pids()
    if self.conf.exists() and pids.get("slurmctld") and _alive(pids["slurmctld"], "slurmctld"):
      with contextlib.suppress(subprocess.TimeoutExpired):
        self.run(["scancel", "--full", "--user=root"], timeout=15)
    # The daemons (munged last), then whatever still runs in the namespaces: jobs' processes,
    # slurmstepd, slurmctld's slurmscriptd.
    for name in sorted(pids, key=lambda n: n == "munged"):
      _terminate(pids[name], name.split(":")[0], grace_s=10)
    self._kill_namespaced(signal.SIGTERM, grace_s=5)
    self._kill_namespaced(signal.SIGKILL, grace_s=5)
    for host in (CONTROLLER, *NODES):
      if (pathlib.Path("/run/netns") / netns(host)).exists():
        result = _quiet(["ip", "netns", "del", netns(host)])
        if result.returncode:
          raise ClusterError(f"ip netns del {netns(host)}: {result.stderr.strip()}")
    if self.state.exists():
      shutil.rmtree(self.state)

  def status(self) -> str:
    pids = self._read_pids()
    lines = [f"{name}: pid {pid} {'running' if _alive(pid, name.split(':')[0]) else 'gone'}"
             for name, pid in pids.items()]
    if self.healthy():
      lines.append(self.run(["sinfo"], timeout=15).stdout)
    else:
      lines.append("not running (or not healthy)")
    return "\n".join(lines)

  # ---- Processes ----

  def processes(self, pattern: str) -> Dict[int, str]:
    """{pid: host} of the processes in the node namespaces whose command line matches pattern
    (a regular expression over the arguments joined by spaces)."""
    inodes = self._namespace_inodes()
    found = {}
    for pid, inode in _net_namespaces().items():
      if inode in inodes and inodes[inode] in NODES:
        cmdline = _cmdline(pid)
        if cmdline and re.search(pattern, cmdline):
          found[pid] = inodes[inode]
    return found

  def _namespace_inodes(self) -> Dict[int, str]:
    inodes = {}
    for host in (CONTROLLER, *NODES):
      with contextlib.suppress(OSError):
        inodes[os.stat(f"/run/netns/{netns(host)}").st_ino] = host
    return inodes

  def _kill_namespaced(self, sig: int, grace_s: float) -> None:
    """Signals every process inside this module's namespaces (by PID) and waits for them."""
    inodes = self._namespace_inodes()
    targets = [pid for pid, inode in _net_namespaces().items()
               if inode in inodes and _alive(pid)]
    for pid in targets:
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in targets):
      time.sleep(0.2)

  def _spawn(self, host: str, argv: List[str], log: pathlib.Path) -> int:
    """Starts argv on host in its own session; returns its PID.

    nsenter joins the host's network namespace, unshare gives the process its own host name and
    mount namespace, where the shared hosts file covers /etc/hosts. Each of them execs the next,
    so the PID is the daemon's own."""
    argv = ["nsenter", f"--net=/run/netns/{netns(host)}", "--", "unshare", "--uts", "--mount",
            "--propagation", "private", "--", "/bin/sh", "-c",
            'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"', "sh",
            host, str(self.hosts), *argv]
    with open(log, "ab") as out:
      proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True, env=self.env())
    return proc.pid

  def _record(self, pids: Dict[str, int]) -> None:
    self.pids_file.write_text(json.dumps(pids, indent=1))

  def _read_pids(self) -> Dict[str, int]:
    try:
      return json.loads(self.pids_file.read_text())
    except (OSError, ValueError):
      return {}

  def _recorded_alive(self) -> bool:
    pids = self._read_pids()
    names = {"munged", "slurmctld", *(f"slurmd:{node}" for node in NODES)}
    return set(pids) == names and all(_alive(pid, name.split(":")[0])
                                      for name, pid in pids.items())

  def _wait(self, ready, timeout: float, what: str, pids: Dict[str, int]) -> None:
    """Waits for ready(); fails at the timeout, or at once when a daemon in pids has died."""
    deadline = time.monotonic() + timeout
    while not ready():
      # Our own children: unreaped, their PIDs cannot be reused, and one may not have exec'd
      # its program yet, so only their existence is checked.
      dead = [name for name, pid in pids.items() if not _alive(pid)]
      if dead or time.monotonic() > deadline:
        what = f"{what}: {', '.join(dead)} exited" if dead else f"{what}: timed out"
        logs = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.state.rglob("*.out")) + sorted(
                             self.state.rglob("*.log")) if p.is_file())
        raise ClusterError(f"waiting {timeout:.0f}s at most for {what}\n{logs}")
      time.sleep(0.5)

  # ---- Configuration ----

  def _network_up(self) -> None:
    """The controller's namespace holds a bridge; each node's namespace one end of a veth pair,
    the other end on that bridge. Loopback is up everywhere (TensorFlow binds localhost too)."""
    ctl = netns(CONTROLLER)
    commands = [["ip", "netns", "add", ctl],
                ["ip", "-n", ctl, "link", "set", "lo", "up"],
                ["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"],
                ["ip", "-n", ctl, "addr", "add", f"{address(CONTROLLER)}/24", "dev", "br0"],
                ["ip", "-n", ctl, "link", "set", "br0", "up"]]
    for node in NODES:
      ns, port = netns(node), f"v{node}"
      commands += [["ip", "netns", "add", ns],
                   ["ip", "-n", ns, "link", "set", "lo", "up"],
                   ["ip", "link", "add", port, "netns", ctl, "type", "veth", "peer", "name",
                    "eth0", "netns", ns],
                   ["ip", "-n", ctl, "link", "set", port, "master", "br0"],
                   ["ip", "-n", ctl, "link", "set", port, "up"],
                   ["ip", "-n", ns, "addr", "add", f"{address(node)}/24", "dev", "eth0"],
                   ["ip", "-n", ns, "link", "set", "eth0", "up"]]
    for argv in commands:
      result = _quiet(argv)
      if result.returncode:
        raise ClusterError(f"{' '.join(argv)}: {result.stderr.strip()}")

  def _write_config(self) -> None:
    hosts = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    hosts += [f"{address(host)} {host}" for host in (CONTROLLER, *NODES)]
    self.hosts.write_text("\n".join(hosts) + "\n")
    munge_dir = self.state / "munge"
    munge_dir.mkdir(exist_ok=True)
    os.chmod(munge_dir, 0o711)
    key = munge_dir / "munge.key"
    if not key.exists():
      key.write_bytes(os.urandom(1024))
      os.chmod(key, 0o400)
    (self.state / "ctld").mkdir(exist_ok=True)
    s = self.state
    nodes = [f"NodeName={node} NodeAddr={address(node)} CPUs={NODE_CPUS} State=UNKNOWN"
             for node in NODES]
    self.conf.write_text("\n".join([
        "# Written by tests/slurm/harness.py; removed by its stop().",
        "ClusterName=mnisttest",
        f"SlurmctldHost={CONTROLLER}({address(CONTROLLER)})",
        "SlurmUser=root",
        "SlurmdUser=root",
        "SlurmctldPort=6817",
        "SlurmdPort=6818",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_dir / 'munge.socket'},cred_expire=5",
        f"StateSaveLocation={s / 'ctld'}",
        f"SlurmdSpoolDir={s}/%n/spool",
        f"SlurmctldPidFile={s / 'slurmctld.pid'}",
        f"SlurmdPidFile={s}/%n/slurmd.pid",
        f"SlurmctldLogFile={s / 'slurmctld.log'}",
        f"SlurmdLogFile={s}/%n/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={s / 'jobcomp.txt'}",
        # Heterogeneous jobs need backfill (src/slurmctld/proc_req.c,
        # _slurm_rpc_submit_batch_het_job); both passes run every 2 s instead of 60 and 30.
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "MinJobAge=600",
        "KillWait=30",
        "InactiveLimit=0",
        *nodes,
        f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ""]))


# ---- Process helpers (by PID, never by name) ----

def _cmdline(pid: int) -> str:
  try:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
        errors="replace").strip()
  except OSError:
    return ""


def _alive(pid: int, program: Optional[str] = None) -> bool:
  """pid runs (not a zombie) and, if given, is program (so a reused PID is never signalled)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return False
  if stat.rsplit(")", 1)[1].split()[0] == "Z":
    with contextlib.suppress(ChildProcessError, OSError):
      os.waitpid(pid, os.WNOHANG)
    return False
  if program is None:
    return True
  argv0 = _cmdline(pid).split(" ", 1)[0]
  # Before exec the PID runs nsenter/unshare/sh on the way to the daemon.
  return os.path.basename(argv0) in (program, "nsenter", "unshare", "sh")


def _terminate(pid: int, program: str, grace_s: float) -> None:
  if not _alive(pid, program):
    return
  with contextlib.suppress(ProcessLookupError):
    os.kill(pid, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and _alive(pid):
    time.sleep(0.2)
  if _alive(pid, program):
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
  with contextlib.suppress(ChildProcessError, OSError):
    os.waitpid(pid, os.WNOHANG)


def _net_namespaces() -> Dict[int, int]:
  """{pid: network namespace inode} of every process."""
  out = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      with contextlib.suppress(OSError):
        out[int(entry)] = os.stat(f"/proc/{entry}/ns/net").st_ino
  return out


# ---- Sharing one cluster between test processes ----

@contextlib.contextmanager
def shared(base: pathlib.Path = BASE) -> Iterator[Cluster]:
  """The cluster, started once for every process using it at the same time (pytest-xdist
  workers, two sessions); the last one to leave stops it.

  Each user holds a shared lock on users.lock while it uses the cluster; start and stop happen
  under an exclusive lock on start.lock, and stop only when no user holds users.lock."""
  base = pathlib.Path(base)
  base.mkdir(parents=True, exist_ok=True)
  with open(base / "users.lock", "a") as users, open(base / "start.lock", "a") as starting:
    fcntl.flock(users, fcntl.LOCK_SH)
    try:
      with _locked(starting):
        cluster = Cluster(base).start()
      yield cluster
    finally:
      fcntl.flock(users, fcntl.LOCK_UN)
      with _locked(starting):
        try:
          fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          pass  # someone else still uses it
        else:
          try:
            Cluster(base).stop()
          finally:
            fcntl.flock(users, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked(file, timeout: float = 900):
  deadline = time.monotonic() + timeout
  while True:
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      break
    except BlockingIOError:
      if time.monotonic() > deadline:
        raise ClusterError(f"{file.name} stayed locked for {timeout:.0f}s") from None
      time.sleep(0.5)
  try:
    yield
  finally:
    fcntl.flock(file, fcntl.LOCK_UN)


def main(argv: Sequence[str]) -> int:
  commands = ("start", "stop", "status", "run")
  if len(argv) < 2 or argv[1] not in commands:
    print(f"usage: {argv[0]} {{{'|'.join(commands)}}} [-- COMMAND...]", file=sys.stderr)
    return 2
  reason = unavailable()
  if reason:
    print(f"harness: the Slurm cluster cannot run here: {reason}", file=sys.stderr)
    return 2
  cluster = Cluster()
  if argv[1] == "start":
    cluster.start()
    print(cluster.status())
    print(f"export SLURM_CONF={cluster.conf}; commands run on the login node with: "
          f"nsenter --net=/run/netns/{netns(CONTROLLER)} -- sbatch ...")
  elif argv[1] == "stop":
    cluster.stop()
  elif argv[1] == "status":
    print(cluster.status())
  else:
    command = list(argv[2:])
    if command[:1] == ["--"]:
      command = command[1:]
    result = cluster.run(command, timeout=600, cwd=os.getcwd())
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))

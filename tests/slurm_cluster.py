"""A real, throw-away Slurm cluster on this host, for testing the sbatch scripts under slurm/.

One ``slurmctld`` and one ``slurmd`` per node (``slurmd -N nK``, each on its own port), all on
127.0.0.1, with their state, logs and ``slurm.conf`` under a temporary directory.  Clients
(``sbatch``, ``squeue``, ``scontrol``, ...) find the cluster through ``SLURM_CONF``, which
:meth:`SlurmCluster.env` sets; nothing under /etc/slurm is touched.

Needs root (slurmd runs jobs as the submitting user and must be able to switch users) and the
Debian packages installed by :func:`ensure_slurm`::

    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

Facts this relies on (Debian 12, Slurm 22.05, checked on a 2-core CPU box without systemd):
- munged must run as the ``munge`` user; the packages do not start any service on install.
  Each cluster runs its own munged (key, socket and pid file under its root directory, named
  in ``AuthInfo=socket=``), so concurrent test runs neither share nor stop one another's.
- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` work without cgroups.
- ``MinJobAge=5``: otherwise ``sbatch --wait`` polls for up to 32 s after a job ends.
- ``EnforcePartLimits=ALL``: otherwise an impossible request pends forever instead of being
  refused at submission.
- Several slurmd on one host: each has its own ``Port=`` on its node line; node names must
  resolve (the job's first node name becomes MASTER_ADDR), so they are added to /etc/hosts
  (and removed again) when they do not resolve already.
- A cancelled job still lets ``sbatch --wait`` exit 0: callers must check the job's output.
- A requeued job is held ~2 min (its begin time). Moving that to ``now`` can start it within
  the second of the requeue, when slurmd still sees its credential as revoked and the job
  FAILS ("Killing non-startable batch job: Job credential revoked"): use ``now+2``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
APT_COMMAND = (
    "apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends " + " ".join(APT_PACKAGES)
)
_HOSTS_MARK = "# homodistil-test-slurm"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the test should skip, saying why)."""


def _run(cmd: list[str], timeout: float = 60, check: bool = True, env: dict | None = None,
         **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ensure_slurm() -> None:
    """Install the Slurm and munge packages when missing; :class:`SlurmUnavailable` if impossible."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local Slurm cluster needs root (slurmd, munged, /etc/hosts)")
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(APT_COMMAND.split(), capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:  # stale package lists: update once and retry
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq"],
                       capture_output=True, text=True, env=env, timeout=900)
        proc = subprocess.run(APT_COMMAND.split(), capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not shutil.which("slurmctld"):
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
        raise SlurmUnavailable(f"cannot install Slurm with '{APT_COMMAND}': {tail[0]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works(socket_path: Path | None = None) -> bool:
    if not shutil.which("munge"):
        return False
    sock = ["--socket", str(socket_path)] if socket_path else []
    try:
        cred = subprocess.run(["munge", "-n", *sock], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        check = subprocess.run(["unmunge", *sock], input=cred.stdout, capture_output=True, timeout=10)
        return check.returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


class SlurmCluster:
    """``with SlurmCluster(nodes=2) as cluster: cluster.sbatch([...])``."""

    def __init__(self, nodes: int = 1, root: str | Path | None = None, name: str = "hdtest"):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.n_nodes = nodes
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.name = name
        self.node_names = [f"{name}n{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self._started_munged = False
        self._hosts_added = False
        self._procs: list[subprocess.Popen] = []

    # -- environment -------------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":
                del env[key]
        return env

    # -- start / stop ------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        ensure_slurm()
        try:
            self._start_munge()
            self._ensure_hosts()
            self._write_conf()
            self._start_daemons()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        """A private munged (own key, socket, pid file under root/munge) for this cluster only:
        test runs side by side never share or stop each other's munged."""
        mdir = self.root / "munge"
        mdir.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.munge_socket = mdir / "munge.socket"
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (mdir, key):
            shutil.chown(path, "munge", "munge")
        mdir.chmod(0o755)  # munged: "execute permissions for all required" on the socket dir
        key.chmod(0o400)
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.munge_socket}",
              f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
              f"--seed-file={mdir / 'munged.seed'}"], timeout=30)
        self._started_munged = True
        _wait_for(lambda: _munge_works(self.munge_socket), 15, "munged", mdir / "munged.log")

    def _ensure_hosts(self) -> None:
        missing = []
        for node in self.node_names:
            try:
                socket.gethostbyname(node)
            except OSError:
                missing.append(node)
        if missing:
            with open("/etc/hosts", "a") as fh:
                fh.write(f"127.0.0.1 {' '.join(missing)} {_HOSTS_MARK}-{os.getpid()}\n")
            self._hosts_added = True

    def _remove_hosts(self) -> None:
        if not self._hosts_added:
            return
        hosts = Path("/etc/hosts")
        mark = f"{_HOSTS_MARK}-{os.getpid()}"
        lines = hosts.read_text().splitlines(keepends=True)
        hosts.write_text("".join(line for line in lines if mark not in line))
        self._hosts_added = False

    def _node_hardware(self) -> str:
        """CPUs / sockets / cores / memory of this host as ``slurmd -C`` reports them."""
        out = _run(["slurmd", "-C"]).stdout.splitlines()[0]
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        cpus = int(fields["CPUs"])
        mem = int(fields.get("RealMemory", 1024))
        # Every simulated node claims the whole host; jobs here are small.
        return (f"CPUs={cpus} Boards={fields.get('Boards', 1)} SocketsPerBoard={fields.get('SocketsPerBoard', 1)} "
                f"CoresPerSocket={fields.get('CoresPerSocket', cpus)} ThreadsPerCore={fields.get('ThreadsPerCore', 1)} "
                f"RealMemory={max(1, mem // self.n_nodes)}")

    def _write_conf(self) -> None:
        for sub in ("state", "log", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.ctld_port = _free_port()
        self.node_ports = [_free_port() for _ in self.node_names]
        hw = self._node_hardware()
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} {hw} State=UNKNOWN"
            for n, p in zip(self.node_names, self.node_ports))
        r = self.root
        self.conf.write_text(f"""\
ClusterName={self.name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
LaunchParameters=use_interactive_step
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=5
EnforcePartLimits=ALL
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
Waittime=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _start_daemons(self) -> None:
        env = self.env()
        log = self.root / "log"
        # -i: ignore saved state (a fresh cluster every time); -D is not used: the daemons fork.
        _run(["slurmctld", "-i", "-f", str(self.conf)], env=env, timeout=60)
        _wait_for(lambda: _run(["scontrol", "ping"], env=env, check=False).stdout.count("UP") > 0,
                  30, "slurmctld", log / "slurmctld.log")
        for node in self.node_names:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            _run(["slurmd", "-N", node, "-f", str(self.conf)], env=env, timeout=60)

        def nodes_idle() -> bool:
            states = self.node_states()
            return all(states.get(n, "").rstrip("*") == "idle" for n in self.node_names)

        _wait_for(nodes_idle, 60, "the slurmd nodes to become idle", log / f"slurmd-{self.node_names[-1]}.log")

    def stop(self) -> None:
        env = self.env()
        if self.conf.exists() and shutil.which("scontrol"):
            # Cancel what is left, then shut every daemon down (slurmd included).
            _run(["scancel", "--full", "--partition", "debug"], env=env, check=False, timeout=30)
            _run(["scontrol", "shutdown"], env=env, check=False, timeout=60)
            pids = [self.root / "slurmctld.pid", *[self.root / f"slurmd-{n}.pid" for n in self.node_names]]
            deadline = time.monotonic() + 30
            for pidfile in pids:
                pid = _read_pid(pidfile)
                while pid and _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if pid and _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            self._kill_leftovers()
        if self._started_munged:
            pid = _read_pid(self.root / "munge" / "munged.pid")
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
            self._started_munged = False
        self._remove_hosts()

    def _kill_leftovers(self, grace: float = 5.0) -> None:
        """Job steps survive ``scontrol shutdown`` (slurmstepd outlives slurmd by design): end every
        process that runs with this cluster's SLURM_CONF (daemons, slurmstepd, job scripts, tasks)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        mine = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    mine.append(int(entry.name))
            except OSError:
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in mine:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while any(_alive(p) for p in mine) and time.monotonic() < deadline:
                time.sleep(0.2)
            mine = [p for p in mine if _alive(p)]
            if not mine:
                return

    def cleanup(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- jobs --------------------------------------------------------------------------------
    def sbatch(self, args: list[str], timeout: float = 600, cwd: str | Path | None = None,
               env: dict | None = None) -> "Job":
        """``sbatch --wait --parsable ARGS`` (wrapped in ``timeout``); returns the finished job."""
        env = self.env(env)
        cmd = ["timeout", "--kill-after=10", str(int(timeout)), "sbatch", "--wait", "--parsable", *args]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout + 30)
        job_id = proc.stdout.strip().split(";")[0] if proc.stdout.strip() else None
        if proc.returncode == 124 and job_id:
            _run(["scancel", job_id], env=env, check=False)
        return Job(job_id, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)

    def submit(self, args: list[str], cwd: str | Path | None = None, env: dict | None = None) -> str:
        """``sbatch --parsable ARGS`` without waiting; returns the job id."""
        proc = _run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = _run(["scontrol", "show", "job", job_id], env=self.env(), check=False).stdout
        for item in out.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return "GONE"

    def node_states(self) -> dict[str, str]:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), check=False).stdout.splitlines()
        return dict(line.split() for line in out if line.strip())

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is idle (no job, nothing left to clean up), then one more second."""
        _wait_for(lambda: all(s.rstrip("*") == "idle" for s in self.node_states().values()), timeout,
                  "idle nodes", self.root / "log" / "slurmctld.log")
        time.sleep(1.0)

    def scontrol(self, *args: str) -> str:
        return _run(["scontrol", *args], env=self.env()).stdout


class Job:
    def __init__(self, job_id: str | None, returncode: int, stdout: str, stderr: str, seconds: float):
        self.id = job_id
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Job({self.id}, rc={self.returncode}, {self.seconds:.0f}s, stderr={self.stderr.strip()[-300:]!r})"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False

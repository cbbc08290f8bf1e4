"""A real, throwaway Slurm cluster on this machine for tests: munged, slurmctld and slurmd started
in a temporary folder, stopped (by their own pids) afterwards.

Nothing is mocked: jobs go through ``sbatch``/``srun`` as on any cluster. The machine is one node
named after ``hostname -s`` with as many CPUs as it has cores; the config fits a sandbox with no
systemd and no cgroups (``proctrack/linuxproc``, ``task/none``, no accounting). Ports are picked
free so that clusters of concurrent test runs do not meet, and the munge socket is private to
this cluster. ``cred_expire`` is the hold Slurm puts on a requeued job before it may run again
(Slurm's default is 120 s) and ``sched_interval`` how often the scheduler looks at jobs that became
eligible (60 s): tests set both low, so that a requeued job runs again within seconds.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from multi_dist.dist import free_port

INSTALL_HINT = (
    "Slurm is not installed: the Slurm tests start a real cluster and need slurmctld, slurmd, munged and the "
    "client commands. Run .ci/run (it installs them) or `apt-get install -y slurm-wlm`."
)
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


def missing_commands() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _real_memory_mb() -> int:
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return total_kb // 1024 // 2  # below the machine's, or slurmd marks the node invalid


class SlurmCluster:
    """``with SlurmCluster(folder) as cluster:`` a running one-node cluster; ``cluster.env`` holds
    ``SLURM_CONF`` for client commands (the fixture exports it)."""

    def __init__(
        self,
        folder: Path,
        cpus: int | None = None,
        cred_expire_s: int = 120,
        sched_interval_s: int = 60,
        kill_wait_s: int = 30,
    ) -> None:
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.cred_expire_s = cred_expire_s
        self.sched_interval_s = sched_interval_s
        self.kill_wait_s = kill_wait_s
        # job ids (and so the rendezvous ports derived from them) differ between concurrent clusters
        self.first_job_id = random.randrange(1000, 1_000_000)
        self.node = socket.gethostname().split(".")[0]
        self.partition = "debug"
        self.conf = self.folder / "slurm.conf"
        self._procs: list[subprocess.Popen] = []
        self._munge_dir: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        missing = missing_commands()
        if missing:
            raise RuntimeError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
        self.folder.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "logs"):
            (self.folder / sub).mkdir(exist_ok=True)
        socket_path = self._start_munge()
        self.conf.write_text(self._config(socket_path))
        env = {**os.environ, **self.env}
        for name, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D"])):
            log = (self.folder / "logs" / f"{name}.out").open("w")
            self._procs.append(
                subprocess.Popen([_which(name), *args, "-f", str(self.conf)], env=env, stdout=log, stderr=log)
            )
            if name == "slurmctld":
                self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld to answer", 30)
        self._wait(lambda: self._ok(["sinfo", "-h", "-o", "%T"], "idle"), "the node to be idle", 60)

    def stop(self) -> None:
        """Cancel what is left, let slurmd clean its job steps up, then stop the daemons."""
        if self._procs and self._ok(["scontrol", "ping"], "UP"):
            user = pwd.getpwuid(os.getuid()).pw_name
            subprocess.run(["scancel", "--full", "--user", user], env=self._env(), timeout=30)
            deadline = time.time() + self.kill_wait_s + 10
            while time.time() < deadline and self._ok(["squeue", "-h", "-o", "%i"], ""):
                out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self._env(), capture_output=True, text=True)
                if not out.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)
            self._munge_dir = None

    def _start_munge(self) -> Path:
        """munged runs as the munge user, with its key and socket in a folder that user owns (a
        pytest temp folder is private to root, so the folder lives beside it in /tmp)."""
        munge = pwd.getpwnam("munge")
        self._munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        os.chmod(self._munge_dir, 0o755)
        key = self._munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for path in (self._munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        socket_path = self._munge_dir / "munge.socket"
        log = (self.folder / "logs" / "munged.out").open("w")
        self._procs.append(
            subprocess.Popen(
                [
                    _which("munged"),
                    "--foreground",
                    f"--socket={socket_path}",
                    f"--key-file={key}",
                    f"--pid-file={self._munge_dir / 'munged.pid'}",
                    f"--seed-file={self._munge_dir / 'munged.seed'}",
                    f"--log-file={self._munge_dir / 'munged.log'}",
                ],
                user=munge.pw_uid,
                group=munge.pw_gid,
                stdout=log,
                stderr=log,
            )
        )
        self._wait(socket_path.exists, "munged's socket", 20)
        return socket_path

    def _config(self, munge_socket: Path) -> str:
        f = self.folder
        return f"""\
ClusterName=mdtest{os.getpid()}
FirstJobId={self.first_job_id}
SlurmctldHost={self.node}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={self.cred_expire_s}
StateSaveLocation={f / "state"}
SlurmdSpoolDir={f / "spool"}
SlurmctldPidFile={f / "slurmctld.pid"}
SlurmdPidFile={f / "slurmd.pid"}
SlurmctldLogFile={f / "logs" / "slurmctld.log"}
SlurmdLogFile={f / "logs" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval={self.sched_interval_s}
MpiDefault=none
ReturnToService=2
KillWait={self.kill_wait_s}
MinJobAge=600
NodeName={self.node} CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=hidden Nodes={self.node} Hidden=YES MaxTime=INFINITE State=UP
"""

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _ok(self, cmd: list[str], expect: str) -> bool:
        try:
            out = subprocess.run(cmd, env=self._env(), capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and expect in out.stdout

    def _wait(self, ready: object, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self._procs if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(
                    f"--- {p.name}\n{p.read_text()[-2000:]}"
                    for p in sorted((self.folder / "logs").glob("*"))
                    if p.is_file()
                )
                self.stop()
                raise RuntimeError(f"Slurm test cluster: gave up waiting for {what} (exited: {dead})\n{logs}")
            time.sleep(0.3)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); empty once purged."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=self._env(), capture_output=True, text=True, timeout=30
        )
        if out.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for line in out.stdout.splitlines():  # one line per array element
            for key, value in re.findall(r"(\w+)=(\S*)", line):
                fields.setdefault(key, value)
        return fields

    def states(self, job_id: str) -> list[str]:
        """The state of each job (each array element) under ``job_id``."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=self._env(), capture_output=True, text=True, timeout=30
        )
        return re.findall(r"JobState=(\S+)", out.stdout)

    def wait_done(self, job_id: str, timeout: float, poll_s: float = 2.0) -> list[str]:
        """Wait until every job under ``job_id`` has ended; their final states."""
        deadline = time.time() + timeout
        while True:
            states = self.states(job_id)
            if states and all(s not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING") for s in states):
                return states
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {states} after {timeout:.0f} s")
            time.sleep(poll_s)

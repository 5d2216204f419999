"""A private one-node SLURM cluster for the tests: real munged, slurmctld and slurmd, everything in
one temporary folder with its own ports, so a SLURM set-up on the machine is never touched.

Clients reach it through ``SLURM_CONF`` (``cluster.env``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(root, "slurm.conf")
        self.socket = os.path.join(root, "munge", "munge.socket")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def missing(self) -> list[str]:
        return [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")
                if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]

    def start(self, timeout: float = 60) -> SlurmCluster:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(r, sub), mode=0o700, exist_ok=True)
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._run([_sbin("munged"), "--key-file", key, "--socket", self.socket, "--pid-file",
                   os.path.join(r, "munge", "munged.pid"), "--log-file", os.path.join(r, "log", "munged.log"),
                   "--seed-file", os.path.join(r, "munge", "munged.seed"), "--force"], wait=True)
        cpus = os.cpu_count() or 2
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=lversetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        self._run([_sbin("slurmctld"), "-f", self.conf, "-D"])
        self._run([_sbin("slurmd"), "-f", self.conf, "-D", "-N", self.node])
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM test cluster did not come up; logs in {r}/log: "
                           + self.log("slurmctld")[-2000:] + self.log("slurmd")[-2000:])

    def log(self, name: str) -> str:
        path = os.path.join(self.root, "log", f"{name}.log")
        return open(path).read() if os.path.exists(path) else ""

    def _run(self, cmd: list[str], wait: bool = False) -> None:
        if wait:
            subprocess.run(cmd, check=True, env=self.env)
        else:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))

    def wait_job(self, job: str, timeout: float = 300) -> dict[str, str]:
        """Wait until every task of ``job`` has ended; returns {job id: state}."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.states(job)
            if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                              for s in states.values()):
                return states
            time.sleep(1)
        raise TimeoutError(f"job {job} still running after {timeout}s: {self.states(job)}")

    def states(self, job: str) -> dict[str, str]:
        """{job or array task id: state} from scontrol (no accounting database here)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job], env=self.env, capture_output=True, text=True)
        states = {}
        for line in out.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            task = fields.get("ArrayTaskId")
            key = f"{fields['ArrayJobId']}_{task}" if task else fields.get("JobId")
            states[key] = fields.get("JobState")
        return states

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        pid_file = os.path.join(self.root, "munge", "munged.pid")
        if os.path.exists(pid_file):
            try:
                os.kill(int(open(pid_file).read().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"

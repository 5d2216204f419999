"""Real clusters of several nodes on this one machine, for the tests.

A node is a network namespace with its own address on a private bridge (no route out, so no
traffic leaves it), its own hostname and its own ``/etc/hosts`` (a file of the test's own, bind
mounted in a private mount namespace: the machine's ``/etc/hosts`` is never touched). Processes
run "on" a node through ``Nodes.wrap``.

``SlurmCluster`` puts a real SLURM cluster on the nodes: one munged and one slurmctld (in the root
network namespace, on the bridge's address), one slurmd per node, and fake GPUs through SLURM's
GRES: character devices made with mknod, so slurmd sets ``CUDA_VISIBLE_DEVICES`` per task exactly
as on a GPU cluster. Clients reach it through ``SLURM_CONF`` (``cluster.env``).

Everything has names of its own (namespaces ``lv<pid>-<k>n<i>``, a free /24 under 10.213, free
ports, a temporary folder), and ``stop`` removes all of it, also after a failed test; a run that
was killed before it could clean up leaves namespaces named after a dead PID, which the next
``Nodes`` removes. Only the PIDs inside our own namespaces, and the daemons we started, are ever
signalled. Test processes running side by side (pytest-xdist's workers) take a machine-wide lock
(``_machine_lock``) while they choose a subnet and claim it, and while they look whether the
namespace mount point is still used, so two never take the same subnet or unmount it under the
other.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

from .procs import alive, environ_of, pids

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def _remove_stale() -> None:
    """Namespaces and bridges that a killed test run of ours left (named after its dead PID)."""
    for name in _namespaces():
        m = re.fullmatch(r"lv(\d+)-\d+n\d+", name)
        if m and not alive(int(m.group(1))):
            _kill_namespace(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.search(r"\d+: (lvb(\d+)-\d+):", line)
        if m and not alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def _kill_namespace(name: str) -> None:
    pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while pids and time.time() < deadline:
            pids = [p for p in pids if alive(p)]
            time.sleep(0.05)


@contextlib.contextmanager
def _machine_lock():
    """One test process at a time on this machine (an exclusive lock on a file in /run/lock)."""
    os.makedirs("/run/lock", exist_ok=True)
    with open("/run/lock/lverse-test-nodes.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_subnet() -> str:
    """A 10.213.X /24 that no interface of this machine uses."""
    used = _ip("-o", "-4", "addr", "show", check=False).stdout
    for x in range(7, 250):
        if f" 10.213.{x}." not in used:
            return f"10.213.{x}"
    raise RuntimeError("no free 10.213.X.0/24 subnet for the test nodes")


class Nodes:
    """``count`` nodes named node1..nodeN on a private bridge; the root namespace is ``ctl``."""

    made = 0  # clusters this process made: part of every name, so two can be up at once

    def __init__(self, root: str, count: int):
        Nodes.made += 1
        self.root, self.count = root, count
        self.tag = f"{os.getpid()}-{Nodes.made}"
        self.bridge = f"lvb{self.tag}"
        self.veth = f"lvh{os.getpid()}x{Nodes.made}x"  # + node number: the root side of its veth pair
        self.names = [f"node{i}" for i in range(1, count + 1)]
        self.namespaces = [f"lv{self.tag}n{i}" for i in range(1, count + 1)]
        self.subnet = ""
        self.hosts = os.path.join(root, "hosts")
        self._up = False

    def addr(self, node: str) -> str:
        """The address of ``node`` ("ctl": the bridge, the root namespace's side)."""
        return f"{self.subnet}.1" if node == "ctl" else f"{self.subnet}.{10 + self.names.index(node) + 1}"

    def start(self) -> Nodes:
        _remove_stale()
        if any(ns in _namespaces() for ns in self.namespaces):
            raise RuntimeError(f"namespaces {self.namespaces} exist already: one cluster per test process")
        os.makedirs(self.root, exist_ok=True)
        self._up = True
        atexit.register(self.stop)
        try:
            with _machine_lock():  # the subnet is ours once the bridge holds its address
                self.subnet = _free_subnet()
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.addr('ctl')}/24", "dev", self.bridge)
                self._make()
        except BaseException:
            self.stop()
            raise
        return self

    def _make(self) -> None:
        _ip("link", "set", self.bridge, "up")
        for i, (node, ns) in enumerate(zip(self.names, self.namespaces), 1):
            _ip("netns", "add", ns)
            _ip("link", "add", f"{self.veth}{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", f"{self.veth}{i}", "master", self.bridge, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        with open(self.hosts, "w") as f:
            f.write("127.0.0.1 localhost\n" + f"{self.addr('ctl')} ctl\n"
                    + "".join(f"{self.addr(n)} {n}\n" for n in self.names))

    def wrap(self, node: str, argv: list[str], own_pids: bool = False, private: tuple[str, ...] = (),
             binds: dict[str, str] | None = None) -> list[str]:
        """``argv`` run on ``node``: its network, its hostname, its /etc/hosts. ``own_pids``: in a
        PID namespace of its own too, so that what it starts sees only its own processes (``ray
        stop`` run there ends that node's Ray and nothing else on the machine). ``private``:
        folders (``/tmp/ray``) that each node has of its own, as separate machines would; the
        rest of the filesystem is shared, like a cluster's shared storage. ``binds``: files of the
        test's own shown at existing paths, on this node only ({path: file})."""
        ns = self.namespaces[self.names.index(node)]
        script = f"hostname {node} && mount --bind \"$0\" /etc/hosts"
        for path in private:
            own = self.private_dir(node, path)
            os.makedirs(own, exist_ok=True)
            os.makedirs(path, exist_ok=True)
            script += f" && mount --bind {shlex.quote(own)} {shlex.quote(path)}"
        for path, source in (binds or {}).items():
            script += f" && mount --bind {shlex.quote(source)} {shlex.quote(path)}"
        script += ' && exec "$@"'
        pids = ["--pid", "--fork", "--mount-proc"] if own_pids else []
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", *pids, "sh", "-c", script,
                self.hosts, *argv]

    def private_dir(self, node: str, path: str) -> str:
        """Where ``node``'s own copy of the folder ``path`` lives (see ``wrap``)."""
        return os.path.join(self.root, node, path.strip("/").replace("/", "_"))

    def pids(self, node: str) -> list[int]:
        ns = self.namespaces[self.names.index(node)]
        return [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]

    def kill(self, node: str) -> None:
        """SIGKILL every process on ``node``: what a node that dies does to its work."""
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if not self._up:
            return
        self._up = False
        for ns in self.namespaces:
            if ns in _namespaces():
                _kill_namespace(ns)
                _ip("netns", "del", ns, check=False)  # removes its veth pair too
        _ip("link", "del", self.bridge, check=False)
        deadline = time.time() + 5  # the kernel removes a namespace's veth pair once its last process is gone
        while time.time() < deadline and self.veth in _ip("-o", "link", "show", check=False).stdout:
            time.sleep(0.05)
        with _machine_lock():  # no other test process is adding a namespace meanwhile
            if not _namespaces() and " /run/netns " in open("/proc/mounts").read():
                subprocess.run(["umount", "/run/netns"], capture_output=True)
                with contextlib.suppress(OSError):
                    os.rmdir("/run/netns")
        atexit.unregister(self.stop)


def _end(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM the process group of each of ``procs`` (each started in a session of its own),
    SIGKILL what is still there after ``grace`` seconds."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def missing_slurm() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


class SlurmCluster:
    """A SLURM cluster of ``nodes`` nodes with ``cpus`` CPUs and ``gpus`` fake GPUs each; ``share``
    jobs may share a CPU (more jobs at once than CPUs, for tests that do not measure speed)."""

    def __init__(self, root: str, nodes: int = 1, cpus: int = 2, gpus: int = 0, share: int = 1):
        self.root = root
        self.nodes = Nodes(os.path.join(root, "net"), nodes)
        self.cpus, self.gpus, self.share = cpus, gpus, share
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(root, "slurm.conf")
        self.socket = os.path.join(root, "munge", "munge.socket")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.started_in = 0.0

    def missing(self) -> list[str]:
        return missing_slurm()

    def start(self, timeout: float = 60) -> SlurmCluster:
        began = time.time()
        r = self.root
        for sub in ("munge", "state", "spool", "log", "net", "dev"):
            os.makedirs(os.path.join(r, sub), mode=0o700, exist_ok=True)
        try:
            self.nodes.start()
            self._start_munge()
            self._write_conf()
            ctl = ["unshare", "--uts", "sh", "-c", 'hostname ctl && exec "$@"', "sh",
                   _sbin("slurmctld"), "-f", self.conf, "-D", "-i"]
            self._spawn(ctl)
            for node in self.nodes.names:
                self.start_node(node)
            self._wait_idle(self.nodes.names, timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.time() - began
        return self

    def start_node(self, node: str) -> None:
        """(Re)start ``node``'s slurmd."""
        self._spawn(self.nodes.wrap(node, [_sbin("slurmd"), "-f", self.conf, "-D", "-N", node]))

    def _start_munge(self) -> None:
        r = self.root
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        subprocess.run([_sbin("munged"), "--key-file", key, "--socket", self.socket, "--pid-file",
                        os.path.join(r, "munge", "munged.pid"), "--log-file", os.path.join(r, "log", "munged.log"),
                        "--seed-file", os.path.join(r, "munge", "munged.seed"), "--force"], check=True, env=self.env)

    def _write_conf(self) -> None:
        r, n = self.root, len(self.nodes.names)
        gres = ""
        if self.gpus:
            for i in range(self.gpus):
                path = os.path.join(r, "dev", f"gpu{i}")
                if not os.path.exists(path):
                    os.mknod(path, 0o666 | 0o020000, os.makedev(195, i))  # a character device, like /dev/nvidiaN
            with open(os.path.join(r, "gres.conf"), "w") as f:
                f.write(f"AutoDetect=off\nName=gpu File={r}/dev/gpu[0-{self.gpus - 1}]\n")
            gres = f" Gres=gpu:{self.gpus}"
        nodes = "node1" if n == 1 else f"node[1-{n}]"
        share = f" OverSubscribe=FORCE:{self.share}" if self.share > 1 else ""
        addrs = ",".join(self.nodes.addr(name) for name in self.nodes.names)
        ctl = self.nodes.addr("ctl")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=lversetest
SlurmctldHost=ctl({ctl})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port(ctl)}
SlurmdPort={_free_port(ctl)}
AuthType=auth/munge
AuthInfo=socket={self.socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MpiDefault=none
GresTypes=gpu
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=10
SlurmdTimeout=10
NodeName={nodes} NodeAddr={addrs} CPUs={self.cpus} RealMemory=4000{gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP{share}
""")

    def _spawn(self, argv: list[str]) -> None:
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))

    def _wait_idle(self, nodes: list[str], timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.node_states()
            if all(states.get(n, "").rstrip("*") in ("idle", "mixed", "allocated") and not states[n].endswith("*")
                   for n in nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM test cluster did not come up ({self.node_states()}); logs in {self.root}/log: "
                           + self.log("slurmctld")[-2000:])

    def node_states(self) -> dict[str, str]:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)

    def log(self, name: str) -> str:
        path = os.path.join(self.root, "log", f"{name}.log")
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    def wait_job(self, job: str, timeout: float = 300) -> dict[str, str]:
        """Wait until every task of ``job`` has ended; returns {job id: state}."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.states(job)
            if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                              for s in states.values()):
                return states
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still running after {timeout}s: {self.states(job)}")

    def jobs(self, job: str) -> dict[str, dict[str, str]]:
        """{job or array task id: scontrol's fields} (no accounting database here)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job], env=self.env, capture_output=True, text=True)
        jobs = {}
        for line in out.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            task = fields.get("ArrayTaskId")
            jobs[f"{fields['ArrayJobId']}_{task}" if task else fields.get("JobId")] = fields
        return jobs

    def states(self, job: str) -> dict[str, str]:
        return {key: fields.get("JobState") for key, fields in self.jobs(job).items()}

    def srun(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["srun", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=30)
        _end(self.procs, grace=10)
        pid_file = os.path.join(self.root, "munge", "munged.pid")
        if os.path.exists(pid_file):
            try:
                os.kill(int(open(pid_file).read().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        self.nodes.stop()  # ends whatever is left on the nodes (job steps), then the network


class SshNodes:
    """A private sshd on every node (port 22 of the node's own address), with a host key and an
    authorized key of its own in ``root``: what `ray up` needs to reach machines. Each sshd runs
    in a PID namespace of its own with a /tmp/ray of its own, so what its sessions start (Ray) is
    that node's alone. ``bashrc``: what ~/.bashrc says in the nodes' sessions (a file of the
    test's, shown there in place of the machine's, which is left as it is)."""

    def __init__(self, nodes: Nodes, root: str, bashrc: str = ""):
        self.nodes, self.root, self.bashrc = nodes, root, bashrc
        self.key = os.path.join(root, "client_key")
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 20) -> SshNodes:
        os.makedirs(self.root, exist_ok=True)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.root, key)],
                           check=True)
        shutil.copy(self.key + ".pub", os.path.join(self.root, "authorized_keys"))
        config = os.path.join(self.root, "sshd_config")
        with open(config, "w") as f:
            f.write(f"Port 22\nHostKey {self.root}/host_key\nAuthorizedKeysFile {self.root}/authorized_keys\n"
                    "PidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        bashrc = os.path.join(self.root, "bashrc")
        with open(bashrc, "w") as f:
            f.write(self.bashrc)
        home_bashrc = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".bashrc")
        if not os.path.exists(home_bashrc):
            raise RuntimeError(f"{home_bashrc} does not exist: the nodes' sessions show the test's own in its place")
        for node in self.nodes.names:
            log = open(os.path.join(self.root, f"sshd-{node}.log"), "w")
            self.procs.append(subprocess.Popen(
                self.nodes.wrap(node, ["/usr/sbin/sshd", "-D", "-e", "-f", config], own_pids=True,
                                private=("/tmp/ray",), binds={home_bashrc: bashrc}),
                stdout=log, stderr=log, start_new_session=True))
        deadline = time.time() + timeout
        for node in self.nodes.names:
            while True:
                try:
                    socket.create_connection((self.nodes.addr(node), 22), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"sshd on {node} did not start; see {self.root}/sshd-{node}.log") from None
                    time.sleep(0.1)
        return self

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class RayNodes:
    """A Ray cluster on the nodes, started as MULTINODE-style `ray start --block` per node (the
    head on node1), each with a private /tmp/ray; token authentication with a token of the test's
    own. ``driver(argv)`` runs a command on the head node, as `ray exec` would."""

    def __init__(self, nodes: Nodes, root: str, cpus: int = 2):
        self.nodes, self.root, self.cpus = nodes, root, cpus
        self.token = os.path.join(root, "ray_token")
        self.port = 6379  # the head namespace's own port space
        self.procs: list[subprocess.Popen] = []
        # The head takes a node for dead after 10 missed health checks a second apart (Ray's
        # defaults: 5, 3 s apart, each given 10 s), so a killed node's work moves on in about 10 s.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token,
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "10"}

    @property
    def address(self) -> str:
        return f"{self.nodes.addr('node1')}:{self.port}"

    def start(self, timeout: float = 120) -> RayNodes:
        os.makedirs(self.root, exist_ok=True)
        with open(self.token, "w") as f:
            f.write(os.urandom(16).hex())
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        for node in self.nodes.names:
            self.start_node(node, ray)
            if node == "node1":
                self.wait_nodes(1, timeout)
        self.wait_nodes(len(self.nodes.names), timeout)
        return self

    def start_node(self, node: str, ray: str | None = None) -> None:
        ray = ray or os.path.join(os.path.dirname(sys.executable), "ray")
        role = (["--head", f"--port={self.port}", "--include-dashboard=false"] if node == "node1"
                else [f"--address={self.address}"])
        log = open(os.path.join(self.root, f"ray-{node}.log"), "a")
        self.procs.append(subprocess.Popen(
            self.nodes.wrap(node, [ray, "start", "--block", f"--node-ip-address={self.nodes.addr(node)}",
                                   f"--num-cpus={self.cpus}", "--object-store-memory=100000000", *role],
                            private=("/tmp/ray",)),
            env=self.env, stdout=log, stderr=log, start_new_session=True))

    def alive_nodes(self) -> int:
        code = ("import ray; ray.init(address='auto', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        try:
            out = self.run_on("node1", [sys.executable, "-c", code], timeout=60)
        except subprocess.TimeoutExpired:  # a head still starting on a busy machine: asked again
            return 0
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def wait_nodes(self, count: int, timeout: float) -> None:
        """Until ``count`` nodes are alive."""
        deadline = time.time() + timeout
        while self.alive_nodes() < count:
            if time.time() > deadline:
                raise RuntimeError(f"Ray: fewer than {count} nodes after {timeout} s; logs in {self.root}")
            time.sleep(1)

    def run_on(self, node: str, argv: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.nodes.wrap(node, argv, private=("/tmp/ray",)), env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def popen_on(self, node: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.nodes.wrap(node, argv, private=("/tmp/ray",)), env=self.env,
                                start_new_session=True, **kwargs)

    def stop(self) -> None:
        _end(self.procs, grace=15)


class AutoscalingRay:
    """An autoscaling Ray cluster on this machine: Ray's fake multi-node provider starts a worker
    "node" (a raylet with its node type's resources, fake GPUs included) for each node the
    autoscaler launches, and stops it when idle. The head and everything it starts live in a PID
    namespace of their own, so killing the one ``unshare`` process ends them all, whatever the
    test did; the state folder is the cluster's own (a short path: Ray's socket paths must fit in
    108 bytes). The driver joins from outside through ``address``, with ``env`` (token
    authentication off, as in tests/cluster.py's RayNodes).

    ``config`` is the autoscaling config as a dict (``head_cpus`` and ``worker_types`` fill its
    node types); ``config_path`` is the same file `ray up` would get, for ``--ray-node-types``."""

    def __init__(self, worker_types: dict[str, dict], head_cpus: int = 2, idle_minutes: float = 1.0):
        import tempfile
        self.root = tempfile.mkdtemp(prefix="lvas")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.config = {
            "cluster_name": f"lverse-fake-{os.getpid()}", "max_workers": 8, "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_minutes,
            # No node updaters: a fake node has nothing to set up over SSH. With them, a node whose first
            # heartbeat is late (a loaded machine) gets a "recovery" update, which fails, and the
            # autoscaler then removes the node as "launch failed", actors and all. Without them, a node
            # with no heartbeat for 30 s is removed, which is what a reclaimed spot node needs.
            "provider": {"type": "fake_multinode", "gcs_address": self.address, "disable_launch_config_check": True,
                         "use_node_id_as_ip": True, "disable_node_updaters": True},
            "auth": {"ssh_user": "nobody"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0},
                **{name: {"node_config": {}, **spec} for name, spec in worker_types.items()}},
            "head_node_type": "ray.head.default",
            **{k: [] for k in ("cluster_synced_files", "initialization_commands", "setup_commands",
                               "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                               "worker_start_ray_commands")},
            "file_mounts": {}, "file_mounts_sync_continuously": False}
        self.config_path = os.path.join(self.root, "cluster.yaml")
        self.head_cpus = head_cpus
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> AutoscalingRay:
        import yaml
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config, f)
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", ray, "start", "--head", "--block",
             f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
             f"--autoscaling-config={self.config_path}", f"--temp-dir={self.root}/ray", "--include-dashboard=false"],
            env={**self.env, "RAY_FAKE_CLUSTER": "1"}, stdout=open(os.path.join(self.root, "head.log"), "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not os.path.exists(os.path.join(self.root, "ray", "session_latest", "logs", "monitor.log")):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the fake autoscaling Ray head did not start: {self.log()[-3000:]}")
            time.sleep(0.5)
        return self

    def _node_processes(self) -> dict[int, str]:
        """Each process of a worker node (its raylet and what that started) with the node's id, which
        the provider puts into the node's environment; only this cluster's PID namespace is read
        (another test's fake nodes have the same ids)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            namespace = os.readlink(f"/proc/{f.read().split()[0]}/ns/pid")  # the one its first process made
        found = {}
        for pid in pids():
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") != namespace:
                    continue
            except OSError:
                continue
            node = environ_of(pid).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
            if node is not None:
                found[pid] = node
        return found

    HEAD = "f" * 51 + "00000"  # the provider's id of the head node (its processes carry it too)

    def worker_nodes(self) -> list[str]:
        """The ids of the worker nodes up now, oldest first."""
        return sorted(set(self._node_processes().values()) - {self.HEAD})

    def node_pids(self, node_id: str) -> list[int]:
        return [pid for pid, node in self._node_processes().items() if node == node_id]

    def kill_node(self, node_id: str) -> None:
        """A worker node gone at once, as a spot node reclaimed: SIGKILL to each of its processes."""
        for pid in self.node_pids(node_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        """The head's output, then the autoscaler's log (which says what it launched and removed,
        and why)."""
        text = ""
        for path in (os.path.join(self.root, "head.log"),
                     os.path.join(self.root, "ray", "session_latest", "logs", "monitor.log")):
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                text += f"==> {os.path.basename(path)}\n{f.read()}"
        return text

    def stop(self) -> None:
        """End the namespace (unshare ignores SIGTERM; its SIGKILL takes the namespace's first
        process and so every other with it) and remove the state folder."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

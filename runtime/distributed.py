"""Who am I in the job: rank, local rank and world size from torchrun, DeepSpeed or SLURM.

torchrun and the ``deepspeed`` launcher export ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. ``srun`` exports only its own variables, and DeepSpeed's
``init_distributed`` does not read them (it tries MPI next and fails on a missing ``mpi4py``), so
``setup_env`` maps them before the process group starts: one task per GPU, rank = SLURM_PROCID,
local rank = SLURM_LOCALID, world = SLURM_NTASKS, master = the first host of the job's node list
(``scontrol show hostnames``), port derived from the job id so that two jobs sharing a node do not
collide. A plain ``python`` process (no launcher) becomes a world of one on 127.0.0.1.

It also sizes this rank's threads (``resources.py``): the ranks on one node share its cores, unless
the launcher already bound each rank to cores of its own (an affinity mask smaller than the
machine), in which case the rank takes its mask. torchrun's and DeepSpeed's own OMP_NUM_THREADS
count as the user's.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass

from lverse.core.errors import InputError
from lverse.core.resources import apply_threads, available_cores, local_world_size, plan_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    source: str  # "torchrun", "slurm" or "single"


def world_info_from_env(env: dict | None = None) -> WorldInfo:
    """Rank, local rank and world size; launcher variables win over SLURM's (a torchrun inside
    an sbatch job sets both)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                         "slurm")
    return WorldInfo(0, 0, 1, "single")


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list ("node[01-04],gpu7" -> "node01") via ``scontrol``."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                         text=True).stdout.split()
    if not out:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} returned no host")
    return out[0]


def setup_env(master_port: int | None = None) -> WorldInfo:
    """Export the torch.distributed variables for this process (see the module doc); returns who
    we are."""
    info = world_info_from_env()
    if info.source == "slurm":
        os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size))
        os.environ.setdefault("MASTER_ADDR", slurm_master_addr(os.environ["SLURM_JOB_NODELIST"]))
        # Every task must agree on the port without talking: derive it from the job id (and the
        # array task, if any), inside the unprivileged range, so jobs sharing a node differ.
        job = int(os.environ.get("SLURM_JOB_ID", "0")) + int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
        os.environ.setdefault("MASTER_PORT", str(master_port or 20000 + job % 20000))
    elif info.source == "single":
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(master_port or free_port()))
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(master_port or 29500))
    cores = available_cores()
    bound = cores < (os.cpu_count() or cores)
    plan = plan_threads(1 if bound else local_world_size(), cores)
    apply_threads(plan.threads)
    log.info("rank %d: %d threads (%s)", info.rank, plan.threads, plan.describe())
    return info


RENDEZVOUS_TIMEOUT = "LVERSE_RENDEZVOUS_TIMEOUT"  # seconds a rank waits for rank 0's port (default 300)
# Seconds a collective of the training's process group may wait for the other ranks before it
# fails (default: torch's, 30 min for gloo, 10 min for NCCL). A node that dies without closing its
# connections (power, kernel, network) is seen by the other ranks only this way: the elastic job
# script sets it short (slurm/train_elastic.sbatch). Work one rank does alone for long (a
# checkpoint conversion or write) is waited for on a group of its own (``trainer.wait_for_ranks``).
COLLECTIVE_TIMEOUT = "LVERSE_COLLECTIVE_TIMEOUT"


def collective_timeout() -> datetime.timedelta | None:
    """``LVERSE_COLLECTIVE_TIMEOUT`` as a timedelta; None when unset (torch's default)."""
    value = os.environ.get(COLLECTIVE_TIMEOUT)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise InputError(f"{COLLECTIVE_TIMEOUT}={value!r}: give the seconds a collective may wait, e.g. 60")
    return datetime.timedelta(seconds=seconds)


def check_rendezvous(info: WorldInfo, timeout: float | None = None) -> None:
    """Before the process group starts: MASTER_ADDR resolves on this node, and every rank above 0
    reaches rank 0's port within ``timeout`` seconds (``LVERSE_RENDEZVOUS_TIMEOUT``, default 300;
    refused connections are retried: rank 0 may not listen yet). Without this, a wrong address
    leaves every rank waiting in the process group's own connect loop for half an hour with no
    word of which address it tried."""
    addr, port, host = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), socket.gethostname()
    try:
        resolved = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        raise InputError(f"rank {info.rank} on {host}: the rendezvous host MASTER_ADDR={addr} does not resolve "
                         f"({e}); set MASTER_ADDR to a name or address of the first node that every node "
                         "resolves") from None
    if info.rank == 0 or info.world_size == 1:
        return
    timeout = float(os.environ.get(RENDEZVOUS_TIMEOUT, 300)) if timeout is None else timeout
    deadline, last = time.time() + timeout, None
    while True:
        try:
            socket.create_connection((resolved, port), timeout=5).close()
            return
        except OSError as e:
            last = e
        if time.time() > deadline:
            raise InputError(f"rank {info.rank} on {host} cannot reach the rendezvous {addr}:{port} ({resolved}) "
                             f"within {timeout:.0f} s ({last}): rank 0 listens there once it starts. Check that "
                             f"MASTER_ADDR={addr} is an address the other nodes reach and that port {port} "
                             f"(MASTER_PORT) is open between nodes; {RENDEZVOUS_TIMEOUT} sets the wait")
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

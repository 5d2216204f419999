"""The Ray cluster a stage runs on: joining it, what it holds or can grow to, and the driver's
signals while it waits.

``join`` joins (or starts) the cluster and keeps the driver's own SIGTERM handler, which
``ray.init`` would replace; ``ray_calls`` puts back what that handler raised when Ray swallowed it.
``ray_pool`` sizes a model stage's actors: from what the cluster holds (``cluster_resources``), or,
on an autoscaling cluster, from what its node types can grow to (``node_types``, read from the
cluster's autoscaling config, and read again when that file changes: ``NodeTypesSizing``);
``check_shared`` refuses an output folder that not every node sees.
The executors themselves are in ``ray_tasks.py``.

How a stage grows with an autoscaling cluster: it asks for all its actors at once, each with its
resources (one GPU by default), and lets those that no node can hold yet wait in Ray's queue.
Ray's autoscaler launches nodes for exactly such waiting requests and Ray places each actor as its
node comes up, so the stage needs no call of its own to the autoscaler. Chosen over the
alternatives: ``ray.autoscaler.sdk.request_resources`` keeps nodes up until it is called again,
also after a driver that died; Ray Data's actor pools own retries, ordering and output files, and
the shard stages need their own (a done marker per shard, atomic writes, a summary naming each
failed shard). Ray cannot tell a driver which node types its autoscaler has (autoscaler v1 keeps
them in its own process), hence the config file: it is also what turns a request no node type can
meet into an error before work rather than a queue that never moves. The autoscaler reads that file
again at each of its updates, so raising a type's max_workers (or adding a type) grows the cluster
mid-run; the stage watches the same file and asks for the further actors the new nodes can hold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import yaml

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.runtime.lifetime import guard_private_ray
from lverse.runtime.tasks import StageFailed

log = logging.getLogger(__name__)


# A private Ray's longest socket path below its temporary folder: "/ray/session_<date>_<time>_<pid>
# /sockets/plasma_store"; a Unix socket's path is at most 107 bytes.
_SOCKET_TAIL = len("/ray/session_2026-12-07_17-35-55_672671_4194304/sockets/plasma_store")


def _session_folder() -> str:
    """Where a private Ray puts its session (sockets, logs): under RAY_TMPDIR, else TMPDIR, else /tmp."""
    return os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"


def _check_session_folder() -> None:
    """A private Ray fails to start with a bare OSError where its session folder's path is too long
    for a socket's (a scheduler's TMPDIR can be): refuse first, saying what to set."""
    folder = _session_folder()
    if len(folder.encode()) + _SOCKET_TAIL > 107:
        raise InputError(f"a local Ray cannot start under {folder}: its socket paths would pass the 107 bytes a "
                         f"Unix socket allows; set RAY_TMPDIR to a shorter folder (e.g. RAY_TMPDIR=/tmp)")


def join(address: str | None) -> ModuleType:
    """Join ``address`` ("auto": the running cluster), else RAY_ADDRESS, else a private local Ray;
    returns the ``ray`` module.

    ``ray.init()`` with no address would attach to whatever `ray start` left on this machine;
    "local" always starts a fresh one.
    """
    global _joined_private
    import ray
    if not ray.is_initialized():
        _check_answers(address or os.environ.get("RAY_ADDRESS"))
        # ray.init installs its own SIGTERM handler, which ends the driver without ending its
        # workers; the driver's own (the CLI takes SIGTERM as Ctrl-C) is put back, kept (keeping).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":  # a Ray of its own, which must end with this process
            _check_session_folder()
            guard_private_ray()
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as e:
            if address != "local":
                raise
            # A process of its own killed while it starts (the OOM killer), or a machine too loaded for
            # Ray's start-up timeouts: Ray raises a bare Exception after waiting for its GCS. What it
            # started dies with this process (its guard).
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StageFailed(f"the private local Ray did not start ({reason}); run the same command again, and if "
                              f"it fails the same way, read Ray's logs in "
                              f"{os.path.join(_session_folder(), 'ray', 'session_latest', 'logs')}") from e
        _joined_private = address == "local"
        if main and previous is not None:
            signal.signal(signal.SIGTERM, keeping(previous) if callable(previous) else previous)
    return ray


_joined_private = False  # whether the Ray this process joined last is a private local one


def private_ray_lost() -> str | None:
    """Why nothing more can run, where this process's private local Ray lost its raylet or its GCS;
    else None. A cluster may get a node back (its autoscaler, a restarted worker), so a stage waits
    for one there; a private Ray has one node, and a stage waiting on it after its death would wait
    until its own time limit (``ray_wait``, 15 minutes; download's tasks, for ever), or, with its
    GCS gone, until Ray ends the driver 60 s later with a message of its own.

    The driver started the private Ray's processes itself, so it asks them, through Ray's record of
    what it started (its node object, internal to Ray, there since Ray 1): a question to the GCS
    would wait on a dead GCS until Ray's own 60 s timeout. Where that record is missing (a Ray that
    has moved it), nothing is known to be lost: the stage waits, as on a cluster."""
    if not _joined_private:
        return None
    try:
        from ray._private import worker
        dead = {kind for kind, _ in worker._global_node.dead_processes()}
    except (ImportError, AttributeError):
        return None
    if "gcs_server" in dead:
        return "the private local Ray's GCS died"
    return "the private local Ray's node died (its raylet ended)" if "raylet" in dead else None


_kept: list[BaseException] = []  # what the driver's SIGTERM handler raised last, while Ray is in use


def keeping(handler):
    """``handler``, keeping what it raises for ``ray_calls`` to put back."""
    if hasattr(handler, "keeps"):  # kept already (Ray started again in this process)
        return handler

    def on_signal(signum, frame):
        try:
            handler(signum, frame)
        except BaseException as e:
            _kept[:] = [e]
            raise
    on_signal.keeps = handler
    return on_signal


@contextlib.contextmanager
def ray_calls() -> Iterator[None]:
    """Around the driver's waits on Ray: put back the exception the driver's SIGTERM handler raised.

    Ray checks for signals while it waits (ray.wait, ray.get) and turns any KeyboardInterrupt a
    handler raises there, the CLI's ``Terminated`` (its SIGTERM) included, into a plain
    KeyboardInterrupt: the CLI would take a SIGTERM that landed there for a Ctrl-C (exit status
    130, not 143)."""
    _kept.clear()
    try:
        yield
    except KeyboardInterrupt as e:
        if type(e) is KeyboardInterrupt and _kept and _kept[0] is not e:
            raise _kept.pop() from None
        raise


def _check_answers(address: str | None, timeout: float = 10.0) -> None:
    """A ``host:port`` Ray address answers within ``timeout`` seconds (ray.init would wait far
    longer and then name no address); "auto", "local" and ray:// addresses are left to Ray."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise InputError(f"the Ray cluster at {address} does not answer ({e}): check --ray-address (the head's "
                         "GCS address, host:port) and that the head is running") from None


def cluster_resources(address: str | None) -> dict[str, float]:
    """The Ray cluster's resources ({"CPU": 48.0, "GPU": 8.0, ...}) at ``address`` (joined, or
    started, as ``join`` does)."""
    return dict(join(address).cluster_resources())


@dataclass(frozen=True)
class NodeType:
    """A node type of an autoscaling Ray cluster: what each of its nodes holds, and how many there can be."""

    name: str
    resources: dict[str, float]  # each node's Ray resources ({"CPU": 8, "GPU": 1})
    max_nodes: int  # nodes of this type at most (the head type: 1)

    def describe(self) -> str:
        nodes = f"{self.max_nodes} node{'s' * (self.max_nodes != 1)}"
        return f"{self.name}: {_resources_text(self.resources)}, up to {nodes}"


def node_types(path: str) -> list[NodeType]:
    """The node types of the autoscaling config at ``path`` (the YAML given to `ray up`, or the
    ``~/ray_bootstrap_config.yaml`` it leaves on the head, where cloud node types have their
    resources filled in), the head's type first."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not a Ray cluster config (YAML): {e}") from None
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not types and isinstance(config, dict) and (config.get("provider") or {}).get("type") == "local":
        raise InputError(f"{path} is a cluster of Ray's local provider, whose machines are all up from the start "
                         "(worker_ips): leave ray_node_types out, and the stage sizes its actors to the nodes up")
    if not types:
        raise InputError(f"{path} has no available_node_types: give the config of an autoscaling Ray cluster, or "
                         "leave ray_node_types out to size the stage to the nodes that are up")
    head, most = config.get("head_node_type"), config.get("max_workers")
    found = []
    for name, spec in types.items():
        nodes = 1 if name == head else int(spec.get("max_workers", most or 0))
        if most is not None and name != head:
            nodes = min(nodes, int(most))
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        found.append(NodeType(name, resources, nodes))
    if not any(t.resources for t in found):
        raise InputError(f"the node types of {path} declare no resources (`resources: {{}}`): give the config `ray "
                         "up` leaves on the head (~/ray_bootstrap_config.yaml), where Ray has filled them in, or "
                         "write each type's CPU and GPU")
    return sorted(found, key=lambda t: t.name != head)


@dataclass(frozen=True)
class RayPool:
    actors: int  # model replicas
    num_cpus: float  # Ray resources each asks for
    num_gpus: float
    node_types: tuple[NodeType, ...] = field(default=(), compare=False)  # what it waits for (autoscaling)

    def describe(self) -> str:
        each = (f"each {self.num_gpus:g} GPU and {self.num_cpus:g} CPU" if self.num_gpus
                else f"each {self.num_cpus:g} CPU")
        grow = (f", placed as the autoscaler adds nodes (node types {'; '.join(t.describe() for t in self.node_types)})"
                if self.node_types else "")
        return f"{self.actors} Ray actors, {each}{grow}"

    def wants(self) -> str:
        """What each actor asks for, and of which node types, for messages."""
        each = f"{self.num_gpus:g} GPU and {self.num_cpus:g} CPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        where = (" (node types " + "; ".join(t.describe() for t in self.node_types) + ")") if self.node_types else ""
        return f"each actor asks for {each}{where}"


def ray_pool(resources: dict[str, float], device: str, workers: int | None = None, gpus_per_worker: float = 1.0,
             cpus_per_worker: float = 1.0, types: list[NodeType] | None = None) -> RayPool:
    """The actors a model stage starts on a Ray cluster with ``resources``, and what each asks for.

    On CUDA (``device`` auto or cuda on a cluster with GPUs) each actor asks for
    ``gpus_per_worker`` GPUs: 1, one model per GPU (Ray then gives it its own CUDA_VISIBLE_DEVICES),
    or a share below 1 when the user asks to put several models on one GPU; by default as many
    actors as the GPUs hold. On CPUs each asks for ``cpus_per_worker`` CPUs, and by default as many
    as fit with one CPU left for the driver's and Ray's own tasks. Asking for more than the cluster
    has is an error naming the resource, not a queue that never moves.

    With the node ``types`` of an autoscaling cluster, "the cluster" is every node it can grow to
    (``elastic_pool``), whatever is up now.
    """
    if not 0 < gpus_per_worker <= 1:
        raise InputError(f"gpus_per_worker must be in (0, 1] (one model per GPU, or a share of one), "
                         f"got {gpus_per_worker}")
    if types:
        return elastic_pool(types, device, workers, gpus_per_worker, cpus_per_worker)
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if device == "cuda" and not gpus:
        raise InputError(f"device cuda: the Ray cluster has no GPU (its resources: {_resources_text(resources)}); "
                         "add GPU nodes or use device auto or cpu")
    if device in ("auto", "cuda") and gpus:
        most = int(gpus / gpus_per_worker + 1e-9)
        actors = workers or most
        if actors > most:
            raise InputError(f"{actors} workers x {gpus_per_worker:g} GPU need {actors * gpus_per_worker:g} GPUs; "
                             f"the Ray cluster has {gpus:g}: use --workers {most} or a smaller gpus_per_worker")
        return RayPool(actors, cpus_per_worker, gpus_per_worker)
    most = int((cpus - 1) // cpus_per_worker) if cpus > cpus_per_worker else int(cpus // cpus_per_worker)
    if most < 1:
        raise InputError(f"each worker asks for {cpus_per_worker:g} CPU; the Ray cluster has {cpus:g}")
    actors = workers or most
    if actors * cpus_per_worker > cpus:
        raise InputError(f"{actors} workers x {cpus_per_worker:g} CPU need {actors * cpus_per_worker:g} CPUs; "
                         f"the Ray cluster has {cpus:g}: use --workers {most}")
    return RayPool(actors, cpus_per_worker, 0.0)


def elastic_pool(types: list[NodeType], device: str, workers: int | None, gpus_per_worker: float,
                 cpus_per_worker: float) -> RayPool:
    """``ray_pool`` on an autoscaling cluster of node ``types`` (the head's first): one GPU each by
    default when a type offers GPUs, whether or not such a node is up; by default as many actors as
    the types' nodes hold at most. A request no type can meet is an error naming the resource and
    the types, before any work."""
    gpu = device in ("auto", "cuda") and any(t.resources.get("GPU", 0) >= gpus_per_worker for t in types)
    names = "; ".join(t.describe() for t in types)
    if device == "cuda" and not gpu:
        raise InputError(f"device cuda: no node type of the Ray cluster has a GPU (node types {names}); add a GPU "
                         "node type or use device auto or cpu")
    need = {"GPU": gpus_per_worker, "CPU": cpus_per_worker} if gpu else {"CPU": cpus_per_worker}

    def fits(t: NodeType) -> int:  # actors one node of type t holds; the head keeps a CPU for the driver's tasks
        cpus = t.resources.get("CPU", 0.0) - (1 if t is types[0] and not gpu else 0)
        return int(min([cpus / cpus_per_worker] + ([t.resources.get("GPU", 0.0) / gpus_per_worker] if gpu else []))
                   + 1e-9)
    most = sum(fits(t) * t.max_nodes for t in types)
    wanted = " and ".join(f"{v:g} {k}" for k, v in need.items())
    if most < 1:
        raise InputError(f"each actor asks for {wanted}; no node type of the Ray cluster has that (node types "
                         f"{names}): use fewer threads, device cpu, or a node type that has it")
    actors = workers or most
    if actors > most:
        raise InputError(f"{actors} workers x {wanted} need more than the Ray cluster's node types can ever hold "
                         f"({most} such actors; node types {names}): use --workers {most} or raise their max_workers")
    return RayPool(actors, cpus_per_worker, gpus_per_worker if gpu else 0.0, tuple(types))


class NodeTypesSizing:
    """A model stage's actors on an autoscaling cluster, sized from the node types of its config
    file at ``path`` (``size``: node types -> ``RayPool``), and sized again whenever that file
    changes: the autoscaler reads the same file at each update, so a type's max_workers raised (or a
    type added) mid-stage brings nodes that the stage's further actors are placed on.

    A file that no longer parses, or whose types can no longer hold the actors asked for, keeps
    the stage's last size (logged): the stage never fails for an edit it cannot use."""

    def __init__(self, path: str, size: Callable[[list[NodeType]], RayPool]):
        self.path, self.size = path, size
        self.stamp = self._stamp()
        self.pool = size(node_types(path))  # errors here are the user's, before any work

    def _stamp(self) -> tuple[int, int, int] | None:
        """What tells an edited file: its time, size and inode (a file replaced, as editors and `ray up` do)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self) -> RayPool | None:
        """The pool of the file as it is now, when it changed since the last look; else None."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return None
        self.stamp = stamp
        try:
            pool = self.size(node_types(self.path))
        except (InputError, OSError) as e:
            log.warning("%s changed, but the stage keeps its %d actors: %s", self.path, self.pool.actors, e)
            return None
        if (pool.num_cpus, pool.num_gpus) != (self.pool.num_cpus, self.pool.num_gpus):
            log.warning("%s changed what an actor would ask for (%s); the running stage's actors keep asking for "
                        "what they asked (%s): a new run uses the new types", self.path, pool.wants(),
                        self.pool.wants())
        self.pool = pool
        return pool


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU", "memory")) or "none"


def check_shared(address: str | None, folder: str) -> None:
    """Every node of the Ray cluster sees ``folder``: a marker written here must be visible from a
    task on each node, else outputs written there by one node would be lost to the rest (and to
    this driver). Raises InputError naming the nodes that do not see it. An object store's URL
    passes: every node reaches the same store (core/storage.py)."""
    if storage.is_url(folder):
        return
    ray = join(address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f".lverse-shared-{uuid.uuid4().hex}")
    with open(marker, "w"):
        pass
    try:
        look = ray.remote(num_cpus=0)(_sees)
        refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(marker) for n in ray.nodes() if n.get("Alive")]
        seen = []
        with ray_calls():
            for ref in refs:
                try:
                    seen.append(ray.get(ref, timeout=120))
                except ray.exceptions.TaskUnschedulableError:  # a node that has just died: it will get no work
                    pass
    finally:
        os.remove(marker)
    blind = [host for host, sees in seen if not sees]
    if blind:
        raise InputError(f"{os.path.abspath(folder)} is not visible from node(s) {', '.join(sorted(blind))}: on a "
                         "Ray cluster the output folder must be on storage every node shares (NFS, Lustre, ...)")


def _sees(path: str) -> tuple[str, bool]:
    return socket.gethostname(), os.path.exists(path)

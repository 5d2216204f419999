"""How long a worker process lives: no longer than the driver, and what it starts no longer than it.

A local pool's workers (``local_pool.py``) call ``die_with_parent`` and ``guard_group`` first thing:
a worker dies with the driver however the driver dies, SIGKILL included (Linux's parent-death
signal), and whatever the worker starts (a library's processes, a tool) dies with the worker.
``stopping`` is the driver's side: while it ends its workers after a Ctrl-C or SIGTERM, another one
ends it at once. A private local Ray that the driver starts ends with it too
(``guard_private_ray``); on a cluster, Ray ends a lost driver's work itself. On other systems than
Linux these do nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator


def die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this process when its parent, the process ``parent``, dies, however it
    dies; end at once if it is gone already.

    The parent passes its PID: a spawned worker gets here only after its interpreter started and
    its imports ran, and a parent that died meanwhile has left it to a reaper, whose PID
    ``os.getppid`` would give instead (the worker would then wait for the reaper's death, running
    on). The check comes after the signal is set, so a death between the two is seen either way."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def guard_group() -> None:
    """Lead a process group of its own, and fork a guard that SIGKILLs that group as soon as this
    worker ends, however it ends.

    Why: the parent-death signal is set by the worker for itself and is not inherited, and a
    library's processes do not set theirs: a worker SIGKILLed (its parent-death signal after the
    driver was SIGKILLed) or SIGTERMed (``local_pool.end_pool`` on Ctrl-C) would leave what its
    task started running, writing into an output a rerun writes too. No stage's task starts
    processes today (download runs img2dataset's downloader in the worker); the guard costs one
    fork per worker and covers the one that will. Every process the worker starts, and every one
    those start, inherits its process group (unless it leaves on purpose with setsid or setpgid;
    torch and multiprocessing do not), so one kill of the group ends them all, however deep.
    Someone has to outlive the worker to send it: the guard, a forked child that only waits for its
    own parent-death signal. The simpler-looking ways fall short: a child subreaper keeps its
    orphans but does not end them when it dies itself; a library's pool takes no initializer
    through which its processes could set a parent-death signal; a PID namespace needs privileges.
    (Ray already starts each of its workers in a process group of its own, and the Ray tests see
    nothing of a cancelled task left.) tests/test_stop.py has a task start a process and SIGKILLs
    the driver.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        os.setpgid(0, 0)
    except OSError:  # a session leader (not started by our pool) cannot: nothing to guard
        return
    # In a group of its own the worker is a background job of a terminal the driver runs in; with
    # `stty tostop` a background job that writes to the terminal (logs, progress bars) is stopped,
    # unless it ignores SIGTTOU (an ignored signal stays ignored in the processes it starts).
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    worker, wake = os.getpid(), {signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, wake)  # before the fork: the guard cannot miss it
    if os.fork() == 0:  # the guard; the worker is still single-threaded here, the fork is safe
        try:
            libc.prctl(1, signal.SIGUSR1)  # 1: PR_SET_PDEATHSIG
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))  # holds no pipe the driver waits on
            if os.getppid() == worker:  # else the worker is gone already
                signal.sigwait(wake)
            os.killpg(0, signal.SIGKILL)  # the worker's group, the guard included
        finally:  # never back into the worker's code (a failing guard leaves the worker be)
            os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, wake)


@contextlib.contextmanager
def stopping() -> Iterator[None]:
    """While the driver ends its workers after a Ctrl-C or SIGTERM, another Ctrl-C or SIGTERM ends
    the driver at once: the signal's default action, the kernel's, which no busy Python code can
    delay. Its workers die with it all the same (parent-death signal and ``guard_group``; Ray's
    processes share the fate of the driver that started them, and a cluster ends a lost driver's
    tasks). Without this, a second Ctrl-C landing in ``local_pool.end_pool`` before the workers
    were ended would leave them running their shards, and the interpreter's exit would wait for
    them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, signal.SIG_DFL)
    try:
        yield
    finally:  # the stop goes on (the caller's own handlers again)
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)


PRIVATE_RAY_MARK = "LVERSE_PRIVATE_RAY"  # in the environment of every process of a driver's private Ray

# The guard of a private Ray: waits for the driver's end (a pidfd turns readable when the process
# exits, however it exits, whichever processes hold copies of its files) or for the end of its
# stdin, whose other end the driver holds, then SIGKILLs every process whose environment carries
# the mark, and goes on looking until none has been seen for 3 s: a process still starting one (a
# raylet restarting an agent it saw die) may not have died yet.
_RAY_GUARD = """
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
driver, mark = int(sys.argv[1]), sys.argv[2].encode()
ends = [sys.stdin]  # its end: the driver's end_private_ray, or its exit where there is no pidfd
try:
    ends.append(os.pidfd_open(driver))
except ProcessLookupError:  # gone already
    ends = []
except (AttributeError, OSError):  # no pidfd (Linux before 5.3)
    pass
if ends:
    select.select(ends, [], [])
quiet_since, began = time.monotonic(), time.monotonic()
while time.monotonic() - quiet_since < 3 and time.monotonic() - began < 60:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\\0"):
                    os.kill(int(pid), signal.SIGKILL)
                    quiet_since = time.monotonic()
        except OSError:
            pass
    time.sleep(0.1)
"""


class _Guard:
    """The guard process of this process's private Rays, started again whenever it dies (a kill
    meant for something else, the OOM killer) for as long as this process runs: without it, a
    driver killed after its guard would leave its Ray's agents and workers running."""

    def __init__(self, mark: str):
        import subprocess
        self.ending, self.lock = False, threading.Lock()
        # Never marked itself: one started again after the mark went into this process's environment
        # would otherwise inherit it, and kill itself among the marked before the Ray processes
        # started after it (a chaos round left two of Ray's agents so).
        self.start = lambda: subprocess.Popen(
            [sys.executable, "-c", _RAY_GUARD, str(os.getpid()), mark], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != PRIVATE_RAY_MARK})
        self.process = self.start()
        threading.Thread(target=self._keep, name="lverse-ray-guard", daemon=True).start()

    def _keep(self) -> None:
        while True:
            self.process.wait()
            with self.lock:
                if self.ending:
                    return
                self.process = self.start()

    def end(self) -> None:
        with self.lock:
            self.ending = True
        self.process.stdin.close()
        self.process.wait()


_ray_guard: _Guard | None = None


def guard_private_ray() -> None:
    """Before this process starts a private local Ray: mark the environment that Ray's processes
    inherit, and start a guard that ends every marked process once this one has ended.

    Why: Ray's own reaper ends the head's processes when the driver dies, but the agents the raylet
    starts (dashboard and runtime-env agents) outlive a SIGKILLed driver by a minute or more, and
    so would a worker whose raylet was SIGKILLed mid-start. The guard sits in a session of its own,
    so a Ctrl-C at a terminal or a kill of the driver's process group does not take it first; a
    driver that ends normally has shut Ray down already, and the guard then finds nothing. One
    guard per process, for every private Ray it starts. On other systems than Linux this does
    nothing.

    ``SPT_NOENV`` goes into the environment with the mark: Ray's agents set their process title
    (``ray::DashboardAgent``) with setproctitle, which by default writes the title over the memory
    that /proc/PID/environ reads, and the mark with it; with ``SPT_NOENV`` set it leaves the
    environment alone (the title is then at most as long as the original command line, which an
    agent's is)."""
    global _ray_guard
    if not sys.platform.startswith("linux") or _ray_guard is not None:
        return
    import secrets
    mark = f"{PRIVATE_RAY_MARK}={os.getpid()}-{secrets.token_hex(8)}"
    _ray_guard = _Guard(mark)
    os.environ[PRIVATE_RAY_MARK] = mark.split("=", 1)[1]
    os.environ["SPT_NOENV"] = "1"


def end_private_ray() -> None:
    """Do now what the guard does at this process's end: end every process of the private Rays it
    started (shut down, they have none left). For a process that goes on after its Ray work and
    must leave nothing running, such as a test session checking what its tests left."""
    global _ray_guard
    if _ray_guard is None:
        return
    _ray_guard.end()
    _ray_guard = None
    del os.environ[PRIVATE_RAY_MARK]


# -- a command's temporary folder ----------------------------------------------------------------

OWNER = "lverse-owner"  # in a command's temporary folder: "boot PID-namespace PID start-time" of the command


def own_temporary_folder() -> str | None:
    """Give this command, and every process it starts, a temporary folder of their own inside the
    system's (TMPDIR), and return it; ``end_temporary_folder`` removes it at the command's end.
    None where no folder can be made there (a full or read-only disk): the command then runs
    with the system's, and the first file it writes there says what is wrong.

    Why: libraries make temporary files in every process that imports them and remove them only
    at a normal interpreter exit (wandb, which img2dataset imports and timm tries, makes three
    folders at import), and a stage ends its workers with signals: each run left a few empty
    folders per worker in /tmp, and a SIGKILLed compiler its files. With one folder per command
    the command's end takes them all. A command that was SIGKILLed cannot remove its own: the next
    command on the machine removes every such folder whose owner is no longer running: a folder
    records its owner's PID with the process's start time (a reused PID is not taken for it), its
    PID namespace (a container's process is never taken for one of ours) and the machine's boot
    (a TMPDIR on storage that other machines share holds their commands' folders too).

    What must outlive the command stays where it would be without this: a private local Ray's
    session (RAY_TMPDIR: its logs are for reading afterwards, and its sockets' paths may be at
    most 107 bytes long) and TorchInductor's compiled kernels (TORCHINDUCTOR_CACHE_DIR, whose
    default is in the temporary folder: without it every run of a compiled model would compile
    again). Other caches that a library keeps in the temporary folder last one command."""
    import getpass
    import tempfile
    system = tempfile.gettempdir()
    _remove_abandoned(system)
    folder = None
    try:
        folder = tempfile.mkdtemp(prefix=f"lverse-{os.getpid()}-", dir=system)
        with open(os.path.join(folder, OWNER), "w") as f:
            f.write(_identity(os.getpid()) or "")
    except OSError:
        end_temporary_folder(folder)
        return None
    os.environ.setdefault("RAY_TMPDIR", os.environ.get("TMPDIR", "/tmp"))  # Ray's own choice of folder
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for the user (a container's): torch then names the uid
        user = f"uid_{os.getuid()}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(system, f"torchinductor_{user}"))  # its default
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = folder
    return folder


def end_temporary_folder(folder: str | None) -> None:
    """Remove the command's temporary folder (its processes have ended)."""
    import shutil
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _identity(pid: int) -> str | None:
    """"boot PID-namespace PID start-time" of a running process, or None once it has ended."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time after boot
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return f"{boot} {namespace} {pid} {start}"


def _remove_abandoned(system: str) -> None:
    """Remove the temporary folders of this machine's commands (this boot, this PID namespace)
    that are no longer running."""
    import glob
    here = _identity(os.getpid())
    if here is None:  # not Linux: owners cannot be checked
        return
    for owner in glob.glob(os.path.join(system, "lverse-*", OWNER)):
        try:
            with open(owner) as f:
                recorded = f.read().split()
        except OSError:  # removed meanwhile
            continue
        if len(recorded) == 4 and recorded[:2] == here.split()[:2] and recorded[2].isdigit() \
                and _identity(int(recorded[2])) != " ".join(recorded):
            end_temporary_folder(os.path.dirname(owner))

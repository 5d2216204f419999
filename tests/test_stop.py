"""Stopping a stage: Ctrl-C or SIGTERM ends the driver and its workers within seconds, keeps what
finished, and the same command continues; a SIGKILLed driver takes its workers with it."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from lverse.pipeline.encode import EncodeConfig, run_encode

from .test_encode import raw_shards, vae_path  # noqa: F401  (a debug AugVAE)

LVERSE = os.path.join(os.path.dirname(sys.executable), "lverse")
SHARDS = 16


def _processes(field: int, value: int) -> list[int]:
    """PIDs whose /proc stat ``field`` (3: parent, 5: session) is ``value``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[field - 2]) == value and stat[0] != "Z":
            found.append(int(pid))
    return found


@pytest.fixture()
def sessions():
    """Process sessions a test started; whatever of them is left at its end is killed, pass or fail."""
    started: list[int] = []
    yield started
    for session in started:
        for pid in _processes(5, session):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start_encode(tmp_path, vae, sessions, executor="local"):
    raw = raw_shards(str(tmp_path / "raw"), count=SHARDS, n=12)
    out = tmp_path / "tokens"
    proc = subprocess.Popen([LVERSE, "encode", "--shards", raw, "--vae", vae, "--output", str(out), "--workers", "1",
                             "--executor", executor], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    sessions.append(proc.pid)
    deadline = time.time() + 180
    while not glob.glob(str(out / "*_stats.json")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    workers = _processes(3, proc.pid)
    assert workers, "the driver has no worker process"
    return proc, raw, out


def _wait_gone(session: int, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while _processes(5, session) and time.time() < deadline:
        time.sleep(0.1)
    return _processes(5, session)


@pytest.mark.slow
@pytest.mark.parametrize("executor, sig", [("local", signal.SIGINT), ("local", signal.SIGTERM),
                                           ("ray", signal.SIGINT), ("ray", signal.SIGTERM)])
def test_a_signal_stops_the_stage_and_its_workers_and_a_rerun_continues(tmp_path, vae_path, sessions, executor,  # noqa: F811
                                                                       sig):
    proc, raw, out = _start_encode(tmp_path, vae_path, sessions, executor)
    stopped = time.time()
    if sig == signal.SIGINT:  # Ctrl-C in a terminal reaches the whole process group
        os.killpg(proc.pid, sig)
    else:  # SIGTERM from a scheduler or `kill`: the driver alone
        os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    assert code == 128 + sig, proc.stderr.read().decode()[-3000:]
    assert time.time() - stopped < 15
    assert _wait_gone(proc.pid, 5) == []
    done = len(glob.glob(str(out / "*_stats.json")))
    assert done < SHARDS  # the queue was cancelled, not worked off
    summary = run_encode(EncodeConfig(shards=raw, vae=vae_path, output=str(out)))
    assert (summary["skipped"], summary["done"]) == (done, SHARDS - done)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_workers_die_with_a_sigkilled_driver(tmp_path, vae_path, sessions, executor):  # noqa: F811
    """Every worker, local process or Ray actor, dies with the driver. Of the private local Ray the
    driver started, Ray's own node agents (dashboard and runtime-env agents, which run no lverse
    code) outlive it (Ray 2.x): the test ends them itself."""
    proc, _, _ = _start_encode(tmp_path, vae_path, sessions, executor)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while _workers_left(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert _workers_left(proc.pid) == []  # the agents are ended by the `sessions` fixture


RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def _workers_left(session: int) -> list[str]:
    left = []
    for pid in _processes(5, session):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").strip()
        except OSError:
            continue
        if not command.startswith(RAY_AGENTS):
            left.append(command.decode(errors="replace")[:120])
    return left

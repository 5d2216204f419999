"""Stopping a stage: Ctrl-C or SIGTERM ends the driver and its workers within seconds, keeps what
finished, and the same command continues; a SIGKILLed driver takes its workers, and whatever they
started, with it; a second Ctrl-C ends the driver at once.

Each stage runs as a user runs it, ``lverse download|encode|caption`` (in a session of its own, so
that every process it starts can be found), on inputs of several items that each take long enough
for a signal sent when the first is done to land mid-run: download fetches 3 chunks of 3 lines from
the local synthetic server, each chunk with one image that arrives past the timeout (so img2dataset
is seconds inside a shard); encode 16 shards of 12 images; caption 4 shards of 3 raw images with
the debug BiART and AugVAE and the tiny CLIP.
"""

from __future__ import annotations

import glob
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from .procs import alive, command_of, environ_of, pids, processes
from .test_encode import raw_shards

LVERSE = os.path.join(os.path.dirname(sys.executable), "lverse")
ITEMS = {"download": 3, "encode": 16, "caption": 4, "generate": 4}
# an item's done marker
DONE = {"download": "*_stats.json", "encode": "*_stats.json", "caption": "*.parquet", "generate": "*/result.json"}


def _open_under(folder) -> list[str]:
    """Files under ``folder`` that any process (of any session) has open: what is still being written."""
    folder, found = os.path.realpath(folder) + os.sep, []
    for pid in pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(folder):
                found.append(f"{pid}: {target}")
    return found


def _temporaries(folder) -> list[str]:
    """What a writer leaves while it writes: ``.NAME.*.tmp`` files, download's ``_tmp/``."""
    return [os.path.join(root, name) for root, dirs, files in os.walk(folder)
            for name in dirs + files if name.endswith(".tmp") or name == "_tmp"]


@pytest.fixture()
def sessions():
    """Process sessions a test started; whatever of them is left at its end is killed, pass or fail."""
    started: list[int] = []
    yield started
    for session in started:
        for pid in processes(session=session):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _command(stage: str, executor: str, tmp_path, request) -> list[str]:
    """``lverse STAGE`` on inputs of ``ITEMS[stage]`` items, writing to ``tmp_path/out``."""
    if stage == "download":
        tsv = _slow_chunks(request.getfixturevalue("server"), ITEMS["download"], tmp_path / "in.tsv")
        args = ["--input", str(tsv), "--samples-per-shard", "3", "--image-size", "64", "--timeout", "1.5",
                "--download-threads", "4"]
    elif stage == "encode":
        args = ["--shards", raw_shards(str(tmp_path / "raw"), count=ITEMS["encode"], n=12),
                "--vae", request.getfixturevalue("vae_path")]
    elif stage == "caption":
        files, checkpoint = request.getfixturevalue("data"), request.getfixturevalue("biart")
        args = ["--shards", raw_shards(str(tmp_path / "raw"), count=ITEMS["caption"], n=3), "--checkpoint", checkpoint,
                "--vae", files["vae"], "--tokenizer", files["tokenizer"], "--candidates", "4", "--max-tokens", "8",
                "--batch-size", "3", "--clip", "lverse-tiny"]
    else:  # generate: one prompt an item
        files, checkpoint = request.getfixturevalue("data"), request.getfixturevalue("biart")
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"a {c} circle\n" for c in ("red", "blue", "green", "yellow")[:ITEMS["generate"]]))
        args = ["--prompts", str(prompts), "--checkpoint", checkpoint, "--vae", files["vae"], "--tokenizer",
                files["tokenizer"], "--candidates", "4", "--prompts-per-item", "1", "--clip", "lverse-tiny"]
    return [LVERSE, stage, *args, "--output", str(tmp_path / "out"), "--workers", "1", "--executor", executor]


def _slow_chunks(srv, chunks: int, tsv):
    """A download list at ``tsv`` of ``chunks`` chunks of 3 lines: two images of ``srv``, then one
    that arrives past a timeout of a few seconds, so that each chunk takes that long."""
    lines = []
    for chunk in range(chunks):
        lines += [f"{srv.data.sample('train', i)[1]}\t{srv.url}/img/train/{i}.jpg" for i in (2 * chunk, 2 * chunk + 1)]
        lines.append(f"a picture that arrives too late\t{srv.url}/bad/slow.jpg")
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


def _start(command: list[str], stage: str, tmp_path, sessions, in_flight: bool = True) -> subprocess.Popen:
    """Start ``command`` and return once its first item is done, with the next in flight (for
    download, unless not ``in_flight``: once img2dataset writes into the next chunk's shard)."""
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    with open(log, "wb") as err:  # a file, not a pipe: a pipe nobody reads would block a chatty stage
        proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err,
                                env=_temporary_folder(tmp_path))
    sessions.append(proc.pid)
    deadline = time.time() + 240
    while not glob.glob(str(out / DONE[stage])) or (stage == "download" and in_flight and
                                                     not _open_under(out / "_tmp")):
        assert proc.poll() is None and time.time() < deadline, _tail(log)
        time.sleep(0.05)
    assert processes(parent=proc.pid), "the driver has no worker process"
    return proc


def _temporary_folder(tmp_path) -> dict:
    """The environment of a stage whose temporary folder (TMPDIR) is ``tmp_path/tmp``, empty. A
    private local Ray's session stays where it is (RAY_TMPDIR): its sockets' paths may be at most
    107 bytes long, and it keeps its logs."""
    os.makedirs(tmp_path / "tmp", exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp_path / "tmp"), RAY_TMPDIR=tempfile.gettempdir())


def _temporaries_left(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "tmp"))


def _tail(log) -> str:
    with open(log, "rb") as f:
        return f.read().decode(errors="replace")[-3000:]


def _wait_gone(session: int, seconds: float) -> list[str]:
    """The command lines of what is left of ``session`` after up to ``seconds``."""
    deadline = time.time() + seconds
    while processes(session=session) and time.time() < deadline:
        time.sleep(0.1)
    return [command[:120] for command in _commands(session)]


# Encode is stopped with each signal on each executor. Download, caption and generate take two of
# those four each, so that each meets both signals and both executors: what the driver does on
# either signal is the CLI's and the same for every stage (encode's four show it), what happens to
# the workers is the executor's (a local pool, Ray tasks for download, Ray actors for the model
# stages) and the stage's (img2dataset's threads, a model in each worker).
STOPS = [("encode", "local", signal.SIGINT), ("encode", "local", signal.SIGTERM), ("encode", "ray", signal.SIGINT),
         ("encode", "ray", signal.SIGTERM), ("download", "local", signal.SIGINT), ("download", "ray", signal.SIGTERM),
         ("caption", "local", signal.SIGTERM), ("caption", "ray", signal.SIGINT), ("generate", "local", signal.SIGINT),
         ("generate", "ray", signal.SIGTERM)]


@pytest.mark.slow
@pytest.mark.parametrize("stage, executor, sig", [pytest.param(*stop, id=f"{stop[0]}-{stop[1]}-{stop[2].name}")
                                                  for stop in STOPS])
def test_a_signal_stops_the_stage_and_its_workers_and_a_rerun_continues(tmp_path, request, sessions, stage, executor,
                                                                       sig):
    command = _command(stage, executor, tmp_path, request)
    out = tmp_path / "out"
    proc = _start(command, stage, tmp_path, sessions)
    stopped = time.time()
    if sig == signal.SIGINT:  # Ctrl-C in a terminal reaches the whole process group
        os.killpg(proc.pid, sig)
    else:  # SIGTERM from a scheduler or `kill`: the driver alone
        os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    assert code == 128 + sig, _tail(tmp_path / "stderr.log")
    assert time.time() - stopped < 15
    assert _wait_gone(proc.pid, 5) == []
    assert _open_under(out) == []
    finished = {path: os.stat(path).st_mtime_ns for path in glob.glob(str(out / DONE[stage]))}
    assert len(finished) < ITEMS[stage]  # the queue was cancelled, not worked off

    # The same command finishes the rest; what was done is not done again, nothing the stop left trips it.
    rerun = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=_temporary_folder(tmp_path))
    sessions.append(rerun.pid)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode(errors="replace")[-3000:]
    assert _temporaries_left(tmp_path) == []
    with open(out / "_summary.json") as f:
        summary = json.load(f)
    assert (summary["skipped"], summary["done"], summary["failed"]) == (len(finished), ITEMS[stage] - len(finished), [])
    assert {path: os.stat(path).st_mtime_ns for path in finished} == finished
    assert _temporaries(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("stage, executor", [("download", "local"), ("encode", "local"), ("caption", "local"),
                                             ("generate", "local"), ("encode", "ray")])
def test_workers_die_with_a_sigkilled_driver(tmp_path, request, sessions, stage, executor):
    """Every worker, local process or Ray actor, dies with the driver, in the middle of an item (a
    download in the middle of a shard), the private local Ray's node agents (dashboard and
    runtime-env, which run no lverse code) included: lverse's guard ends them
    (runtime/lifetime.py), and the guard is started again when it is killed first."""
    proc = _start(_command(stage, executor, tmp_path, request), stage, tmp_path, sessions)
    if executor == "ray":
        (guard,) = _ray_guards(proc.pid)
        os.kill(guard, signal.SIGKILL)
        deadline = time.time() + 10
        while _ray_guards(proc.pid) in ([], [guard]):
            assert time.time() < deadline, "the private Ray's guard was not started again"
            time.sleep(0.05)
        (again,) = _ray_guards(proc.pid)
        assert "LVERSE_PRIVATE_RAY" not in environ_of(again)  # else it would end itself among the marked
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait_gone(proc.pid, 10) == []
    assert _open_under(tmp_path / "out") == []


# A driver that starts a worker and dies while the worker is still starting (a spawned process
# imports before its initializer runs): the worker, reparented by then, must still end.
DIES_DURING_START = textwrap.dedent("""
    import os, subprocess, sys
    worker = ("import sys, time; time.sleep(1); from lverse.runtime.lifetime import die_with_parent; "
              "die_with_parent(int(sys.argv[1])); print('worker running', flush=True); time.sleep(60)")
    with open(sys.argv[1], "w") as out:
        started = subprocess.Popen([sys.executable, "-c", worker, str(os.getpid())], stdout=out)
    print(started.pid, flush=True)
    os._exit(0)
""")


def test_a_worker_whose_driver_died_while_it_started_ends(tmp_path):
    log = tmp_path / "worker.log"
    out = subprocess.run([sys.executable, "-c", DIES_DURING_START, str(log)], capture_output=True, text=True,
                         timeout=60, check=True)
    worker = int(out.stdout)
    try:
        deadline = time.time() + 15
        while alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(worker), "the worker outlived its driver"
        assert log.read_text() == ""  # it never ran its work
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


# A driver whose one worker's task starts a process of its own (a library's pool, a tool) and waits for it.
STARTS_A_PROCESS = textwrap.dedent("""
    import subprocess
    from lverse.runtime.local_pool import LocalPool
    from lverse.runtime.tasks import run_tasks
    print("running", flush=True)
    run_tasks(subprocess.call, [["sleep", "600"]], ["a"], LocalPool(1), retries=0)
""")


@pytest.mark.slow
def test_what_a_worker_started_dies_with_a_sigkilled_driver(sessions):
    """A SIGKILLed driver's worker dies (its parent-death signal), and so does the process that the
    worker's task started, which no parent-death signal reaches (the worker's guard)."""
    proc = subprocess.Popen([sys.executable, "-c", STARTS_A_PROCESS], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sessions.append(proc.pid)
    assert _line(proc) == "running"
    deadline = time.time() + 60
    while "sleep 600" not in _commands(proc.pid):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait_gone(proc.pid, 10) == []


def _commands(session: int) -> list[str]:
    """The command lines (arguments joined by spaces) of the processes in ``session``."""
    return [command for command in map(command_of, processes(session=session)) if command]


# A driver whose stop is slow (its end of the workers delayed by 30 s), its one worker busy for a
# minute. Its SIGTERM is Ctrl-C, as in the CLI.
SLOW_STOP = textwrap.dedent("""
    import signal, sys, time
    from lverse.runtime import local_pool
    from lverse.runtime.tasks import run_tasks

    def slow(pool, grace=3.0):
        print("stopping", flush=True)
        time.sleep(30)
        end(pool, grace)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    end, local_pool.end_pool = local_pool.end_pool, slow
    signal.signal(signal.SIGTERM, terminate)
    print("running", flush=True)
    run_tasks(time.sleep, [60, 60], ["a", "b"], local_pool.LocalPool(1), retries=0)
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_ends_the_driver_at_once_and_its_workers_with_it(sessions, sig):
    """While the driver ends its workers after a first Ctrl-C (SIGTERM), a second one ends it at
    once: it does not wait for that stop (nor, as it did, for the shards in flight when it landed
    before the workers were ended), and the workers die with it."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STOP], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sessions.append(proc.pid)
    assert _line(proc) == "running"
    deadline = time.time() + 60
    while not [pid for pid in processes(parent=proc.pid) if processes(parent=pid)]:  # a worker, and its guard
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    assert _line(proc) == "stopping"
    second = time.time()
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=10) == -sig  # ended by the signal itself
    assert time.time() - second < 2
    assert _wait_gone(proc.pid, 5) == []


def test_a_sigterm_that_lands_in_a_wait_on_ray_stays_a_sigterm():
    """Ray turns what a signal handler raises while it waits (ray.wait, ray.get) into a plain
    KeyboardInterrupt; the driver's own exception (the CLI's for SIGTERM) is put back, so that the
    CLI still tells SIGTERM (exit status 143) from Ctrl-C (130)."""
    from lverse.runtime.ray_cluster import keeping, ray_calls

    class Terminated(KeyboardInterrupt):
        pass

    def terminate(signum, frame):
        raise Terminated()

    def stopped_by(sig) -> type:  # what leaves a wait on Ray that the signal interrupted
        try:
            with ray_calls():
                try:
                    signal.raise_signal(sig)
                except KeyboardInterrupt:  # as Ray does
                    raise KeyboardInterrupt() from None
        except KeyboardInterrupt as e:  # caught here: one escaping would stop pytest, not fail the test
            return type(e)
        return type(None)

    previous = signal.signal(signal.SIGTERM, keeping(terminate))
    try:
        assert stopped_by(signal.SIGTERM) is Terminated
        assert stopped_by(signal.SIGINT) is KeyboardInterrupt
    finally:
        signal.signal(signal.SIGTERM, previous)


def _line(proc: subprocess.Popen, seconds: float = 60) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    assert ready, "no output"
    return proc.stdout.readline().decode().strip()


@pytest.mark.slow
@pytest.mark.parametrize("stage, executor", [("download", "local"), ("encode", "local"), ("caption", "ray")])
def test_a_second_ctrl_c_stops_a_stage_at_once(tmp_path, request, sessions, stage, executor):
    """Ctrl-C twice, the second while the first is being handled: the stage ends within a second
    or two of it, and nothing of it is left. (On Ray the first takes seconds: Ray's shutdown.)"""
    proc = _start(_command(stage, executor, tmp_path, request), stage, tmp_path, sessions, in_flight=False)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5 if executor == "ray" else 0.05)
    second = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) in (130, -signal.SIGINT), _tail(tmp_path / "stderr.log")
    assert time.time() - second < 3
    assert _wait_gone(proc.pid, 5) == []
    assert _open_under(tmp_path / "out") == []



@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_train_vae_at_a_checkpoint_and_a_rerun_goes_on_from_it(data, tmp_path, sessions, sig):
    """`lverse train-vae` (one process and its DataLoader workers, no executor: not a Ray stage,
    nor is `lverse train`, whose stops are tests/test_train.py's and test_slurm.py's) stopped by
    Ctrl-C at a terminal (the whole group: the workers ignore it) or SIGTERM to the driver alone,
    between regular checkpoints: it checkpoints the step it is at and exits 0 within seconds, as
    `lverse train` does, saying so in stopped.json; nothing of it is left; the same command goes on
    from that step, trains no step twice, and writes both models."""
    import yaml
    run = tmp_path / "run"
    config = tmp_path / "vae.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "shards": data["raw"], "preset": "tiny-ml", "ml_steps": 4, "sl_steps": 1,
        "batch_size": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "workers": 2, "perceptual_weight": 0.0}))
    command = [LVERSE, "train-vae", "--config", str(config)]

    def steps() -> list[int]:
        if not (run / "metrics.jsonl").exists():
            return []
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"event"' not in line]
    with open(tmp_path / "stderr.log", "wb") as err:
        proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err,
                                env=dict(os.environ, LVERSE_HOLD_AT_STEP="3"))
    sessions.append(proc.pid)
    deadline = time.time() + 240
    while 3 not in steps():  # then it holds after step 3, until the signal
        assert proc.poll() is None and time.time() < deadline, _tail(tmp_path / "stderr.log")
        time.sleep(0.05)
    assert len(processes(parent=proc.pid)) >= 2, "no DataLoader workers running"
    stopped = time.time()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) == 0, _tail(tmp_path / "stderr.log")
    assert time.time() - stopped < 15
    assert _wait_gone(proc.pid, 5) == []
    assert json.loads((run / "stopped.json").read_text()) == {"step": 3, "signal": sig.name}
    assert f"{sig.name} received: checkpointed at step 3 and stopping" in _tail(tmp_path / "stderr.log")
    assert (run / "checkpoints" / "step_00000003" / "lverse.json").is_file()
    assert not (run / "augvae-ml.safetensors").exists()

    # A restart that fails removes the record of the stop all the same: a job script finding it
    # would take the failure for another stop and requeue the job for ever.
    good = config.read_text()
    config.write_text(good.replace(data["raw"], str(tmp_path / "missing")))
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "matches no image shard" in failed.stderr, failed.stderr[-3000:]
    assert not (run / "stopped.json").exists()
    config.write_text(good)

    rerun = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sessions.append(rerun.pid)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode(errors="replace")[-3000:]
    assert steps() == [1, 2, 3, 4, 5]
    assert (run / "augvae-ml.safetensors").is_file() and (run / "augvae-sl.safetensors").is_file()


@pytest.mark.slow
def test_a_signal_stops_pipeline_run_in_any_stage_and_the_same_command_finishes(tmp_path, server, vae_path, sessions):
    """`lverse pipeline run` on a private local Ray, stopped twice: SIGTERM in its download stage
    (a chunk done, the next in flight), Ctrl-C once its encode stage starts (the tokenizer fitted,
    the encode actors starting). Each time it exits with the signal's status within seconds,
    nothing of it is left, and the stopped stage has no done marker while the stages before it
    keep theirs; the third run finishes from there, downloading only the chunks that were not
    done and fitting no tokenizer again."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps({
        "run_dir": str(tmp_path / "out"), "tokenizer": {"vocab_size": 40},
        "download": {"input": str(_slow_chunks(server, 4, tmp_path / "in.tsv")), "samples_per_shard": 3,
                     "image_size": 64, "timeout": 1.5, "download_threads": 4, "workers": 1},
        "encode": {"vae": vae_path, "batch_size": 4, "workers": 1}}))
    command, out, log = [LVERSE, "pipeline", "run", str(config)], tmp_path / "out", tmp_path / "stderr.log"

    def stop_when(ready, sig) -> None:
        with open(log, "wb") as err:
            proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err,
                                    env=_temporary_folder(tmp_path))
        sessions.append(proc.pid)
        deadline = time.time() + 240
        while not ready():
            assert proc.poll() is None and time.time() < deadline, _tail(log)
            time.sleep(0.02)
        stopped = time.time()
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) == 128 + sig, _tail(log)
        assert time.time() - stopped < 15
        assert _wait_gone(proc.pid, 5) == []
        assert _open_under(out) == []

    stop_when(lambda: glob.glob(str(out / "shards" / "*_stats.json")) and _open_under(out / "shards" / "_tmp"),
              signal.SIGTERM)
    assert not (out / "_done").exists()
    downloaded = {path: os.stat(path).st_mtime_ns for path in glob.glob(str(out / "shards" / "*_stats.json"))}
    assert 0 < len(downloaded) < 4
    stop_when(lambda: (out / "_done" / "tokenizer.json").exists(), signal.SIGINT)
    assert sorted(os.listdir(out / "_done")) == ["download.json", "tokenizer.json"]
    tokenizer = (out / "tokenizer.model").stat().st_mtime_ns

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_temporary_folder(tmp_path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(os.listdir(out / "_done")) == ["download.json", "encode.json", "tokenizer.json"]
    with open(out / "shards" / "_summary.json") as f:
        summary = json.load(f)
    assert (summary["skipped"], summary["done"]) == (len(downloaded), 4 - len(downloaded)), summary
    assert {path: os.stat(path).st_mtime_ns for path in downloaded} == downloaded
    assert (out / "tokenizer.model").stat().st_mtime_ns == tokenizer
    assert len(glob.glob(str(out / "tokens" / "*.tar"))) == 4
    assert _temporaries_left(tmp_path) == [] and _temporaries(out) == []


# What of the private local Ray is killed mid-stage, and what the stage then says. Encode: the
# node (its raylet, and the workers on it: an actor alone would go on with the shards it was given,
# which need no raylet, and the stage could finish); download: its GCS and raylet (its tasks in
# flight finish without either, the next ones can never start).
LOST = {"encode": (("ray::", "/raylet/raylet "), "the private local Ray's node died (its raylet ended)"),
        "download": (("/gcs_server ", "/raylet/raylet "), "the private local Ray's GCS died")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(LOST))
def test_a_stage_whose_private_ray_lost_its_node_fails_at_once(tmp_path, request, sessions, stage):
    """Processes of the private local Ray the driver started die mid-stage (the OOM killer, a
    kill): no node will ever come back, so the stage fails within seconds with one line saying so
    and to run the same command again, rather than wait for one (actors for ``ray_wait``, 15
    minutes; download's tasks for ever; with its GCS gone, until Ray ends the driver itself 60 s
    later); nothing of it is left, and the rerun finishes. Found by the chaos hunts of `lverse
    pipeline run`."""
    command = _command(stage, "ray", tmp_path, request)
    proc = _start(command, stage, tmp_path, sessions, in_flight=False)
    marks, said = LOST[stage]
    victims = [pid for pid in processes(session=proc.pid) if any(mark in command_of(pid) for mark in marks)]
    assert sum("/raylet/raylet " in command_of(pid) for pid in victims) == 1
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed = time.time()
    assert proc.wait(timeout=120) == 1, _tail(tmp_path / "stderr.log")
    assert time.time() - killed < 40
    last = _tail(tmp_path / "stderr.log").strip().splitlines()[-1]
    assert f"{said}: nothing more can run on it; run the same command again" in last, last
    assert _wait_gone(proc.pid, 10) == []
    rerun = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=_temporary_folder(tmp_path))
    sessions.append(rerun.pid)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode(errors="replace")[-3000:]


@pytest.mark.slow
def test_a_private_ray_that_does_not_start_fails_the_stage_on_one_line(tmp_path, request, sessions):
    """The private local Ray's GCS killed while Ray starts (the OOM killer, a chaos hunt's kill):
    Ray raises a bare Exception with its traceback after waiting for the GCS's port (30 s; 3 s
    here); the stage fails with status 1 on one line saying to run it again and where Ray's logs
    are, and nothing that Ray started is left. Found by the chaos hunt of `lverse pipeline run`."""
    command = _command("encode", "ray", tmp_path, request)
    env = dict(_temporary_folder(tmp_path), RAY_gcs_server_port_wait_time_s="3")
    with open(tmp_path / "stderr.log", "wb") as err:
        proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, env=env)
    sessions.append(proc.pid)
    deadline, killed = time.time() + 120, False
    while not killed:
        assert proc.poll() is None and time.time() < deadline, _tail(tmp_path / "stderr.log")
        for pid in processes(session=proc.pid):
            if "/gcs_server " in command_of(pid):
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.01)
    assert proc.wait(timeout=60) == 1, _tail(tmp_path / "stderr.log")
    err = _tail(tmp_path / "stderr.log")
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "the private local Ray did not start (" in last and "run the same command again" in last, last
    assert "session_latest/logs" in last, last
    assert _wait_gone(proc.pid, 10) == []
    assert _temporaries_left(tmp_path) == []


def _ray_guards(driver: int) -> list[int]:
    """The live guards of the private Rays of ``driver`` (runtime/lifetime.py: a ``python -c``
    script given the driver's PID and its mark; a dead one's command line is empty)."""
    return [pid for pid in pids() if f" {driver} LVERSE_PRIVATE_RAY={driver}-" in command_of(pid)]

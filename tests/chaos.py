"""A seeded chaos harness: kill any process of a stage at random moments, run it again until it
finishes, and check that nothing outlived a killed run and that the outputs are those of a run
never killed.

One *round* starts the stage's command (``lverse STAGE ...``, as a user runs it) in a session of
its own, with a marker in its environment, and at moments drawn from the seed (within the first
``REACH`` of an uninterrupted run's duration) SIGKILLs a process drawn from those of the session
then alive: the driver, a pool worker, a worker's guard, multiprocessing's resource tracker, a
DataLoader worker, img2dataset's processes, a private local Ray's (raylet, GCS, agents, workers,
lverse's guard of it). A moment that finds the driver alone (importing, loading) waits
until it has started another process: a driver killed before it started anything leaves nothing
to find. A round ends when its driver has ended (killed, failed because a worker died, or
finished). Then every process of the session, or carrying the marker, must be gone within
``GRACE`` seconds; one still there is an *orphan*, counted, named and killed. A round whose
driver finished (the kills spared it, or it retried what they failed) is checked as the final run
is, and the next round starts from an empty output folder. After the rounds the same command runs
until it succeeds; its outputs must equal, byte for byte, those of an uninterrupted run of the
same command into another folder (training: the exported weights and every logged loss), and no
temporary file may be left in them.

``python benchmarks/chaos.py --stage S --rounds N --seed K`` runs it for longer hunts;
tests/test_chaos.py runs one round of every stage. Every kill is printed with its round, its
moment and its victim, and the seed with the stage, so that a failure can be replayed (the moment
a kill lands and which processes exist then depend on the machine's speed: a replay draws the
same moments and the same index into the list of live processes).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import yaml

from .procs import alive, command_of, environ_of, pids, processes, stat

LVERSE = os.path.join(os.path.dirname(sys.executable), "lverse")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "LVERSE_CHAOS_RUN"  # in the environment of every process a round starts, however deep
GRACE = 5.0  # seconds a process of a killed run may outlive its driver
# Kills land within this share of an uninterrupted run's duration: a run from an empty output may
# be faster than the first (warm caches), and a kill drawn past its end would land on nothing. A
# round that started from an empty output and finished without a kill is such a run too: the
# shortest of them is the duration (the first run of a stage on a private Ray starts Ray cold).
REACH = 0.8
STAGES = ("encode", "caption", "generate", "download", "train", "train-vae", "pipeline")


@dataclasses.dataclass
class Stage:
    """A stage's command for an output folder, and what of that folder must come out identical."""
    name: str
    command: Callable[[str], list[str]]  # output folder -> the command line
    outputs: Callable[[str], dict[str, str]]  # output folder -> {relative path or item: sha256}
    duration: float = 10.0  # seconds of an uninterrupted run: kills land within it


@dataclasses.dataclass
class Result:
    stage: str
    seed: int
    rounds: int = 0
    kills: int = 0
    orphans: list[str] = dataclasses.field(default_factory=list)  # "round R: PID COMMAND"
    temporaries: list[str] = dataclasses.field(default_factory=list)
    hangs: list[str] = dataclasses.field(default_factory=list)  # killed runs whose driver never ended
    # rounds whose driver failed (not killed) without lverse's one line last: a traceback, or Ray's
    # own exit; a finding to read, not a failure (some of Ray's are out of lverse's reach)
    unexplained: list[str] = dataclasses.field(default_factory=list)
    differences: list[str] = dataclasses.field(default_factory=list)
    reruns: int = 0  # runs after the rounds until one succeeded
    victims: dict[str, int] = dataclasses.field(default_factory=dict)  # kills by the victim's role
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return not self.differences

    def lines(self) -> list[str]:
        """The benchmark's ``name=value`` lines."""
        return [f"chaos_stage={self.stage}", f"chaos_seed={self.seed}", f"chaos_rounds={self.rounds}",
                f"chaos_kills={self.kills}", f"chaos_orphans={len(self.orphans)}",
                f"chaos_temporaries={len(self.temporaries)}", f"chaos_hangs={len(self.hangs)}",
                f"chaos_unexplained_failures={len(self.unexplained)}",
                f"chaos_outputs_identical={self.identical}",
                f"chaos_seconds={self.seconds:.0f}",
                "chaos_victims=" + ",".join(f"{role}:{n}" for role, n in sorted(self.victims.items()))]


# -- processes -----------------------------------------------------------------------------------

def members(session: int, marker: str) -> list[int]:
    """Live processes (not zombies) of ``session``, or carrying ``marker`` in their environment
    (one that left the session on purpose), sorted."""
    marked = [pid for pid in pids() if environ_of(pid).get(MARK) == marker and pid != os.getpid()]
    return sorted(set(processes(session=session)) | set(filter(alive, marked)))


def role(pid: int, driver: int) -> str:
    """What a process of a run is, for the kill schedule and the tally of victims."""
    if pid == driver:
        return "driver"
    command, fields = command_of(pid), stat(pid)
    parent = int(fields[1]) if fields else 0
    if "resource_tracker" in command:
        return "resource tracker"
    if _private_ray_guard(pid):
        return "private Ray's guard"
    if command.startswith("ray::"):  # a Ray worker or agent, by the name Ray gives its process
        return f"Ray's {command.split(' ')[0].removeprefix('ray::')}"
    if "/site-packages/ray/" in command:  # the head's own processes: gcs_server, raylet, dashboard, monitors
        return "Ray's " + os.path.basename(next(word for word in command.split(" ") if "/site-packages/ray/" in word))
    if parent == driver:
        if command == command_of(driver):  # a DataLoader worker, or a child not yet at its exec
            return "driver's fork"
        return "pool worker" if "multiprocessing" in command else "driver's child"
    if "multiprocessing" in command and command == command_of(parent):
        return "worker's fork (guard)"
    return f"other ({os.path.basename(command.split(' ')[0])})"


def _private_ray_guard(pid: int) -> bool:
    """Whether ``pid`` is lverse's guard of a private local Ray (runtime/lifetime.py), which has
    the Ray's mark among its arguments."""
    from lverse.runtime.lifetime import PRIVATE_RAY_MARK
    return f"{PRIVATE_RAY_MARK}=" in command_of(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the harness ---------------------------------------------------------------------------------

def run_once(command: list[str], log_path: str, timeout: float = 600) -> tuple[int, list[str]]:
    """The command to its end, its output to ``log_path``; its exit status, and what of its
    session was still alive ``GRACE`` seconds after it ended (killed then)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=timeout)
        ended = time.time()
        while members(proc.pid, "-") and time.time() - ended < GRACE:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            _kill(proc.pid)
            proc.wait()
        left = [f"{pid} [{role(pid, proc.pid)}] {command_of(pid)}" for pid in members(proc.pid, "-")]
        for pid in members(proc.pid, "-"):
            _kill(pid)
    return code, left


def chaos(stage: Stage, folder: str, rounds: int, seed: int, kills_per_round: int = 3,
          say: Callable[[str], None] = print, timeout: float = 600) -> Result:
    """``rounds`` rounds of ``kills_per_round`` kills of ``stage`` writing into ``folder/out``,
    then the same command until it succeeds, compared with an uninterrupted run into
    ``folder/reference``."""
    started = time.time()
    result = Result(stage.name, seed)
    rng = random.Random(f"{stage.name}:{seed}")
    out, reference, log = (os.path.join(folder, name) for name in ("out", "reference", "log.txt"))
    say(f"chaos {stage.name}: seed {seed}, {rounds} rounds of {kills_per_round} kills; log {log}")
    begin = time.time()
    code, left = run_once(stage.command(reference), log, timeout)
    result.orphans += [f"the uninterrupted run: {orphan}" for orphan in left]
    if code != 0:
        raise RuntimeError(f"the uninterrupted run of {stage.name} failed ({code}): see {log}")
    stage.duration = time.time() - begin
    expected = stage.outputs(reference)
    if not expected:
        raise RuntimeError(f"the uninterrupted run of {stage.name} left no outputs to compare: see {log}")
    for r in range(1, rounds + 1):
        result.rounds += 1
        moments = sorted(rng.uniform(0, REACH * stage.duration) for _ in range(kills_per_round))
        picks = [rng.random() for _ in moments]
        fresh, round_began = not os.path.exists(out), time.time()
        kills, code = _round(stage, out, log, r, moments, picks, result, say, timeout)
        result.kills += kills
        if fresh and kills == 0 and code == 0:  # an uninterrupted run after all: kills land within the shorter
            stage.duration = min(stage.duration, time.time() - round_began)
        if code == 0:  # the stage finished in spite of the kills: check it, and start the next round afresh
            _check(stage, out, expected, f"round {r}", result)
            shutil.rmtree(out)
    for attempt in range(5):
        result.reruns += 1
        code, left = run_once(stage.command(out), log, timeout)
        result.orphans += [f"rerun {attempt + 1}: {orphan}" for orphan in left]
        if code == 0:
            _check(stage, out, expected, "the final run", result)
            break
        say(f"chaos {stage.name}: rerun {attempt + 1} after the rounds failed ({code}); again")
    else:
        result.differences.append(f"no rerun succeeded: see {log}")
    result.seconds = time.time() - started
    for line in result.lines():
        say(line)
    for problem in result.orphans + result.temporaries + result.hangs + result.differences + result.unexplained:
        say(f"chaos {stage.name}: {problem}")
    return result


def _check(stage: Stage, out: str, expected: dict[str, str], when: str, result: Result) -> None:
    """A finished output: no temporaries, and ``expected``'s contents."""
    result.temporaries += [f"{when}: {path}" for path in temporaries(out)]
    found = stage.outputs(out)
    for name in sorted(set(found) | set(expected)):
        if found.get(name) != expected.get(name):
            result.differences.append(f"{when}: {name}: {found.get(name, 'missing')[:12]} after kills, "
                                      f"{expected.get(name, 'missing')[:12]} uninterrupted")


def _round(stage: Stage, out: str, log: str, r: int, moments: list[float], picks: list[float], result: Result,
           say: Callable[[str], None], timeout: float) -> tuple[int, int]:
    """One round; the number of kills sent, and the driver's exit status."""
    marker = uuid.uuid4().hex
    with open(log, "ab") as f:
        f.write(f"\n=== round {r}\n".encode())
        f.flush()
        began_at = f.tell()
        proc = subprocess.Popen(stage.command(out), start_new_session=True, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, MARK: marker})
    driver, start, kills, killed = proc.pid, time.time(), 0, set()
    try:
        for moment, pick in zip(moments, picks):
            while time.time() - start < moment and proc.poll() is None:
                time.sleep(0.01)
            if proc.poll() is not None:
                say(f"round {r}: the driver ended ({proc.returncode}) before the kill at {moment:.2f} s")
                break
            alive = [pid for pid in members(driver, marker) if pid not in killed]  # the killed may still be dying
            # Starting up: wait for what it starts. Or ending: every other process killed or gone,
            # and the driver itself no longer listed (a zombie) before its status can be read.
            while set(alive) <= {driver} and proc.poll() is None:
                time.sleep(0.01)
                alive = [pid for pid in members(driver, marker) if pid not in killed]
            if proc.poll() is not None:
                break
            victim = alive[int(pick * len(alive))]
            what = role(victim, driver)
            result.victims[what] = result.victims.get(what, 0) + 1
            say(f"round {r}: at {time.time() - start:.2f} s (drawn {moment:.2f} s) SIGKILL {victim} "
                f"[{what}] {command_of(victim)[:100]} ({len(alive)} alive)")
            _kill(victim)
            killed.add(victim)
            kills += 1
            if victim == driver:
                break
        try:
            code = proc.wait(timeout=max(1.0, timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:  # a hang: a finding, not the end of the hunt
            result.hangs.append(f"round {r}: the driver ran past {timeout:g} s after its kills; SIGKILLed")
            say(result.hangs[-1])
            _kill(driver)
            code = proc.wait()
        ended = time.time()
        say(f"round {r}: the driver ended with {code} after {ended - start:.1f} s")
        if code not in (0, -signal.SIGKILL):
            why = _failure(log, began_at)
            if why:
                result.unexplained.append(f"round {r}: status {code}: {why}")
                say(result.unexplained[-1])
        while members(driver, marker) and time.time() - ended < GRACE:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            _kill(driver)
            proc.wait()
        left = members(driver, marker)
        for pid in left:
            result.orphans.append(f"round {r}: {pid} [{role(pid, driver)}] {command_of(pid)}")
            say(f"orphan: {result.orphans[-1]}")  # now, so that a hunt cut short still shows it
            _kill(pid)
    return kills, proc.returncode


def _failure(log: str, offset: int) -> str | None:
    """Why a failed run's output, from ``offset`` of ``log``, is not lverse's failure as a user
    should see it (one line, last, from the CLI): its last line, or None when it is that."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    if "Traceback (most recent call last)" in text or " ERROR lverse: " not in last:
        return last[:200]
    return None


def temporaries(folder: str) -> list[str]:
    """What a writer leaves while it writes: ``.tmp`` files, download's ``_tmp/``."""
    return [os.path.join(root, name) for root, dirs, files in os.walk(folder)
            for name in dirs + files if name.endswith(".tmp") or name == "_tmp"]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_of(folder: str, *patterns: str) -> dict[str, str]:
    return {os.path.relpath(path, folder): sha256(path) for pattern in patterns
            for path in sorted(glob.glob(os.path.join(folder, pattern)))}


def _losses(run_dir: str) -> dict[str, str]:
    """Every logged loss of a run, by step: a step logged twice (before a kill and after the
    resume) must have logged the same both times, else it shows as a difference."""
    found: dict[int, set[str]] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            losses = {k: v for k, v in m.items() if "loss" in k or k.endswith(("/ref", "/gen", "mse", "commit"))}
            found.setdefault(m["step"], set()).add(json.dumps(losses, sort_keys=True))
    return {f"step {step} losses": hashlib.sha256("|".join(sorted(lines)).encode()).hexdigest()
            for step, lines in found.items()}


# -- the stages, on the test suite's small inputs ------------------------------------------------

def stage(name: str, folder: str, files: dict, workers: int = 2) -> Stage:
    """``name``'s command on small inputs made in ``folder`` from ``files``: ``vae`` (a debug-sl
    AugVAE), ``data`` (conftest's ``data``: raw and token shards, tokenizer), ``biart`` (a debug
    BiART), ``server`` (a running SyntheticServer). A stage with a pool runs ``workers`` local
    workers; training runs ``workers`` DataLoader workers."""
    from .test_encode import raw_shards
    os.makedirs(folder, exist_ok=True)
    local = ["--workers", str(workers), "--executor", "local"]
    if name == "encode":
        raw = raw_shards(os.path.join(folder, "raw"), count=6, n=12)
        return Stage(name, lambda out: [LVERSE, "encode", "--shards", raw, "--vae", files["vae"], "--output", out,
                                        *local], lambda out: files_of(out, "*.tar"))
    if name == "caption":
        raw, data = raw_shards(os.path.join(folder, "raw"), count=4, n=3), files["data"]
        return Stage(name, lambda out: [LVERSE, "caption", "--shards", raw, "--checkpoint", files["biart"], "--vae",
                                        data["vae"], "--tokenizer", data["tokenizer"], "--candidates", "4",
                                        "--max-tokens", "8", "--batch-size", "3", "--clip", "lverse-tiny",
                                        "--output", out, *local], lambda out: files_of(out, "*.parquet"))
    if name == "generate":
        data, prompts = files["data"], os.path.join(folder, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("".join(f"a {c} circle\n" for c in ("red", "blue", "green", "yellow")))
        return Stage(name, lambda out: [LVERSE, "generate", "--prompts", prompts, "--checkpoint", files["biart"],
                                        "--vae", data["vae"], "--tokenizer", data["tokenizer"], "--candidates", "4",
                                        "--prompts-per-item", "1", "--clip", "lverse-tiny", "--output", out, *local],
                     lambda out: files_of(out, "*/*.png", "*/*.jpg"))
    if name == "download":
        tsv = _image_list(files["server"], folder, 9)
        return Stage(name, lambda out: [LVERSE, "download", "--input", tsv, "--samples-per-shard", "3",
                                        "--image-size", "64", "--timeout", "5", "--download-threads", "2",
                                        "--output", out, *local], _download_outputs)
    if name == "train":
        return Stage(name, lambda out: [LVERSE, "train", "--config",
                                        _train_config(folder, out, files["data"], workers)],
                     lambda out: {**files_of(out, "biart.safetensors"), **_losses(out)})
    if name == "train-vae":
        return Stage(name, lambda out: [LVERSE, "train-vae", "--config",
                                        _vae_config(folder, out, files["data"], workers)],
                     lambda out: {**files_of(out, "augvae-*.safetensors"), **_losses(out)})
    if name == "pipeline":
        config = _pipeline_config(folder, _image_list(files["server"], folder, 9), files["vae"], workers)
        return Stage(name, lambda out: [LVERSE, "pipeline", "run", config, "--run-dir", out], _pipeline_outputs)
    raise ValueError(f"no chaos stage {name!r}: one of {', '.join(STAGES)}")


def _train_config(folder: str, run_dir: str, data: dict, workers: int) -> str:
    """tests/test_train.py's debug run: 12 steps, a checkpoint every 2, exported at the end."""
    cfg = {"run_dir": run_dir, "steps": 12, "micro_batch_size": 4, "checkpoint_every": 2, "log_every": 1,
           "deepspeed": os.path.join(REPO, "ds_configs", "zero2_bf16.json"), "peak_flops": 1e12,
           "model": {"preset": "debug", "overrides": {"text_len": 24}},
           "data": {"shards": data["tokens"], "tokenizer": data["tokenizer"], "vae": data["vae"],
                    "workers": workers},
           "optim": {"lr": 3e-3, "warmup_steps": 2}}
    return _yaml(os.path.join(folder, f"{os.path.basename(run_dir)}.yaml"), cfg)


def _vae_config(folder: str, run_dir: str, data: dict, workers: int) -> str:
    """The smallest AugVAE run that crosses every phase: the demo's tiny preset (32-pixel images),
    2 ML steps, the conversion, 2 SL steps, a checkpoint each (the debug preset's 64-pixel steps
    took 20-50 s each on the loaded 2-core machine, the tiny preset's a second or two)."""
    cfg = {"run_dir": run_dir, "shards": data["raw"], "preset": "tiny-ml", "ml_steps": 2, "sl_steps": 2,
           "batch_size": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 1, "workers": workers,
           "perceptual_weight": 0.0}
    return _yaml(os.path.join(folder, f"vae-{os.path.basename(run_dir)}.yaml"), cfg)


def _image_list(server, folder: str, images: int) -> str:
    """A caption<TAB>url list of the first ``images`` training images of the synthetic ``server``."""
    lines = [f"{server.data.sample('train', i)[1]}\t{server.url}/img/train/{i}.jpg" for i in range(images)]
    return _write(os.path.join(folder, "in.tsv"), "\n".join(lines) + "\n")


def _pipeline_config(folder: str, tsv: str, vae: str, workers: int) -> str:
    """`lverse pipeline run` on a private local Ray: the 9 images of ``tsv`` downloaded 3 a shard,
    a tokenizer of 40 pieces fitted on their captions, the shards encoded by ``workers`` actors of
    the debug AugVAE. The run folder comes from the command line (``--run-dir``)."""
    cfg = {"run_dir": os.path.join(folder, "unused"), "tokenizer": {"vocab_size": 40},
           "download": {"input": tsv, "samples_per_shard": 3, "image_size": 64, "timeout": 5, "download_threads": 2},
           "encode": {"vae": vae, "batch_size": 4, "workers": workers}}
    return _yaml(os.path.join(folder, "pipeline.yaml"), cfg)


def _pipeline_outputs(out: str) -> dict[str, str]:
    """What each stage of the pipeline made: the downloaded shards' samples, the tokenizer, the
    token shards, and which stages are marked done (their markers hold timings, not compared)."""
    return {**{f"shards/{name}": digest for name, digest in _download_outputs(os.path.join(out, "shards")).items()},
            **files_of(out, "tokenizer.model", "tokens/*.tar"),
            **{f"done: {name}": "yes" for name in sorted(os.listdir(os.path.join(out, "_done")))}}


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def _yaml(path: str, cfg: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _download_outputs(out: str) -> dict[str, str]:
    """Each shard's samples (key, member name, bytes), not the tar's bytes: img2dataset stamps
    each member with the time it wrote it."""
    from lverse.core.shards import iter_samples
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        digest = hashlib.sha256()
        for sample in iter_samples(path):
            for member in sorted(sample):
                value = sample[member]
                digest.update(member.encode() + b"\0" + (value if isinstance(value, bytes) else str(value).encode()))
        found[os.path.basename(path)] = digest.hexdigest()
    return found

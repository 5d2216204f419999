"""Shared fixtures. Tests run on the CPU, on debug presets and synthetic data.

Two sets: the unit tests (``make test-fast``: no SLURM, sshd, Ray, browser or multi-process
training) and the ``slow`` ones, which start real services or train for more than a few seconds.
``make test`` runs both, on several pytest-xdist workers (Makefile). The fixtures that build data
and models are made once per session, which is once per worker: every worker that needs them
builds its own, so workers never share a folder. Tests that use a module-scoped fixture (a
module's SLURM cluster, S3 server or training run) are kept on one worker
(``pytest_itemcollected``).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time

# Under pytest-xdist several test processes, and what each starts, share the cores: one thread of
# torch's each, since OpenMP threads that outnumber the cores spin waiting for one another.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
# Compiled code kept in the venv, as the Makefile sets it (pytest run by hand gets the same).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(sys.prefix, "inductor_cache"))


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the run itself (xdist's controller), before its workers start
        os.environ[SESSION] = tempfile.mkdtemp(prefix="lverse-suite-")
        # Ray's agents and workers set their process titles with setproctitle, which by default
        # writes over the memory /proc/PID/environ reads, the session's mark with it
        os.environ["SPT_NOENV"] = "1"
    with open(os.path.join(os.environ[SESSION], "pids"), "a") as f:  # every test process's PID
        f.write(f"{os.getpid()}\n")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; the only tests allowed to skip in CI")
    config.addinivalue_line("markers", "slow: starts SLURM, sshd, Ray, a browser or several processes, or trains "
                            "for more than a few seconds; `make test-fast` leaves it out")


def pytest_itemcollected(item):
    """Tests that share a module-scoped fixture (a module's cluster, server or training run) run on
    one pytest-xdist worker (``--dist loadgroup``), so that it is made once; the module's other
    tests go wherever a worker is free. Session-scoped fixtures are made once per worker. (Marked
    as each test is collected: xdist reads the marks in its own pytest_collection_modifyitems.)"""
    info = getattr(item, "_fixtureinfo", None)
    if info is None or item.get_closest_marker("xdist_group"):
        return
    if any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values() if defs):
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))


# The modules whose tests ran longest in the last measured suite (2 cores, 2026-12-07), longest first.
LONGEST_FIRST = ("test_ray_cluster", "test_demo", "test_multinode", "test_slurm", "test_train", "test_storage",
                 "test_stop", "test_data_order", "test_encode", "test_caption", "test_schedule", "test_download")


def pytest_collection_modifyitems(items):
    """The longest tests first: slow ones before the others, LONGEST_FIRST's modules in its order.
    pytest-xdist hands out work in this order (the Makefile turns its own reordering off), so the
    suite ends with short tests on every worker rather than one worker still running a ten-minute
    test while the others idle. Only the time depends on this order, never a result."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank))))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set) a skipped test is a failure: a missing service must not pass silently."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail") \
            and item.get_closest_marker("gpu") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_ray_left():
    """A test that started Ray in this process (``--executor ray`` without an address) shuts it
    down: the next test starts its own, and none is left running when pytest exits (Ray's threads
    still running at interpreter exit can crash it)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def vae_path(tmp_path_factory):
    """A debug-sl AugVAE with random weights (seed 0)."""
    return make_vae(str(tmp_path_factory.mktemp("vae") / "vae.safetensors"))


def make_vae(path: str) -> str:
    """``vae_path``'s model at ``path`` (also for benchmarks/chaos.py, which runs without pytest)."""
    from lverse.model import AugVAE, save_model
    from lverse.model.augvae import PRESETS
    torch.manual_seed(0)
    save_model(AugVAE(PRESETS["debug-sl"]), path)
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory, vae_path):
    """Image shards, their token shards through the debug AugVAE, and a caption tokenizer fitted
    on their captions (tests/test_train.py's SHARDS of PER_SHARD)."""
    return make_data(str(tmp_path_factory.mktemp("train_data")), vae_path)


def make_data(root: str, vae_path: str) -> dict:
    """``data``'s files in the folder ``root``."""
    import json

    from lverse.core.shards import iter_samples
    from lverse.pipeline.configs import EncodeConfig
    from lverse.pipeline.encode import run_encode
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer

    from .test_encode import raw_shards
    from .test_train import PER_SHARD, SHARDS
    raw = raw_shards(os.path.join(root, "raw"), count=SHARDS, n=PER_SHARD)
    for s in range(SHARDS):  # img2dataset's done marker, which train-vae counts samples from
        with open(os.path.join(raw, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"successes": PER_SHARD}, f)
    tokens = os.path.join(root, "tokens")
    run_encode(EncodeConfig(shards=raw, vae=vae_path, output=tokens, workers=0))
    captions = [f["txt"].decode() for s in range(SHARDS) for f in iter_samples(os.path.join(raw, f"{s:05d}.tar"))]
    CaptionTokenizer.fit(captions, os.path.join(root, "tok"), vocab_size=64, offset=512)
    return {"raw": raw, "tokens": tokens, "vae": vae_path, "tokenizer": os.path.join(root, "tok.model")}


@pytest.fixture(scope="session")
def biart(data, tmp_path_factory):
    """A debug BiART with random weights (seed 0) for ``data``'s tokenizer, its AugVAE and
    tokenizer recorded as `lverse export` records them."""
    return make_biart(str(tmp_path_factory.mktemp("biart") / "biart.safetensors"), data)


def make_biart(path: str, data: dict) -> str:
    """``biart``'s model at ``path``, for ``data``."""
    from lverse.model import BiART, save_model
    from lverse.model.biart import PRESETS, BiARTConfig
    from lverse.model.checkpoint import provenance_of
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer
    tok = CaptionTokenizer(data["tokenizer"], offset=512)
    cfg = BiARTConfig(**{**PRESETS["debug"].__dict__, "text_vocab": tok.vocab_size, "text_len": 24})
    torch.manual_seed(0)
    save_model(BiART(cfg), path, provenance_of(data["vae"], data["tokenizer"]))
    return path


@pytest.fixture(scope="session")
def server():
    """The synthetic image server on 127.0.0.1, with a URL that answers after 4 s."""
    from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet
    with SyntheticServer(SyntheticSet(seed=1, train=12, heldout=2, image_size=64), slow_seconds=4) as srv:
        yield srv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_manifest(name: str) -> dict[str, list[int]]:
    """Keys and shapes of an official AugVAE checkpoint's modules (``tests/data/``): every key of the
    released Lightning ``state_dict`` that the model holds, with its shape."""
    import json
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


# -- the suite leaves nothing behind -------------------------------------------------------------
# Every process the suite starts, however deep (a Ray head, a slurmd, an sshd, a worker), inherits
# SESSION in its environment; every namespace, bridge and veth of tests/cluster.py carries the PID of
# the test process that made it; every mount a test makes is under the run's base temporary folder.
# At the end of the run (in the controller, once the workers are gone) whatever of these is left
# fails the run, so a leak shows where it starts, not as a busy machine later. What other users of
# the machine run has another SESSION or none, and other PIDs: it is never counted.

SESSION = "LVERSE_TEST_SESSION"  # a folder of the run: its test processes' PIDs


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return
    from lverse.runtime.lifetime import end_private_ray
    end_private_ray()  # a run without workers: a private Ray of this process's own tests
    from multiprocessing import resource_tracker
    resource_tracker._resource_tracker._stop()  # and the tracker its tests' processes started (it ends at exit)
    folder = os.environ[SESSION]
    with open(os.path.join(folder, "pids")) as f:
        pids = {line.strip() for line in f if line.strip()}
    base = str(session.config._tmp_path_factory.getbasetemp())
    deadline = time.time() + 20  # the workers are ending: what they started gets a moment to go
    while (left := _left_behind(folder, pids, base)) and time.time() < deadline:
        time.sleep(0.5)
    shutil.rmtree(folder, ignore_errors=True)
    if left:
        session.config.get_terminal_writer().line("\nthe suite left behind:\n  " + "\n  ".join(left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _left_behind(folder: str, pids: set[str], base: str) -> list[str]:
    import subprocess

    from . import procs
    found = [f"process {pid}: {procs.command_of(pid)[:200]}" for pid in procs.pids()
             if pid != os.getpid() and procs.environ_of(pid).get(SESSION) == folder and procs.alive(pid)]
    names = ""
    if shutil.which("ip"):  # without iproute2 (make test-fast) no test made a namespace
        names = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        names += subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for pid in pids:  # tests/cluster.py: lv{pid}-N... namespaces, lvb{pid}-N bridges, lvh{pid}x... veths
        found += [f"network device or namespace of test process {pid}: {word}" for word in names.split()
                  if word.startswith((f"lv{pid}-", f"lvb{pid}-", f"lvh{pid}x"))]
    with open("/proc/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if line.split()[1].startswith(base)]
    return found

"""One command for a lent GPU: the ``gpu`` tests, then every GPU figure, within ``--minutes``.

    python benchmarks/gpu.py --minutes 8 --out DIR

1. ``pytest -m gpu tests/test_gpu.py`` in a subprocess, with its share of the time (the tests
   that did not finish in it are named): ``gpu_tests_passed``, ``gpu_tests_failed``, ...
2. The figures, each phase in a subprocess of its own (a crash, a hang or an out-of-memory in one
   costs only that phase, and the GPU's memory is free for the next), with a deadline each; a
   phase measures as much as fits before it and says what it left out:

   - ``train``: biart-500m, bf16 (``ds_configs/zero2_bf16.json``), DeepSpeed as ``lverse train``
     builds it, random batches already on the GPU; ``mfu`` and ``tokens_per_s``, the best of the
     head restricted and full, the blocks compiled and eager (``mfu_restricted_compiled``,
     ``mfu_restricted_eager``, ``mfu_full_compiled``, ``mfu_full_eager``, with ``tokens_per_s_*``,
     ``peak_memory_gib_*`` and ``batch_*``), each the best of micro-batches 32, 16 and 8 (largest
     first, as time allows; an out-of-memory moves on to the next). MFU =
     ``BiART.flops_per_token`` x tokens/s over 989 TFLOP/s (H100 and H200 SXM, bf16 dense);
   - ``caption``: ``caption_images_per_s_greedy`` and ``caption_images_per_s_64`` (biart-500m random
     weights in bf16, augvae-sl, a ViT-B/32 CLIP with random weights, the stage's own batching);
   - ``generate``: ``generate_images_per_s_64`` (64 candidates a prompt, decoding and reranking in);
   - ``encode``: ``encode_images_per_s``, augvae-sl at 256 px in FP32, the stage end to end from
     JPEG shards (one worker, its done markers' seconds);
   - ``kv``: ``kv_decode_bandwidth_fraction``, the bytes a cached decode step of biart-500m in bf16
     moves a second (64 sequences, as the generate stage's 64 candidates; its weights and KV
     cache) over ``copy_bandwidth_gb_s``, a device-to-device copy measured in the same run.

Every figure is printed as ``name=value`` at the end and written with the phases' status (ok,
failed with its one-line error, or skipped and why), the device and the versions to
``OUT/gpu.json``, also when a phase fails. Nothing is installed and nothing needs the network:
the device machine's recipe (benchmarks/README.md, "GPU") carries the wheels.

``--smoke``: the same phases on the CPU with tiny presets (debug BiART and AugVAE, the lverse-tiny
CLIP, fp32) and a few steps; every figure is still printed, its value from the tiny run, and the
``gpu`` tests are only collected (their bodies that run on a CPU are tests of the normal suite).
The suite runs this (tests/test_gpu.py, marked slow), so the command cannot rot between GPU loans.

Only on a GPU: ``TORCH_CUDA_ARCH_LIST`` of an arch-specific form (``9.0a``, as the lent machines'
image sets it) is set to the plain capability (``9.0``) for this run and its subprocesses:
DeepSpeed 0.19.8's JIT builder cannot parse the suffix and FusedAdam would fall back.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The figures this command exists for, in the order printed (each phase's extra lines follow them).
TRAIN_VARIANTS = ("restricted_compiled", "restricted_eager", "full_compiled", "full_eager")
FIGURES = {
    "tests": ("gpu_tests_collected", "gpu_tests_passed", "gpu_tests_failed", "gpu_tests_skipped"),
    "train": ("mfu", "tokens_per_s", *(f"{k}_{v}" for v in TRAIN_VARIANTS
                                       for k in ("mfu", "tokens_per_s", "peak_memory_gib"))),
    "caption": ("caption_images_per_s_greedy", "caption_images_per_s_64"),
    "generate": ("generate_images_per_s_64",),
    "encode": ("encode_images_per_s",),
    "kv": ("kv_decode_bandwidth_fraction", "copy_bandwidth_gb_s"),
}
# Each phase's share of --minutes. A phase may use what those before it left. The tests need about
# 150 s on an H100 machine by estimate (not measured): FusedAdam's JIT build (about 50 s), inductor
# compiling on a fresh machine, and the processes that the fallback, NCCL and pool tests start.
SHARES = {"tests": 0.36, "train": 0.30, "caption": 0.10, "generate": 0.09, "encode": 0.07, "kv": 0.05}
RESERVE = 0.03  # the last phase ends this share before the minutes are up: collecting, writing
MIN_PHASE_S = {"tests": 30, "train": 40, "caption": 20, "generate": 20, "encode": 15, "kv": 10}
H100_BF16_DENSE = 989e12  # FLOP/s, H100 and H200 SXM alike


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each phase measures: the GPU's figures or the smoke run's tiny ones."""

    device: str
    preset: str  # BiART
    vae: str  # the AugVAE of encode
    clip: str
    precision: str  # BiART's in captioning and generation
    deepspeed: str  # the training's ds_config
    batches: tuple[int, ...]  # training micro-batches, largest first
    warmup: int
    rounds: int
    steps: int
    caption_images: dict[str, int]  # per mode
    generate_prompts: int
    candidates: int
    encode_shards: int
    encode_per_shard: int
    image_size: int
    decode_batch: int
    decode_steps: tuple[int, int]
    copy_mib: int
    caption_tokens: int  # text tokens a caption candidate (the stage's default on the GPU)


GPU = Sizes("cuda", "biart-500m", "augvae-sl", "ViT-B-32", "bf16", "zero2_bf16", (32, 16, 8), 3, 3, 5,
            {"greedy": 64, "64": 16}, 1, 64, 4, 512, 256, 64, (64, 256), 2048, 32)
SMOKE = Sizes("cpu", "debug", "debug-sl", "lverse-tiny", "fp32", "zero2_fp32", (2,), 1, 1, 2,
              {"greedy": 4, "64": 2}, 1, 4, 1, 4, 64, 4, (8, 24), 64, 8)


class Clock:
    """Seconds left before a deadline (``time.time()``, shared by the processes)."""

    def __init__(self, until: float):
        self.until = until

    def left(self) -> float:
        return self.until - time.time()


# -- the phases (each in a subprocess: ``--phase NAME``) -------------------------------------------

def phase_train(s: Sizes, clock: Clock, work: str, notes: list[str], save) -> dict:
    import torch

    from lverse.runtime.distributed import setup_env
    from lverse.runtime.trainer import measure_peak_flops
    setup_env()
    import deepspeed
    cuda = s.device == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        peak = H100_BF16_DENSE
        matmul = measure_peak_flops(device, torch.bfloat16, n=8192)
    else:  # no dense peak to quote for a CPU: MFU over what a matmul reaches here
        peak = matmul = measure_peak_flops(device, torch.float32, n=512, seconds=0.3)
    out = {"peak_flops_for_mfu": peak, "matmul_tflops": round(matmul / 1e12, 2)}
    start = time.time()
    for k, variant in enumerate(TRAIN_VARIANTS):
        head, mode = variant.split("_")
        # an even share of what is left for each variant still to come
        variant_until = time.time() + clock.left() / (len(TRAIN_VARIANTS) - k)
        try:
            measure_variant(variant, head, mode, s, device, peak, variant_until, out, notes)
        except Exception as e:  # the other variants still run
            notes.append(f"{variant} failed: {one_line(e)}")
        save(out)  # what is measured so far survives a kill at the deadline
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    measured = [v for v in TRAIN_VARIANTS if f"mfu_{v}" in out]
    if measured:  # the best of the four: what lverse trains at when configured for it
        best = max(measured, key=lambda v: out[f"mfu_{v}"])
        out.update(mfu=out[f"mfu_{best}"], tokens_per_s=out[f"tokens_per_s_{best}"], mfu_best_variant=best)
    notes.append(f"train: {time.time() - start:.0f} s")
    return out


def measure_variant(variant: str, head: str, mode: str, s: Sizes, device, peak: float, variant_until: float,
                    out: dict, notes: list[str]) -> None:
    """One engine (``head``, compiled or eager) over the micro-batch sweep; its best into ``out``."""
    import torch
    from common import build_engine, deepspeed_config

    from lverse.model.biart import PRESETS, BiART
    torch.manual_seed(0)
    with device:  # initialised where it trains: seconds, not a minute, for biart-500m
        model = BiART(dataclasses.replace(PRESETS[s.preset], head=head))
    fpt = model.flops_per_token()
    out[f"flops_per_token_{head}"] = fpt
    built = time.time()
    engine, kernels = build_engine(model, deepspeed_config(s.deepspeed, s.batches[0]), 1e-4, device,
                                   compile=mode == "compiled")
    notes.append(f"{variant}: kernels {kernels}, engine built in {time.time() - built:.1f} s")
    try:
        sweep(variant, model, engine, fpt, s, device, peak, variant_until, out, notes)
    finally:
        engine.destroy()


def sweep(variant: str, model, engine, fpt: float, s: Sizes, device, peak: float, variant_until: float,
          out: dict, notes: list[str]) -> None:
    """The micro-batch sweep of one engine, largest first, while it fits the variant's time."""
    import statistics

    import torch
    from common import random_batches, timed_rounds
    cuda = device.type == "cuda"
    best, last = None, 0.0
    for b in s.batches:
        if best is not None and time.time() + last > variant_until:
            notes.append(f"{variant}: micro-batch {b} skipped: its sweep would pass the phase's deadline")
            continue
        t0 = time.time()
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            data = random_batches(model.cfg, b, 2, device, seed=b)
            step = statistics.median(timed_rounds(engine, data, s.warmup, s.rounds, s.steps))
        except torch.OutOfMemoryError:
            notes.append(f"{variant}: micro-batch {b} out of memory")
            data = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        last = time.time() - t0
        tokens = b * (model.cfg.seq_len - 1) / step
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else rss_gib()
        row = {"batch": b, "step_ms": round(step * 1e3, 1), "tokens_per_s": round(tokens),
               "mfu": round(fpt * tokens / peak, 4), "peak_memory_gib": round(mem, 2)}
        out[f"sweep_{variant}_b{b}"] = row
        print(f"[train] {variant} {row} ({last:.0f} s)", flush=True)
        if best is None or row["mfu"] > best["mfu"]:
            best = row
    if best is not None:
        out.update({f"mfu_{variant}": best["mfu"], f"tokens_per_s_{variant}": best["tokens_per_s"],
                    f"peak_memory_gib_{variant}": best["peak_memory_gib"], f"batch_{variant}": best["batch"]})


def rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def phase_caption(s: Sizes, clock: Clock, work: str, notes: list[str], save) -> dict:
    from caption import caption_throughput
    modes = {"greedy": dict(candidates=1, temperature=0.0, top_p=None), "64": dict(candidates=64, top_p=0.9)}
    if s.candidates != 64:
        modes["64"]["candidates"] = s.candidates
        notes.append(f"caption_images_per_s_64: {s.candidates} candidates (smoke)")
    out = {}
    for name, mode in modes.items():
        if out and clock.left() < 10:
            notes.append(f"caption {name} skipped: under 10 s left")
            continue
        figures = caption_throughput(os.path.join(work, "models"), s.preset, s.device, s.precision, s.clip,
                                     s.caption_images[name], {name: mode}, max_tokens=s.caption_tokens)
        out.update(figures)
        save(out)
    return out


def phase_generate(s: Sizes, clock: Clock, work: str, notes: list[str], save) -> dict:
    from generate import generate_throughput
    figures = generate_throughput(os.path.join(work, "models"), s.preset, s.device, s.precision, s.clip,
                                  s.generate_prompts, candidates=s.candidates)
    if s.candidates != 64:
        notes.append(f"generate_images_per_s_64: {s.candidates} candidates (smoke)")
    return {"generate_images_per_s_64": figures["generate_images_per_s"],
            "generate_peak_memory_mib": figures["generate_peak_memory_mib"], "generate_candidates": s.candidates}


def phase_encode(s: Sizes, clock: Clock, work: str, notes: list[str], save) -> dict:
    from encode import encode_throughput
    return encode_throughput(os.path.join(work, "encode"), s.vae, s.encode_shards, s.encode_per_shard, s.image_size)


def phase_kv(s: Sizes, clock: Clock, work: str, notes: list[str], save) -> dict:
    import torch
    from sampling import cached_decode_step

    from lverse.model.biart import PRESETS, BiART
    device = torch.device(s.device)
    copy = copy_bandwidth(device, s.copy_mib * 2**20)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if s.device == "cuda" else torch.float32
    with device:
        model = BiART(PRESETS[s.preset]).to(dtype=dtype).eval()
    step = cached_decode_step(model, s.decode_batch, *s.decode_steps)
    return {"kv_decode_bandwidth_fraction": round(step["kv_decode_bytes_per_s"] / copy, 4),
            "copy_bandwidth_gb_s": round(copy / 1e9, 1), "kv_decode_batch": s.decode_batch,
            "kv_decode_step_ms": round(step["kv_decode_step_s"] * 1e3, 3),
            "kv_decode_gb_per_step": round(step["kv_decode_bytes_per_step"] / 1e9, 3)}


def copy_bandwidth(device, nbytes: int, reps: int = 10) -> float:
    """Bytes a second a device-to-device copy moves (read and written counted), fastest of ``reps``."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(256)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):  # the first warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


PHASES = {"train": phase_train, "caption": phase_caption, "generate": phase_generate, "encode": phase_encode,
          "kv": phase_kv}


def run_phase(name: str, smoke: bool, until: float, work: str, result: str) -> None:
    """In the subprocess: one phase, its figures and notes written to ``result`` as JSON, also
    when it fails (then with its one-line error)."""
    sys.path.insert(0, HERE)
    s = SMOKE if smoke else GPU
    notes: list[str] = []
    record = {"status": "running", "figures": {}, "notes": notes}

    def save(figures: dict) -> None:
        record["figures"] = dict(figures)
        with open(result + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(result + ".tmp", result)
    try:
        figures = PHASES[name](s, Clock(until), work, notes, save)
        record["status"] = "ok"
        save(figures)
    except BaseException as e:  # a phase's any failure is its record; the others go on
        traceback.print_exc()
        record.update(status="failed", error=one_line(e))
        save(record["figures"])


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# -- the driver ---------------------------------------------------------------------------------

def run_tests(smoke: bool, until: float, env: dict, cwd: str) -> dict:
    """The ``gpu`` tests, collected, then run (not in smoke mode) in a pytest subprocess that ends
    by ``until``; the tests it did not finish are named."""
    collected, code, killed = pytest(["--collect-only", "-q"], until, env, cwd)
    ids = sorted(set(re.findall(r"^(tests/test_gpu\.py::\S+)$", collected, re.M)))
    record = {"status": "ok", "figures": {"gpu_tests_collected": len(ids)}}
    if code != 0 or not ids:
        why = "killed at the phase's deadline" if killed else f"exited {code}"
        return {**record, "status": "failed", "error": f"collecting the gpu tests: pytest {why}: "
                                                      f"{collected.strip().splitlines()[-1:]}"}
    if smoke:
        record["figures"].update(gpu_tests_passed=0, gpu_tests_failed=0, gpu_tests_skipped=0)
        record["notes"] = ["collected only (--smoke): the CPU-capable bodies are tests of the normal suite"]
        return record
    text, code, killed = pytest(["-v", "-rfE", "--tb=short"], until, env, cwd)
    # (-v names a test by its path from the working folder: ../repo/tests/test_gpu.py::...)
    outcome = dict(re.findall(r"(tests/test_gpu\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text))
    record["figures"].update(gpu_tests_passed=sum(v == "PASSED" for v in outcome.values()),
                             gpu_tests_failed=sum(v in ("FAILED", "ERROR") for v in outcome.values()),
                             gpu_tests_skipped=sum(v == "SKIPPED" for v in outcome.values()))
    record.update(failed=sorted(k for k, v in outcome.items() if v in ("FAILED", "ERROR")),
                  not_run=[i for i in ids if i not in outcome], returncode=code)
    if killed:
        record.update(status="failed", error=f"the gpu tests ran past their share of the time; not finished: "
                                             f"{record['not_run']}")
    elif code not in (0, 1):  # 1: some failed, which the figures say
        record.update(status="failed", error=f"pytest exited {code}: {text.strip().splitlines()[-1:]}")
    return record


def pytest(args: list[str], until: float, env: dict, cwd: str) -> tuple[str, int, bool]:
    """``pytest -m gpu tests/test_gpu.py ARGS``, its output echoed; (output, exit code, killed at ``until``).

    Run from another folder, the test modules imported by path (importlib): the checkout's bare
    lverse/ folder on sys.path would hide the installed lverse (a --target install on the GPU
    machine; setup.py maps core/, model/, ... into it)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", os.path.join(REPO, "tests", "test_gpu.py"), "--rootdir", REPO,
           "-p", "no:cacheprovider", "--import-mode=importlib", *args]
    print("$ pytest " + " ".join(cmd[3:]), flush=True)
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        with Deadline(proc, until) as deadline:
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line)
            proc.wait()
    return "".join(lines), proc.returncode, deadline.killed


class Deadline:
    """Kills ``proc``'s process group (it and whatever it started) at ``until`` if still running."""

    def __init__(self, proc: subprocess.Popen, until: float):
        import threading
        self.proc, self.killed = proc, False
        self.timer = threading.Timer(max(0.0, until - time.time()), self.kill)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.killed = True
            os.killpg(self.proc.pid, 9)

    def __enter__(self) -> Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()


def child_env(smoke: bool) -> dict:
    """This run's environment for itself and its subprocesses (see the module doc)."""
    env = dict(os.environ)
    # compiled ops kept where the suite keeps them (tests/conftest.py), else in /tmp: FusedAdam is
    # JIT-built once a machine, by the first test that needs it, and the training phase reuses it
    ext = os.path.join(sys.prefix, "torch_extensions")
    if not os.access(sys.prefix, os.W_OK):
        ext = os.path.join(tempfile.gettempdir(), "lverse-torch-extensions")
    env.setdefault("TORCH_EXTENSIONS_DIR", ext)
    env["PYTHONUNBUFFERED"] = "1"
    if not smoke:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch = env.get("TORCH_CUDA_ARCH_LIST")
            if arch is None or re.search(r"\d[a-z]", arch):
                env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
                print(f"TORCH_CUDA_ARCH_LIST={arch} -> {major}.{minor} (DeepSpeed's JIT builder cannot parse an "
                      "arch-specific suffix)", flush=True)
    return env


def environment(smoke: bool) -> dict:
    import torch
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0],
            "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": smoke}
    for package in ("deepspeed", "open_clip_torch", "webdataset", "triton"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_count=torch.cuda.device_count(),
                    device_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def write(out: str, report: dict) -> None:
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "gpu.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)
    os.replace(tmp, os.path.join(out, "gpu.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole run's time, tests included (default 8)")
    parser.add_argument("--out", required=True, help="folder for gpu.json")
    parser.add_argument("--smoke", action="store_true", help="on the CPU, tiny presets, gpu tests only collected")
    parser.add_argument("--skip", action="append", default=[], choices=["tests", *PHASES],
                        help="leave a phase out (repeatable)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # a phase's subprocess
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        run_phase(args.phase, args.smoke, args.until, args.work, os.path.join(args.out, f"{args.phase}.json"))
        return 0
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    start = time.time()
    total = args.minutes * 60
    env = child_env(args.smoke)
    import torch
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device (torch.cuda.is_available() is False): run with --smoke on a CPU")
    report = {"environment": environment(args.smoke), "minutes": args.minutes, "figures": {}, "phases": {}}
    print(f"environment: {report['environment']}", flush=True)
    write(args.out, report)
    work = tempfile.mkdtemp(prefix="lverse-gpu-")
    try:
        share_end = start
        for name in ("tests", *PHASES):
            share_end += SHARES[name] * total
            until = min(share_end, start + (1 - RESERVE) * total)
            t0 = time.time()
            if name in args.skip:
                record = {"status": "skipped", "reason": "--skip"}
            elif until - t0 < MIN_PHASE_S[name] * (0.1 if args.smoke else 1):
                record = {"status": "skipped", "reason": f"{until - t0:.0f} s left of its share, under the "
                                                         f"{MIN_PHASE_S[name]} s it needs at least"}
            elif name == "tests":
                record = run_tests(args.smoke, until, env, work)
            else:
                record = run_child(name, args.smoke, until, work, env)
            record["seconds"] = round(time.time() - t0, 1)
            report["phases"][name] = record
            report["figures"].update(record.get("figures", {}))
            print(f"[{name}] {record['status']} in {record['seconds']} s"
                  + (f": {record.get('error') or record.get('reason')}" if record["status"] != "ok" else ""),
                  flush=True)
            write(args.out, report)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.time() - start, 1)
    write(args.out, report)
    print("\nphases: " + ", ".join(f"{k} {v['status']}" for k, v in report["phases"].items())
          + f"; {report['seconds']} s of {total:.0f}")
    for phase, names in FIGURES.items():
        status = report["phases"].get(phase, {}).get("status")
        for key in names:
            value = report["figures"].get(key)
            if value is None:  # a phase that failed or was skipped, or left this one out (its notes say why)
                value = status if status != "ok" else "missing"
            print(f"{key}={fmt(value)}")
    for key, value in report["figures"].items():
        if not any(key in names for names in FIGURES.values()) and not isinstance(value, dict):
            print(f"{key}={fmt(value)}")
    return 0


def fmt(value) -> str:
    """A figure as printed: floats to 4 significant digits, at least the units."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def run_child(name: str, smoke: bool, until: float, work: str, env: dict) -> dict:
    """A phase in its own process, killed at ``until`` (a few seconds' grace to write its record)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--until", str(until), "--work", work,
           "--out", work] + ["--smoke"] * smoke
    result = os.path.join(work, f"{name}.json")
    with subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True) as proc:
        with Deadline(proc, until + 5) as deadline:
            proc.wait()
    record = {"status": "failed", "figures": {}}
    if os.path.exists(result):
        with open(result) as f:
            record = json.load(f)  # what it measured before a kill, too
    if deadline.killed:
        record.update(status="failed", error="ran past its deadline and was killed, with what it started "
                                             "(the figures it had saved are kept)")
    elif record["status"] != "ok" and "error" not in record:
        record["error"] = f"its process exited {proc.returncode} without a record (see its output above)"
    return record


if __name__ == "__main__":
    sys.exit(main())

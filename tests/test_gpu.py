"""The CUDA paths: every test marked ``gpu`` runs only where ``torch.cuda.is_available()`` (a lent
GPU machine: ``python benchmarks/gpu.py`` runs them first) and is skipped elsewhere, the one skip
CI allows (conftest.py).

Where a check means something on a CPU too (the chunked restricted head against all logits, flash
attention forced, ``torch.compile`` against eager), its body is a ``check_*(device)`` function that
an unmarked test also runs on the CPU, so that the body cannot rot between GPU loans; only the
device differs.

Tolerances, stated once here: fp32 on CUDA with TF32 off (``no_tf32``) agrees with the plain path to
``FP32_RTOL`` (losses) and ``FP32_GRAD`` of each gradient's largest entry; bf16 keeps 8 bits, so
``BF16_RTOL`` and ``BF16_GRAD``; compiled blocks agree with eager to ``COMPILE_RTOL`` (inductor fuses
and reorders the fp32 sums). Captions and encode's codes must be equal, not close.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lverse.model.biart import PRESETS, BiART, Direction, build_sequence, prompt_for

from .test_biart import batch

FP32_RTOL, FP32_GRAD = 1e-5, 1e-4
BF16_RTOL, BF16_GRAD = 2e-2, 5e-2
COMPILE_RTOL = 1e-4

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False "
                                "(run on a GPU machine: python benchmarks/gpu.py)")
# The debug preset without dropout: two paths over the same weights must see the same numbers.
CFG = dataclasses.replace(PRESETS["debug"], embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_tf32():
    """fp32 means fp32 here: TF32 matmuls and convolutions (cuDNN's default) round to 10 bits."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(scope="module")
def rank():
    """This process as a one-rank job (NCCL on CUDA), as ``lverse train`` starts a rank; the
    variables it sets are taken back afterwards."""
    from lverse.runtime.trainer import end_process, start_process
    saved = dict(os.environ)
    try:
        yield start_process()
    finally:
        end_process()
        os.environ.clear()
        os.environ.update(saved)


def losses_and_grads(model, seq, direction, **kw):
    model.zero_grad()
    _, losses = model(seq[:, :-1], direction, targets=seq[:, 1:], **kw)
    losses["loss"].backward()
    return {k: v.detach().float() for k, v in losses.items()}, \
        {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def assert_same(got, want, rtol: float, grad: float, what: str) -> None:
    """Losses within ``rtol``; every gradient within ``grad`` of its largest entry."""
    for k, v in want[0].items():
        torch.testing.assert_close(got[0][k], v, rtol=rtol, atol=rtol, msg=f"{what}: loss {k}")
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=0, atol=grad * g.abs().max().item() + 1e-12,
                                   msg=f"{what}: gradient of {name}")


# -- checks whose bodies run on a CPU too ----------------------------------------------------

def check_chunked_head_equals_all_logits(device: str) -> None:
    """The training loss (restricted or full head, in chunks, padded rows) equals the loss from
    all logits at once, values and gradients, in fp32 and under bf16 autocast."""
    for head in ("restricted", "full"):
        for direction in Direction:
            cfg = dataclasses.replace(CFG, head=head, loss_chunk=7, pad_vocab_to=64)
            torch.manual_seed(0)
            model = BiART(cfg).to(device).train()
            seq = build_sequence(*batch(cfg), direction, cfg).to(device)
            what = f"{head} head, {direction.name}, {device}"
            plain = losses_and_grads(model, seq, direction, return_logits=True)
            assert_same(losses_and_grads(model, seq, direction), plain, FP32_RTOL, FP32_GRAD, what + ", fp32")
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                chunked = losses_and_grads(model, seq, direction)
            assert_same(chunked, plain, BF16_RTOL, BF16_GRAD, what + ", bf16 autocast against fp32")


def check_flash_attention_forced(device: str) -> None:
    """A training step (causal, attention dropout on) and KV-cache generation with SDPA allowed
    only its flash backend, in bf16; a shape, dtype or mask flash cannot take raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # Attention dropout on, as in training, where the kernel takes it (CUDA's; the CPU's flash does not).
    cfg = PRESETS["debug"] if torch.device(device).type == "cuda" else CFG
    torch.manual_seed(0)
    model = BiART(cfg).to(device=device, dtype=torch.bfloat16).train()
    text, image = (t.to(device) for t in batch(cfg))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for direction in Direction:
            seq = build_sequence(text, image, direction, cfg)
            _, losses = model(seq[:, :-1], direction, targets=seq[:, 1:])
            losses["loss"].backward()
            assert torch.isfinite(losses["loss"]), direction
        model.eval()
        out = model.generate(prompt_for(text, Direction.T2I, cfg), Direction.T2I, cfg.image_len, temperature=0)
    assert out.shape == (text.shape[0], cfg.image_len) and int(out.max()) < cfg.image_vocab


def check_compile_equals_eager(device: str) -> None:
    """``compile_blocks`` (what ``compile: true`` runs) gives eager's loss and gradients."""
    from lverse.runtime.deepspeed import compile_blocks
    torch.manual_seed(0)
    eager = BiART(CFG).to(device).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    for direction in Direction:
        seq = build_sequence(*batch(CFG), direction, CFG).to(device)
        assert_same(losses_and_grads(compiled, seq, direction), losses_and_grads(eager, seq, direction),
                    COMPILE_RTOL, FP32_GRAD, f"compiled against eager, {direction.name}, {device}")


@pytest.mark.parametrize("check", [check_chunked_head_equals_all_logits, check_flash_attention_forced])
def test_the_cuda_checks_bodies_run_on_the_cpu(check):
    """(``check_compile_equals_eager`` is left out here: inductor takes a minute on 2 cores;
    benchmarks/gpu.py --smoke compiles the same blocks.)"""
    check("cpu")


# -- on a GPU ----------------------------------------------------------------------------------

@gpu
@needs_cuda
def test_chunked_restricted_head_equals_all_logits_on_cuda(no_tf32):
    check_chunked_head_equals_all_logits("cuda")


@gpu
@needs_cuda
def test_flash_attention_forced_training_and_kv_cache_generation():
    check_flash_attention_forced("cuda")


@gpu
@needs_cuda
def test_compile_equals_eager_on_cuda(no_tf32):
    check_compile_equals_eager("cuda")


def train_engine(ds_name: str, device: torch.device, steps: int = 40, batch_size: int = 8, lr: float = 3e-4):
    """``steps`` training steps of biart-mini under ``ds_configs/<ds_name>.json`` on two fixed
    batches, directions alternating; returns (losses, loss scales, skipped steps, kernels)."""
    from lverse.pipeline.configs import OptimConfig
    from lverse.runtime.deepspeed import load_ds_config, loss_scale, micro_step, wrap
    cfg = PRESETS["biart-mini"]
    torch.manual_seed(0)
    ds = load_ds_config(ds_name, 1, micro_batch_size=batch_size, grad_accum=1, grad_clip=OptimConfig().grad_clip)
    engine, kernels = wrap(BiART(cfg), ds, lr, device, OptimConfig())
    pairs = [batch(cfg, B=batch_size, text_len=20, seed=s) for s in (1, 2)]
    losses, scales = [], []
    try:
        for step in range(steps):
            losses.append(micro_step(engine, *pairs[step % 2], Direction(step % 2))[0].item())
            scales.append(loss_scale(engine))
        assert all(torch.isfinite(p).all() for p in engine.module.parameters())
        return losses, scales, engine.skipped_steps, kernels
    finally:
        engine.destroy()


@gpu
@needs_cuda
def test_fp16_training_with_dynamic_loss_scaling(rank):
    losses, scales, skipped, kernels = train_engine("zero2_fp16", rank.device)
    assert kernels["precision"] == "fp16"
    assert all(s is not None and np.isfinite(s) and s >= 1 for s in scales), scales
    assert skipped < len(losses) // 2, f"{skipped} of {len(losses)} steps skipped (loss scales {scales})"
    assert losses[-2] < losses[0] - 0.5, losses  # the same direction at both ends


@gpu
@needs_cuda
def test_bf16_training(rank):
    losses, scales, skipped, kernels = train_engine("zero2_bf16", rank.device)
    assert kernels["precision"] == "bf16" and skipped == 0 and scales[-1] is None
    assert losses[-2] < losses[0] - 0.5, losses


@gpu
@needs_cuda
def test_fused_adam_is_chosen_and_steps(rank):
    """FusedAdam is JIT-built on first use (nvcc; about 50 s on an H100 machine, once)."""
    from lverse.pipeline.configs import OptimConfig
    from lverse.runtime.deepspeed import build_optimizer
    model = BiART(CFG).to(rank.device)
    optimizer, name = build_optimizer(model, OptimConfig(), {}, 1e-3)
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")  # DeepSpeed 0.19.8 cannot parse "9.0a" (benchmarks/gpu.py)
    assert name == "DeepSpeed FusedAdam (CUDA)", f"{name} (TORCH_CUDA_ARCH_LIST={arch})"
    before = model.lm_head.weight.detach().clone()
    seq = build_sequence(*batch(CFG), Direction.T2I, CFG).to(rank.device)
    model(seq[:, :-1], Direction.T2I, targets=seq[:, 1:])[1]["loss"].backward()
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before)


FALLBACK = textwrap.dedent("""
    import logging, torch
    logging.basicConfig(level=logging.WARNING)
    from lverse.model.biart import PRESETS, BiART
    from lverse.pipeline.configs import OptimConfig
    from lverse.runtime.deepspeed import build_optimizer
    model = BiART(PRESETS["debug"]).cuda()
    optimizer, name = build_optimizer(model, OptimConfig(), {}, 1e-3)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    optimizer.step()
    print("optimizer:", name)
""")


@gpu
@needs_cuda
def test_fused_adam_falls_back_to_torch_fused_adamw_when_its_build_fails(tmp_path):
    """No CUDA compiler and an empty extensions folder: FusedAdam's JIT build fails, and the
    optimizer is torch's fused AdamW, with the failure logged."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                   if not os.path.exists(os.path.join(p, "nvcc")))}
    env.pop("CUDA_PATH", None)
    # (run from tmp_path: a checkout's bare lverse/ folder in the working folder would hide the installed one)
    run = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "optimizer: torch AdamW fused=True (CUDA)" in run.stdout, run.stdout + run.stderr[-3000:]
    assert "FusedAdam unavailable" in run.stderr


NCCL_RANK = textwrap.dedent("""
    import json, torch, torch.distributed as dist
    from lverse.runtime.trainer import end_process, start_process
    p = start_process()
    x = torch.full((4,), float(p.rank + 1), device=p.device)
    dist.all_reduce(x)
    print(json.dumps({"rank": p.rank, "world": p.world, "device": str(p.device), "backend": dist.get_backend(),
                      "sum": x.tolist(), "uuid": str(torch.cuda.get_device_properties(p.device).uuid)}))
    end_process()
""")


@gpu
@needs_cuda
def test_nccl_group_over_the_gpus_present(tmp_path):
    """One rank a GPU, at most 2 (1 where there is 1), started by torchrun as on a node: NCCL, an
    all-reduce, each rank on its own device."""
    n = min(2, torch.cuda.device_count())
    script = tmp_path / "rank.py"
    script.write_text(NCCL_RANK)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT") and not k.startswith("SLURM_")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                          str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(n)), run.stdout
    want = float(n * (n + 1) // 2)
    assert all(r["backend"] == "nccl" and r["world"] == n and r["sum"] == [want] * 4 for r in ranks), ranks
    assert [r["device"] for r in ranks] == [f"cuda:{i}" for i in range(n)]
    assert len({r["uuid"] for r in ranks}) == n, ranks


# A pool worker's view: what ``pick_device`` gives it, and the UUID of that device. A module of its
# own in the test's folder, which the spawned workers import: this module's package name, tests,
# may be taken by another distribution's stray tests/ on a machine's path.
REPORT_DEVICE = textwrap.dedent("""
    import os
    import torch
    from lverse.core.resources import pick_device
    from lverse.runtime.tasks import TaskResult

    def report_device(item):
        device = pick_device("auto").device
        return TaskResult(str(item), ok=True, stats={"pid": os.getpid(), "device": device,
                                                     "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                     "count": torch.cuda.device_count(),
                                                     "uuid": str(torch.cuda.get_device_properties(device).uuid)})
""")


@gpu
@needs_cuda
def test_each_local_worker_runs_on_its_own_gpu_by_uuid(tmp_path, monkeypatch):
    """``worker_gpus`` names one GPU a worker; each worker sees just that one as cuda:0, and it
    is the device of that index here (compared by UUID)."""
    import importlib
    (tmp_path / "lverse_report_device.py").write_text(REPORT_DEVICE)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned workers start with this path
    report_device = importlib.import_module("lverse_report_device").report_device
    from lverse.core.resources import pick_device, visible_gpus, worker_gpus
    from lverse.runtime.local_pool import LocalPool
    from lverse.runtime.tasks import run_tasks
    count = torch.cuda.device_count()
    assert pick_device("auto").device == "cuda:0"
    gpus = worker_gpus(count)
    assert gpus == visible_gpus()[:count]
    uuid_of = {g: str(torch.cuda.get_device_properties(i).uuid) for i, g in enumerate(visible_gpus())}
    results = run_tasks(report_device, list(range(2 * count)), [str(i) for i in range(2 * count)],
                        LocalPool(count, gpus=tuple(gpus)), retries=0)
    assert all(r.ok for r in results), [r.reason for r in results]
    by_pid = {}
    for r in results:
        assert r.stats["device"] == "cuda:0" and r.stats["count"] == 1, r.stats
        assert r.stats["uuid"] == uuid_of[r.stats["visible"]], (r.stats, uuid_of)
        by_pid.setdefault(r.stats["pid"], set()).add(r.stats["uuid"])
    assert all(len(u) == 1 for u in by_pid.values()), by_pid
    used = [u for us in by_pid.values() for u in us]
    assert len(used) == len(set(used)), by_pid  # no two workers on one GPU


def train_debug_captioner(data: dict, path: str, device: str, steps: int = 400) -> str:
    """A debug BiART trained on ``data``'s token shards (both directions, plain AdamW) until its
    greedy captions are confident, saved with the provenance the caption stage checks."""
    from lverse.core.shards import iter_samples
    from lverse.model import save_model
    from lverse.model.biart import BiARTConfig
    from lverse.model.checkpoint import provenance_of
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer
    tok = CaptionTokenizer(data["tokenizer"], offset=512)
    cfg = BiARTConfig(**{**CFG.__dict__, "text_vocab": tok.vocab_size, "text_len": 24})
    samples = [s for name in sorted(os.listdir(data["tokens"])) if name.endswith(".tar")
               for s in iter_samples(os.path.join(data["tokens"], name))]
    image = torch.from_numpy(np.stack([np.load(io.BytesIO(s["codes.npy"])) for s in samples])
                             .astype(np.int64)).to(device)
    text = tok.encode([s["txt"].decode() for s in samples], cfg.text_len).to(device)
    torch.manual_seed(0)
    model = BiART(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        direction = Direction(step % 2)
        seq = build_sequence(text, image, direction, cfg)
        _, losses = model(seq[:, :-1], direction, targets=seq[:, 1:])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    save_model(model.cpu(), path, provenance_of(data["vae"], data["tokenizer"]))
    return path


@gpu
@needs_cuda
def test_caption_in_bf16_equals_fp32_greedy_for_a_trained_model(data, tmp_path):
    import pyarrow.parquet as pq

    from lverse.pipeline.caption import run_caption
    from lverse.pipeline.configs import CaptionConfig
    checkpoint = train_debug_captioner(data, str(tmp_path / "biart.safetensors"), "cuda")
    captions = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        run_caption(CaptionConfig(shards=data["tokens"], checkpoint=checkpoint, vae=data["vae"],
                                  tokenizer=data["tokenizer"], output=str(out), candidates=1, temperature=0.0,
                                  top_p=None, max_tokens=24, workers=0, device="cuda", precision=precision))
        captions[precision] = [c for f in sorted(os.listdir(out)) if f.endswith(".parquet")
                               for c in pq.read_table(out / f).to_pydict()["caption_whole"]]
    assert captions["fp32"] and all(captions["fp32"]), captions["fp32"]
    differ = [(a, b) for a, b in zip(captions["fp32"], captions["bf16"]) if a != b]
    assert not differ, f"{len(differ)} of {len(captions['fp32'])} captions differ (fp32, bf16): {differ[:5]}"


@gpu
@needs_cuda
def test_encode_codes_on_cuda_equal_the_cpus(data, tmp_path):
    """The AugVAE in FP32 on both, as the stage runs it (cuDNN's TF32 setting left as it is)."""
    from lverse.core.shards import iter_samples
    from lverse.pipeline.configs import EncodeConfig
    from lverse.pipeline.encode import run_encode
    codes = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        run_encode(EncodeConfig(shards=data["raw"], vae=data["vae"], output=str(out), workers=0, device=device))
        codes[device] = np.stack([np.load(io.BytesIO(s["codes.npy"]))
                                  for name in sorted(os.listdir(out)) if name.endswith(".tar")
                                  for s in iter_samples(str(out / name))])
    same = (codes["cpu"] == codes["cuda"]).mean()
    assert same == 1.0, f"{same:.4%} of the codes are equal on CUDA and the CPU"


# -- the GPU command, in its CPU smoke mode (the normal suite) -------------------------------------

def gpu_command_figures() -> dict[str, tuple[str, ...]]:
    """benchmarks/gpu.py's FIGURES (the script is no package: loaded from its file)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("lverse_gpu_command", os.path.join(REPO, "benchmarks", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module.FIGURES


@pytest.mark.slow
def test_the_gpu_command_runs_on_the_cpu_in_smoke_mode(tmp_path):
    """Every phase runs, every figure is printed as name=value and written to gpu.json, and the
    gpu tests of this module are collected."""
    import math
    import re
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = dict(line.split("=", 1) for line in run.stdout.splitlines() if re.fullmatch(r"\w+=\S.*", line))
    with open(tmp_path / "gpu.json") as f:
        report = json.load(f)
    bad = {name: r for name, r in report["phases"].items() if r["status"] != "ok"}
    assert not bad, bad
    for names in gpu_command_figures().values():
        for name in names:
            assert name in printed and math.isfinite(float(printed[name])), (name, printed.get(name))
            assert isinstance(report["figures"][name], (int, float)), (name, report["figures"].get(name))
    gpu_tests = [name for name, f in globals().items() if name.startswith("test_")
                 and any(m.name == "gpu" for m in getattr(f, "pytestmark", []))]
    assert report["figures"]["gpu_tests_collected"] == len(gpu_tests) > 0
    assert report["environment"]["smoke"] is True

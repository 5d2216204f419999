"""`lverse slurm submit STAGE`: render a ``slurm/`` template with the run's values and sbatch it.

One template per launch shape (``slurm/*.sbatch``): ``download`` and ``encode`` (job arrays over
chunks / shard blocks), ``train`` (one task per GPU through ``srun``; ``train_elastic`` with
``--elastic MIN``: one torchrun elastic agent per node, which keeps training on the nodes left
when one fails), ``ray`` (a Ray cluster in an
allocation, then a command), ``caption`` and ``generate`` (job arrays over shard or prompt
blocks, one worker process per GPU of the task). The rendered script is
written into the run folder (``{run_dir}/slurm/{stage}-{time}.sbatch``) and kept: it is exactly what
ran. Every value is validated before rendering and inserted shell-quoted, so a job name, path or
command cannot inject shell code: names outside ``[A-Za-z0-9._-]`` are refused, paths and command
words are ``shlex.quote``d.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import typing
from importlib import resources
from typing import Literal

from lverse.core.errors import InputError

Stage = Literal["download", "encode", "train", "caption", "generate", "ray"]
STAGES = typing.get_args(Stage)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TIME = re.compile(r"(\d+-)?\d{1,3}(:\d{2}){0,2}")
_ARRAY = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*(%\d+)?")
MAX_ARRAY_TASKS = 1000  # SLURM's default MaxArraySize is 1001


@dataclasses.dataclass
class SubmitOptions:
    stage: Stage  # which template
    config: str | None = None  # the run config: pipeline YAML (download, encode), train YAML, caption YAML
    nodes: int = 1  # nodes (train, ray)
    gpus_per_node: int = 0  # GPUs per node: train starts one task per GPU; encode, caption, generate a worker per GPU
    ntasks_per_node: int | None = None  # train: processes per node (None: one per GPU; 1 without GPUs)
    # train: when a node fails, go on with the nodes left down to this many (one torchrun elastic
    # agent per node; the ranks of each such number of nodes must share the global batch evenly,
    # checked at submit); None: the job requeues, as it does with fewer left or the first node lost
    elastic: int | None = None
    max_restarts: int = 3  # train --elastic: how many times the nodes may re-form the group in one job
    cpus_per_task: int = 2  # CPUs per task
    partition: str | None = None  # SLURM partition (None: the cluster's)
    time: str = "24:00:00"  # time limit, [days-]hours:minutes:seconds
    # download/encode/caption: which array tasks, e.g. 0-99%10 (throttle) or 3,7 (None: all)
    array: str | None = None
    job_name: str | None = None  # job name: letters, digits, '.', '_', '-' (None: lverse-STAGE)
    command: list[str] = dataclasses.field(default_factory=list)  # ray: what to run on the cluster
    run_dir: str | None = None  # where the script is kept (None: the config's run_dir)
    dry_run: bool = False  # print the script and keep it, do not submit


def check(opts: SubmitOptions) -> None:
    """Refuse values that would not be safe or meaningful in an sbatch script."""
    if opts.stage not in STAGES:
        raise InputError(f"stage must be one of {STAGES}, got {opts.stage!r}")
    if opts.job_name is not None and not _NAME.fullmatch(opts.job_name):
        raise InputError(f"--job-name {opts.job_name!r}: use 1-64 of letters, digits, '.', '_', '-'")
    if opts.partition is not None and not _NAME.fullmatch(opts.partition):
        raise InputError(f"--partition {opts.partition!r}: use letters, digits, '.', '_', '-'")
    if not _TIME.fullmatch(opts.time):
        raise InputError(f"--time {opts.time!r}: use SLURM's [days-]hours:minutes:seconds, e.g. 12:00:00")
    if opts.array is not None and not _ARRAY.fullmatch(opts.array):
        raise InputError(f"--array {opts.array!r}: use indices and ranges with an optional %throttle, e.g. 0-99%10")
    for name in ("nodes", "cpus_per_task"):
        if getattr(opts, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.gpus_per_node < 0:
        raise InputError("--gpus-per-node must be 0 or more")
    if opts.ntasks_per_node is not None and opts.ntasks_per_node < 1:
        raise InputError("--ntasks-per-node must be at least 1")
    if opts.stage == "train" and opts.gpus_per_node and opts.ntasks_per_node not in (None, opts.gpus_per_node):
        raise InputError(f"train runs one task per GPU: --ntasks-per-node {opts.ntasks_per_node} with --gpus-per-node "
                         f"{opts.gpus_per_node} would leave GPUs idle or put two ranks on one; give "
                         f"--ntasks-per-node {opts.gpus_per_node} or leave it out")
    if opts.elastic is not None:
        if opts.stage != "train":
            raise InputError(f"--elastic is for the train stage, not {opts.stage}")
        if not 1 <= opts.elastic <= opts.nodes:
            raise InputError(f"--elastic {opts.elastic}: the fewest nodes to go on with, 1 to --nodes ({opts.nodes})")
    if opts.max_restarts < 0:
        raise InputError("--max-restarts must be 0 or more")
    if opts.stage == "ray" and not opts.command:
        raise InputError('the ray stage runs a command on the cluster: lverse slurm submit ray --command "..."')
    if opts.stage != "ray" and not opts.config:
        raise InputError(f"the {opts.stage} stage needs --config")
    if opts.config and not os.path.isfile(opts.config):
        raise FileNotFoundError(f"--config {opts.config} does not exist")


def _array_tasks(spec: str | None, count: int) -> tuple[str, int]:
    """The --array value and the number of tasks the work is split into."""
    tasks = min(count, MAX_ARRAY_TASKS)
    if spec is None:
        return f"0-{tasks - 1}", tasks
    top = max(int(part.split("-")[-1]) for part in spec.split("%")[0].split(","))
    if top >= tasks:
        raise InputError(f"--array {spec}: the stage has {tasks} tasks (0-{tasks - 1})")
    return spec, tasks


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the launcher needs to know of a stage's run config (``lverse.plans`` makes one per stage)."""

    run_dir: str  # the config's run folder: the script is kept there unless --run-dir says otherwise
    items: int | None = None  # array stages: how many items (chunks, shards) the array tasks split
    # train --elastic: (nodes, min_nodes, ranks_per_node) -> raises InputError when training could
    # not go on with some of the node counts it may be left with
    check_elastic: typing.Callable[[int, int, int], None] | None = None


def render(opts: SubmitOptions, plan: Plan) -> tuple[str, str]:
    """(script text, run folder) for ``opts``; raises ValueError on bad values."""
    check(opts)
    lverse = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "lverse")
    values = {"LVERSE": shlex.quote(lverse), "TIME": opts.time, "CPUS_PER_TASK": str(opts.cpus_per_task),
              "NODES": str(opts.nodes), "PARTITION_LINE": f"#SBATCH --partition={opts.partition}"
              if opts.partition else "", "CONFIG": shlex.quote(os.path.abspath(opts.config or "")),
              "GPU_LINE": f"#SBATCH --gpus-per-node={opts.gpus_per_node}" if opts.gpus_per_node else "",
              "WORKERS": str(max(1, opts.gpus_per_node))}
    if plan.items is not None:
        if plan.items == 0:
            raise InputError(f"the {opts.stage} stage of {opts.config} has nothing to do (no input shards yet?)")
        values["ARRAY"], tasks = _array_tasks(opts.array, plan.items)
        values["NUM_TASKS"] = str(tasks)
    if opts.stage == "train":
        values["STOPPED"] = shlex.quote(os.path.join(os.path.abspath(plan.run_dir), "stopped.json"))
        values["TASKS_PER_NODE"] = str(opts.ntasks_per_node or max(1, opts.gpus_per_node))
        values["SIGNAL_SECONDS"] = "300"
        # One task per GPU, each bound to its own: the task sees one device and uses it as cuda:0
        # (resources.pick_device), whatever its index on the node or the cluster's cgroup set-up.
        if opts.gpus_per_node:
            values["GPU_LINE"] = "#SBATCH --gpus-per-task=1"
        if opts.elastic is not None:
            # one agent per node holds the node's GPUs and starts a rank per GPU (pick_device:
            # local rank r takes cuda:r of the node's devices)
            ranks = int(values["TASKS_PER_NODE"])
            if plan.check_elastic is not None:
                plan.check_elastic(opts.nodes, opts.elastic, ranks)
            values.update(MIN_NODES=str(opts.elastic), RANKS_PER_NODE=str(ranks), MAX_RESTARTS=str(opts.max_restarts),
                          CPUS_PER_NODE=str(opts.cpus_per_task * ranks),
                          TORCHRUN=shlex.quote(os.path.join(os.path.dirname(os.path.abspath(sys.executable)),
                                                            "torchrun")),
                          FINISHED=shlex.quote(os.path.join(os.path.abspath(plan.run_dir), "finished.json")))
            values["GPU_LINE"] = f"#SBATCH --gpus-per-node={opts.gpus_per_node}" if opts.gpus_per_node else ""
    if opts.stage == "ray":
        values["RAY"] = shlex.quote(os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "ray"))
        values["COMMAND"] = shlex.join(opts.command)
    run_dir = opts.run_dir or plan.run_dir
    run_dir = os.path.abspath(run_dir)
    values["JOB_NAME"] = opts.job_name or f"lverse-{opts.stage}"
    values["LOG_DIR"] = shlex.quote(os.path.join(run_dir, "slurm"))
    name = "train_elastic" if opts.elastic is not None else opts.stage
    template = resources.files("lverse.slurm").joinpath(f"{name}.sbatch").read_text()
    script = re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], template)
    return "\n".join(line for line in script.splitlines() if line != "") + "\n", run_dir


def submit(opts: SubmitOptions, plan: Plan) -> tuple[str, str | None]:
    """Render, keep the script in the run folder, and (unless dry_run) sbatch it.
    Returns (script path, job id or None)."""
    script, run_dir = render(opts, plan)
    folder = os.path.join(run_dir, "slurm")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{opts.stage}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    with open(path, "w") as f:
        f.write(script)
    if opts.dry_run:
        return path, None
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run)")
    out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if out.returncode:
        raise InputError(f"sbatch refused {path}: {out.stderr.strip()}")
    return path, out.stdout.strip().split(";")[0]

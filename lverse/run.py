"""`lverse pipeline run`: the data stages in order, each once, on Ray.

    download -> tokenizer -> encode

Everything goes under ``run_dir``: ``config.yaml`` (the resolved config), ``shards/`` (image
shards), ``tokenizer.model``, ``tokens/`` (token shards) and ``_done/{stage}.json``, the done
marker of each stage, written when it finishes. A rerun skips finished stages; an unfinished one
resumes, since every stage skips its finished shards. With no Ray address a local Ray is started;
``auto`` joins a running cluster (``ray up``, or the SLURM template).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from lverse.core.config import write_config
from lverse.core.errors import InputError
from lverse.core.files import atomic_write_json
from lverse.core.shards import expand_shards, iter_samples
from lverse.core.storage import is_url
from lverse.pipeline.configs import DownloadConfig, EncodeConfig, TokenizerConfig
from lverse.pipeline.download import plan, run_download
from lverse.pipeline.encode import run_encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str  # everything the pipeline writes
    download: dict = field(default_factory=dict)  # DownloadConfig fields (input required; not output)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encode: dict = field(default_factory=dict)  # EncodeConfig fields (vae required; not shards/output)
    ray_address: str | None = None  # None: start a local Ray; "auto": join the running cluster

    def __post_init__(self):
        if is_url(self.run_dir):
            # The tokenizer is fitted into run_dir and SentencePiece reads only local files; the
            # stage commands take s3:// shard folders one by one.
            raise InputError(f"run_dir {self.run_dir}: the pipeline's run folder holds the tokenizer, which "
                             "SentencePiece reads from a local file: give a local (shared) folder, or run "
                             "`lverse download` and `lverse encode` with s3:// --output folders")


def _stage_config(cls, values: dict, where: str, **fixed):
    clash = sorted(set(values) & set(fixed))
    if clash:
        raise InputError(f"{where}: {clash} are set by the pipeline (from run_dir); remove them")
    try:
        return cls(**values, **fixed)
    except TypeError as e:
        known = sorted(f.name for f in dataclasses.fields(cls) if f.name not in fixed)
        raise InputError(f"{where}: {e}; known keys are {known}") from e


def stage_configs(cfg: PipelineConfig, task: tuple[int, int] | None = None,
                  workers: int | None = None) -> tuple[DownloadConfig, EncodeConfig]:
    """The download and encode stage configs of a pipeline config: on Ray, or, as SLURM array
    task ``task = (index, count)``, in local processes on the task's block of the work."""
    run = cfg.run_dir
    where = {"executor": "ray", "ray_address": cfg.ray_address}
    if task is not None:
        where = {"executor": "local", "ray_address": None, "task_index": task[0], "num_tasks": task[1]}
    download = _stage_config(DownloadConfig, cfg.download, "download", output=os.path.join(run, "shards"), **where)
    encode = _stage_config(EncodeConfig, cfg.encode, "encode", shards=os.path.join(run, "shards"),
                           output=os.path.join(run, "tokens"), **where)
    if workers:
        encode = dataclasses.replace(encode, workers=workers)
    return download, encode


def stage_items(cfg: PipelineConfig, stage: str) -> list:
    """What a stage's array tasks split between them: download chunks (planned now, which
    validates the input) or image shards to encode."""
    download, encode = stage_configs(cfg)
    if stage == "download":
        if not os.path.isfile(download.input):
            raise FileNotFoundError(f"download.input {download.input} does not exist")
        os.makedirs(download.output, exist_ok=True)
        return plan(download)[0]
    return expand_shards(encode.shards) if os.path.isdir(encode.shards) else []


def run_stage_task(cfg: PipelineConfig, stage: str, task_index: int, num_tasks: int, workers: int | None = None):
    """One SLURM array task of ``stage``; idempotent, no stage marker (the array as a whole is
    done when every task is)."""
    download, encode = stage_configs(cfg, (task_index, num_tasks), workers)
    if stage == "download":
        return run_download(download)
    if stage == "encode":
        return run_encode(encode)
    raise InputError(f"--stage must be download or encode, got {stage!r}")


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the stages not yet done; returns each stage's result."""
    run = cfg.run_dir
    download, encode = stage_configs(cfg)
    os.makedirs(run, exist_ok=True)
    write_config(os.path.join(run, "config.yaml"), cfg)
    stages = [("download", lambda: run_download(download)),
              ("tokenizer", lambda: fit_tokenizer_on_shards(encode.shards, os.path.join(run, "tokenizer"),
                                                            cfg.tokenizer)),
              ("encode", lambda: run_encode(encode))]
    results = {}
    for name, stage in stages:
        marker = os.path.join(run, "_done", f"{name}.json")
        if os.path.exists(marker):
            log.info("stage %s: done before, skipped", name)
            continue
        log.info("stage %s: starting", name)
        results[name] = stage()
        atomic_write_json(marker, results[name])
    return results


def fit_tokenizer_on_shards(shards: str, prefix: str, stage: TokenizerConfig) -> dict:
    """Fit the caption tokenizer on the captions of the downloaded shards."""
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer

    def captions():
        for shard in expand_shards(shards):
            for sample in iter_samples(shard):
                if "txt" in sample:
                    yield sample["txt"].decode("utf-8", errors="replace")

    tok = CaptionTokenizer.fit(captions(), prefix, vocab_size=stage.vocab_size, max_sentences=stage.max_sentences)
    return {"model": tok.model_path, "vocab_size": tok.vocab_size}

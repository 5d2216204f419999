"""The ``lverse`` command: one subcommand per stage, each a thin wrapper over a library function.

Every command's options come from one dataclass (``Command``, core/config.py ``add_options``: the
dataclass is the one place of their names, types, defaults and help). Every ``main`` takes
``argv`` so tests call it directly; arguments are checked before any work starts. Bad input
(InputError, a missing file, a path that cannot serve: read-only, a file where a folder is
expected or the other way round, core/files.py bad_path_message) is one line that says what to
change and exit status 2; a stage with failed items (StageFailed) or a demo below its target
exits 1, its finished work kept; any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import inspect
import json
import logging
import multiprocessing
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Literal

from lverse.core import storage
from lverse.core.config import add_options, flag, given_options, load_config, options_to_config
from lverse.core.errors import InputError
from lverse.core.files import bad_path_message, full_storage_message
from lverse.demo import DemoConfig
from lverse.pipeline.configs import (
    CaptionConfig,
    ClipTrainConfig,
    DownloadConfig,
    EncodeConfig,
    GenerateConfig,
    TokenizerConfig,
    TrainConfig,
    VAETrainConfig,
)
from lverse.preprocessing.coco import CocoConfig
from lverse.runtime.lifetime import end_temporary_folder, own_temporary_folder
from lverse.runtime.tasks import StageFailed
from lverse.slurm.render import SubmitOptions

log = logging.getLogger("lverse")

# Integer options that count something: the command line refuses 0 and negatives as it parses them.
# Not a shard stage's --workers: it takes 0 (its items in the command's process), so each config
# checks its own (Execution, CocoConfig).
COUNTS = frozenset({
    "vocab_size", "max_sentences", "image_size", "samples_per_shard", "download_threads", "threads",
    "num_tasks", "batch_size", "decode_threads", "decode_batch", "candidates", "max_tokens", "top_k", "steps",
    "train", "heldout", "prompts", "vae_ml_steps", "vae_sl_steps", "biart_steps", "clip_steps",
    "caption_candidates", "image_candidates", "nodes", "ntasks_per_node", "cpus_per_task", "limit",
    "max_captions", "step"})
MODEL_FILES = ("checkpoint", "vae", "tokenizer", "clip_checkpoint")


class DemoBelowTarget(Exception):
    pass


# -- option checks -------------------------------------------------------------------------------

def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object ({{...}}) is needed, not {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


# -- the commands --------------------------------------------------------------------------------
# Every command's options are made from one dataclass (core/config.py add_options): a stage's
# config (pipeline/configs.py and the other layers' light config modules), or, for a command that
# is no stage, a small one here. The function gets the dataclass, built from the options given (and
# from --config's YAML under them, for the commands that take one). Its docstring is its help: the
# first line the one-line summary of `lverse --help`, the rest the description of
# `lverse NAME --help`. Nothing here imports torch, DeepSpeed or Ray: a command imports its stage
# when it runs, so `lverse --help` and `lverse NAME --help` answer at once.

@dataclass(frozen=True)
class Command:
    func: Callable
    options: type  # the dataclass the options are made from, and that func takes
    positional: tuple[str, ...] = ()  # fields that are positional arguments, in this order
    files: tuple[str, ...] = ()  # fields that must name existing files
    skip: tuple[str, ...] = ()  # fields with no option (the YAML file's or the dataclass's default)
    positive: tuple[str, ...] = ()  # more fields that must be positive (beside COUNTS)
    config_file: Literal["optional", "required"] | None = None  # whether --config YAML takes the fields

    def add_options(self, p: argparse.ArgumentParser) -> None:
        if self.config_file:
            required = ", ".join(flag(f.name) for f in fields(self.options)
                                 if f.default is MISSING and f.default_factory is MISSING)
            p.add_argument("--config", required=self.config_file == "required", type=_existing_file,
                           help=f"a YAML of {self.options.__name__} fields (the options below); options given "
                           f"here override its values" + (f". Without it, {required} are required"
                                                          if self.config_file == "optional" and required else ""))
        names = {f.name for f in fields(self.options)}
        types = {n: _positive for n in (COUNTS & names) | set(self.positive)} | {n: _existing_file for n in self.files}
        add_options(p, self.options, skip=self.skip, positional=self.positional, types=types,
                    required=False if self.config_file else None)

    def config(self, args: argparse.Namespace):
        """The dataclass from the options, on top of --config's YAML when one is given."""
        if getattr(args, "config", None) and self.config_file:
            return load_config(args.config, self.options, given_options(self.options, args))
        return options_to_config(self.options, args)


COMMANDS: dict[str, Command] = {}


def command(name: str, options: type, **kwargs):
    def register(func):
        COMMANDS[name] = Command(func, options, **kwargs)
        return func
    return register


@dataclass(frozen=True, kw_only=True)
class TokenizerOptions(TokenizerConfig):
    # a text file with one caption per line, or a Conceptual Captions TSV (CC3M caption<TAB>url or CC12M
    # url<TAB>caption)
    captions: str
    output: str  # output prefix, e.g. runs/cc3m/tokenizer


@command("tokenizer", TokenizerOptions, files=("captions",))
def _tokenizer(opts: TokenizerOptions) -> None:
    """fit the SentencePiece BPE caption tokenizer

    Fit a SentencePiece BPE model on captions (no BPE-dropout while fitting; BiART applies dropout
    0.1 when it trains). Writes PREFIX.model and PREFIX.vocab.
    """
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer, iter_captions
    tok = CaptionTokenizer.fit(iter_captions(opts.captions), opts.output, vocab_size=opts.vocab_size,
                               max_sentences=opts.max_sentences)
    log.info("tokenizer with %d pieces written to %s", tok.vocab_size, tok.model_path)


@dataclass(frozen=True)
class ConvertVAEOptions:
    input: str  # .ckpt or .safetensors
    output: str  # output .safetensors path
    to_sl: bool = False  # convert an ML model to SL


@command("convert-vae", ConvertVAEOptions, files=("input",))
def _convert_vae(opts: ConvertVAEOptions) -> None:
    """import an official AugVAE checkpoint, or turn ML into SL

    Read an AugVAE (the authors' Lightning .ckpt, or an lverse .safetensors) and write it as an
    lverse .safetensors file, optionally converted from ML to SL (fresh connectors: fine-tune
    afterwards).
    """
    from lverse.model.augvae import AugVAE, ml_to_sl
    from lverse.model.checkpoint import save_model
    vae = AugVAE.load(opts.input)
    if opts.to_sl:
        vae = ml_to_sl(vae)
    save_model(vae, opts.output)
    log.info("AugVAE-%s (%d tokens per image) written to %s", vae.cfg.variant.upper(),
             vae.cfg.num_tokens, opts.output)


# --threads is not offered: download's compute threads do not matter (--download-threads are its
# concurrent requests).
@command("download", DownloadConfig, files=("input",), skip=("threads",))
def _download(cfg: DownloadConfig) -> None:
    """fetch image-caption lists into webdataset shards (img2dataset)

    Validate the input (malformed lines are counted, never fatal), split it into chunks of
    --samples-per-shard rows and fetch each chunk with img2dataset into one shard: NNNNN.tar (jpg,
    txt, json), NNNNN.parquet (every row with its status), NNNNN_stats.json (written last: the
    shard is done). A rerun fetches only missing shards and retries failed ones. Writes
    _summary.json.
    """
    from lverse.pipeline.download import run_download
    _print_json(run_download(cfg))


@command("coco", CocoConfig, files=("karpathy",))
def _coco(cfg: CocoConfig) -> None:
    """MS-COCO (Karpathy's splits, local images) -> image shards, references and prompts

    Write the paper's MS-COCO sets from Karpathy's split file and the COCO images on disk: train/
    (one sample per caption of the training splits, for encode and train), test/ (one per image of
    the evaluation split, for caption), t2i/ (Table 3's reference images), captions_train.txt
    (for tokenizer), references_test.json (for evaluate captions) and prompts_t2i.txt (for
    generate). A rerun skips finished shards. Writes _summary.json.
    """
    from lverse.preprocessing.coco import prepare_coco
    _print_json(prepare_coco(cfg))


@command("encode", EncodeConfig, files=("vae",))
def _encode(cfg: EncodeConfig) -> None:
    """turn image shards into AugVAE token shards (FP32)

    Encode every image shard into a token shard of the same name (uint16 codes, raw caption, key;
    the AugVAE checkpoint's sha256 recorded) through a frozen AugVAE in FP32. Written atomically
    with a done marker per shard: a rerun skips finished shards. Corrupt images are skipped and
    counted; an unreadable shard fails alone and is retried. Writes _summary.json.
    """
    from lverse.pipeline.encode import run_encode
    _print_json(run_encode(cfg))


@command("caption", CaptionConfig, files=MODEL_FILES, config_file="optional")
def _caption(cfg: CaptionConfig) -> None:
    """caption every image of a webdataset corpus (BiART + CLIP reranking)

    Caption every image of image shards (img2dataset) or token shards (lverse encode): CANDIDATES
    captions of up to MAX_TOKENS text tokens sampled per image with the KV cache, each cut after its
    first full stop, the best kept by CLIP. One parquet per input shard (key, url, caption,
    clip_score, error), written atomically; a rerun skips finished shards. Writes _summary.json.
    """
    from lverse.pipeline.caption import run_caption
    _print_json(run_caption(cfg))


@command("generate", GenerateConfig, files=("prompts", *MODEL_FILES), config_file="optional")
def _generate(cfg: GenerateConfig) -> None:
    """text-to-image: N candidates per prompt, the best by CLIP

    For each prompt (one per line) sample CANDIDATES images with the KV cache, decode them with the
    AugVAE in FP32 and keep the one CLIP scores highest. Writes OUTPUT/NNNNN/ per prompt: best.png,
    candidates/, sheet.png (a contact sheet, the chosen one framed) and result.json (last: a rerun
    skips finished prompts). Prompts are taken PROMPTS_PER_ITEM at a time by local workers (one
    per GPU), Ray actors (--executor ray) or, with --task-index and --num-tasks, SLURM array tasks
    (lverse slurm submit generate). Writes _summary.json.
    """
    from lverse.pipeline.generate import run_generate
    _print_json(run_generate(cfg))


@dataclass(frozen=True)
class EvaluateOptions:
    what: Literal["captions", "reconstruction", "generations", "fid"]  # what to evaluate
    predictions: str | None = None  # captions: COCO results json or a caption output folder
    references: str | None = None  # captions: COCO-format captions json
    shards: str | None = None  # reconstruction, fid (Table 1): image shards
    vae: str | None = None  # reconstruction, fid (Table 1): the AugVAE
    # reconstruction, fid: at most this many images (fid of generations: the first N of each set; None: all)
    limit: int | None = None
    # reconstruction: torchvision VGG16 weights for LPIPS (None: random features, tests only)
    vgg_checkpoint: str | None = None
    device: str = "auto"  # reconstruction, fid: cuda when available, else cpu
    batch_size: int = 16  # reconstruction, fid: images a batch
    # generations: a `lverse generate` output folder; fid (Table 3): that, or a folder of images
    generations: str | None = None
    # fid (Table 3): a folder of images of the generated resolution, or image shards
    reference_images: str | None = None
    # fid (Table 3): Gaussian blur radii applied to both sets, one FID each (None: 0; the paper: 0 1 2 4 8)
    blur_radii: list[float] | None = None
    # fid: torch-fidelity's weights-inception-2015-12-05-6726825d.pth, a local file (never downloaded)
    inception_weights: str | None = None
    output: str | None = None  # also write the metrics to this json file


@command("evaluate", EvaluateOptions, positional=("what",), files=("references", "vae", "vgg_checkpoint"))
def _evaluate(opts: EvaluateOptions) -> None:
    """caption metrics, reconstruction metrics, CLIP score and FID of generations

    captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, Java) and SPICE when its Stanford
    models are present, of predictions (COCO results json or a `lverse caption` output folder)
    against COCO-format references, for the predictions truncated at their first full stop and
    whole (Table 2). reconstruction: PSNR, SSIM, LPIPS of AugVAE reconstructions of image shards.
    generations: CLIP score of `lverse generate` output. fid: with --shards and --vae, FID of AugVAE
    reconstructions against the images (Table 1); with --generations and --reference-images, FID
    of generated against reference images at each --blur-radii (Table 3); both with torch-fidelity's
    Inception-v3 from --inception-weights.
    """
    from lverse.core.files import atomic_write_json
    from lverse.pipeline import evaluate as ev
    if opts.blur_radii is not None and (opts.what != "fid" or opts.shards):
        raise InputError("--blur-radii applies to evaluate fid of --generations against --reference-images")
    if opts.what == "captions":
        if not (opts.predictions and opts.references):
            raise InputError("evaluate captions needs --predictions and --references")
        metrics = ev.caption_metrics(ev.load_predictions(opts.predictions), ev.load_references(opts.references))
    elif opts.what == "reconstruction":
        if not (opts.shards and opts.vae):
            raise InputError("evaluate reconstruction needs --shards and --vae")
        metrics = ev.reconstruction_metrics(opts.shards, opts.vae, limit=opts.limit, batch_size=opts.batch_size,
                                            vgg_checkpoint=opts.vgg_checkpoint, device=opts.device)
    elif opts.what == "fid":
        metrics = _fid(opts)
    else:
        if not opts.generations:
            raise InputError("evaluate generations needs --generations")
        metrics = ev.generation_clip_score(opts.generations)
    if opts.output:
        atomic_write_json(opts.output, metrics)
    _print_json(metrics)


def _fid(opts: EvaluateOptions) -> dict:
    from lverse.pipeline import evaluate as ev
    reconstruction, generation = bool(opts.shards or opts.vae), bool(opts.generations or opts.reference_images)
    if reconstruction == generation or not (opts.shards and opts.vae or opts.generations and opts.reference_images):
        raise InputError("evaluate fid needs either --shards and --vae (AugVAE reconstructions, Table 1) or "
                         "--generations and --reference-images (text to image, Table 3)")
    if reconstruction:
        return ev.reconstruction_fid(opts.shards, opts.vae, opts.inception_weights, limit=opts.limit,
                                     batch_size=opts.batch_size, device=opts.device)
    return ev.generation_fid(opts.generations, opts.reference_images, opts.inception_weights,
                             blur_radii=tuple(opts.blur_radii or (0,)), limit=opts.limit,
                             batch_size=opts.batch_size, device=opts.device)


@dataclass(frozen=True)
class ReportOptions:
    run_dir: str  # the run folder
    images: str | None = None  # image shards to show captioned images from (looked up by key)
    max_captions: int = 24  # captions shown


@command("report", ReportOptions, positional=("run_dir",))
def _report(opts: ReportOptions) -> None:
    """write a static HTML report of a run folder

    Gather what the stages left under RUN_DIR (training curves from metrics.jsonl, evaluation json,
    AugVAE reconstructions, generated images with their prompts, captions beside their images) into
    RUN_DIR/report/index.html with its images in report/assets/; it opens from disk in a browser,
    no server.
    """
    from lverse.pipeline.report import write_report
    path = write_report(opts.run_dir, images=opts.images, max_captions=opts.max_captions)
    print(path)
    log.info("report written: open %s in a browser (no server needed)", path)


# The model, data and optim sections are the YAML file's alone; every other field has its option.
@command("train", TrainConfig, skip=("model", "data", "optim"), config_file="required")
def _train(cfg: TrainConfig) -> None:
    """train BiART under DeepSpeed ZeRO (resumes by itself)

    Train BiART on token shards, text->image on even steps and image->text on odd ones, under
    DeepSpeed ZeRO. Run it in every process of the job: `deepspeed --num_gpus N --module lverse.cli
    train ...` or torchrun on one node; `srun` (one task per GPU) under SLURM, whose variables are
    mapped for DeepSpeed. A run folder with a complete checkpoint is resumed exactly (model,
    optimizer, loss scale, lr, data position, RNG), also on another number of ranks. SIGTERM
    (preemption, scancel), SIGUSR1 (SLURM's time-limit warning) and SIGINT (Ctrl-C) all make every
    rank stop at the same next step, write one complete checkpoint and RUN_DIR/stopped.json, and
    exit 0; a second signal meanwhile does not interrupt the checkpoint. The run YAML (see
    configs/train_debug.yaml) holds the model, data and optim sections.
    """
    from lverse.pipeline.train import train
    from lverse.runtime.trainer import end_process
    _training(train, cfg)
    end_process()


@command("train-vae", VAETrainConfig, config_file="required")
def _train_vae(cfg: VAETrainConfig) -> None:
    """train AugVAE: ML, conversion to SL, SL fine-tuning (resumes by itself)

    Train AugVAE-ML on image shards, convert it to SL and fine-tune it, data-parallel (torchrun /
    deepspeed launcher / srun, like train) with the EMA codebook all-reduced so every rank holds the
    same one. Writes augvae-ml.safetensors and augvae-sl.safetensors into the run folder; resumes
    from its newest checkpoint. SIGTERM, SIGUSR1 and SIGINT checkpoint at the next step and exit 0,
    as in train. The run YAML: see configs/train_vae_debug.yaml.

    Not elastic (no `lverse slurm submit ... --elastic` for it): its data order and batch depend on
    the number of ranks (shards split among the ranks' readers, global batch = batch_size x ranks,
    no gradient accumulation), so a resume on other ranks would train on another sample order with
    another batch and lr, not go on with the same run. Resume it on the same number of ranks.
    """
    from lverse.pipeline.train_vae import train_vae
    from lverse.runtime.trainer import end_process
    _training(train_vae, cfg)
    end_process()


def _training(train: Callable, cfg) -> None:
    """``train(cfg)``; a DataLoader worker that died fails the command with one line (status 1),
    as a failed shard fails a stage, not with the traceback of a bug."""
    from lverse.runtime.data import dead_worker_message
    try:
        train(cfg)
    except RuntimeError as e:
        message = dead_worker_message(e)
        if message is None:
            raise
        raise StageFailed(message) from None


@command("train-clip", ClipTrainConfig)
def _train_clip(cfg: ClipTrainConfig) -> None:
    """train a small open_clip model from scratch (no pretrained CLIP at hand)

    Contrastive training (open_clip's model and ClipLoss, one process) on the image-caption pairs of
    image shards, all held in memory: for small corpora such as the demo's, where no pretrained CLIP
    can be downloaded. Writes one .safetensors file for --clip MODEL --clip-checkpoint FILE of
    caption and generate.
    """
    from lverse.pipeline.train_clip import train_clip
    _print_json(train_clip(cfg))


@dataclass(frozen=True)
class ExportOptions:
    run_dir: str  # the training run folder
    output: str  # output .safetensors path
    step: int | None = None  # a checkpoint's step (None: the newest)


@command("export", ExportOptions, positional=("run_dir",))
def _export(opts: ExportOptions) -> None:
    """write a training checkpoint as one safetensors file for inference

    Gather the newest complete checkpoint of a training run (any ZeRO stage) into fp32 weights in
    one .safetensors file with the model config, in-process.
    """
    from lverse.pipeline.train import export_checkpoint
    export_checkpoint(opts.run_dir, opts.output, step=opts.step)


@dataclass(frozen=True)
class IndexOptions:
    tokens: str  # a folder of token shards (the --output of lverse encode), or an s3:// prefix
    # the folder to write _index/ into instead of TOKENS (required for s3:// tokens; shared storage on a
    # cluster); training's data.index_dir names the same folder (None: TOKENS)
    index_dir: str | None = None
    workers: int | None = None  # processes reading the tars (None: the cores this process may use, at most 16)
    quiet: bool = False  # no progress bar


@command("index", IndexOptions, positive=("workers",))
def _index(opts: IndexOptions) -> None:
    """build the token index that BiART training reads its samples from

    Write TOKENS/_index/: every finished shard's samples (a tar with its NNNNN_stats.json) in
    memory-mapped files, so that training can read any sample in one global shuffled order, resume
    at exactly the next sample on any number of ranks, and run more ranks x DataLoader workers than
    there are shards. It holds the AugVAE codes (N x image_len uint16: 2 KiB a sample for 1024
    codes, about 6 GB for CC3M), the captions and keys with their offsets, and meta.json: each
    shard's sample count, stats file, tar size and mtime, and the AugVAE's sha256. It is written
    under a temporary name and renamed into place. lverse train builds it when it is missing (rank
    0, the others wait) and refuses one that no longer matches the shards (a shard re-encoded or
    added): run this command after changing the shards. An index that matches the folder's
    finished shards is left as it is. Token shards in an object store (s3://) are indexed into
    --index-dir (INDEX_DIR/_index/). Prints a summary (samples, shards, bytes, seconds).
    """
    from lverse.runtime.token_index_build import index_folder
    storage.check_input(opts.tokens)
    if not storage.isdir(opts.tokens):
        raise FileNotFoundError(f"--tokens {opts.tokens} is not a folder")
    _print_json(index_folder(opts.tokens, progress=not opts.quiet, workers=opts.workers, index_dir=opts.index_dir))


@dataclass(frozen=True)
class SyntheticOptions:
    action: Literal["serve"]  # serve
    output: str  # folder for train.tsv and heldout.tsv
    port: int = 0  # port (0: a free one)
    train: int = 1000  # train samples
    heldout: int = 100  # held-out samples
    image_size: int = 128  # side of served images
    bad_urls: bool = True  # put the bad URLs into train.tsv
    seed: int = 0  # random seed


@command("synthetic", SyntheticOptions, positional=("action",))
def _synthetic_serve(opts: SyntheticOptions) -> None:
    """serve the synthetic image-caption set on 127.0.0.1

    Serve procedurally drawn image-caption pairs over HTTP on 127.0.0.1 (the offline stand-in for
    Conceptual Captions), with bad URLs (404, 500, timeout, truncated JPEG, HTML, redirect); writes
    train.tsv and heldout.tsv in CC3M layout.
    """
    from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet
    data = SyntheticSet(seed=opts.seed, train=opts.train, heldout=opts.heldout, image_size=opts.image_size)
    with SyntheticServer(data, port=opts.port) as server:
        paths = server.write_tsv(opts.output, bad_urls=opts.bad_urls)
        log.info("serving %s; TSVs: %s (Ctrl-C to stop)", server.url, paths)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


@dataclass(frozen=True)
class PipelineOptions:
    action: Literal["run"]  # run
    config: str  # pipeline YAML (see configs/pipeline_cc3m.yaml)
    run_dir: str | None = None  # override run_dir of the config
    ray_address: str | None = None  # override ray_address of the config: the Ray cluster to join, e.g. auto
    # run only this stage's block of work as one SLURM array task (with --task-index, --num-tasks), in local
    # processes; the slurm templates call this
    stage: Literal["download", "encode"] | None = None
    task_index: int | None = None  # this array task's index (0-based)
    num_tasks: int | None = None  # the number of array tasks
    workers: int | None = None  # encode: model replicas in this task


@command("pipeline", PipelineOptions, positional=("action", "config"), files=("config",), positive=("workers",))
def _pipeline_run(opts: PipelineOptions) -> None:
    """run the data stages in order: download, tokenizer, encode

    Run download -> tokenizer -> encode from one YAML config on Ray, each stage once: a done marker
    per stage in the run folder, and a rerun continues where it stopped. Sections: run_dir,
    download (DownloadConfig: input, samples_per_shard, ...), tokenizer (vocab_size), encode
    (EncodeConfig: vae, batch_size, workers, ...), ray_address.
    """
    from lverse.run import PipelineConfig, run_pipeline, run_stage_task
    cfg = load_config(opts.config, PipelineConfig, {"run_dir": opts.run_dir, "ray_address": opts.ray_address})
    if opts.stage or opts.task_index is not None:
        if not (opts.stage and opts.task_index is not None and opts.num_tasks):
            raise InputError("--stage, --task-index and --num-tasks go together (one SLURM array task)")
        _print_json(run_stage_task(cfg, opts.stage, opts.task_index, opts.num_tasks, opts.workers))
        return
    results = run_pipeline(cfg)
    log.info("pipeline finished in %s; stages run now: %s", cfg.run_dir, sorted(results) or "none")


@dataclass(kw_only=True)
class SlurmOptions(SubmitOptions):
    action: Literal["submit"]  # submit
    # ray: the command to run on the Ray cluster, one string, e.g. "lverse pipeline run cfg.yaml --ray-address
    # auto" (split like a shell would; every word is quoted again)
    command: str = ""


@command("slurm", SlurmOptions, positional=("action", "stage"))
def _slurm_submit(opts: SlurmOptions) -> None:
    """submit a stage as a SLURM job from its template (slurm/*.sbatch)

    Render the stage's SLURM template with this run's values (validated and shell-quoted), keep the
    script in RUN_DIR/slurm/, and submit it with sbatch (the job id is printed). download and encode
    are job arrays over input chunks / shard blocks (planned now; a task skips finished shards, so a
    requeued one redoes only the rest); train runs one task per GPU through srun and requeues
    itself after checkpointing on the time-limit warning; ray starts a Ray cluster in the allocation
    and runs --command.
    """
    from lverse.plans import plan
    from lverse.slurm.render import check, submit
    values = {f.name: getattr(opts, f.name) for f in fields(SubmitOptions)}
    submission = SubmitOptions(**values | {"command": shlex.split(opts.command)})
    check(submission)
    path, job = submit(submission, plan(submission.stage, submission.config))
    if job is None:
        with open(path) as f:
            print(f.read(), end="")
        log.info("dry run: script kept at %s, not submitted", path)
    else:
        print(job)
        log.info("submitted job %s (script: %s)", job, path)


@dataclass(frozen=True)
class DevicesOptions:
    device: str = "auto"  # what a stage is given: auto, cpu, cuda or cuda:N


@command("devices", DevicesOptions)
def _devices(opts: DevicesOptions) -> None:
    """print the device this process would use, and why

    The rule every stage and training rank uses (core/resources.py pick_device): it follows
    what the process sees (CUDA_VISIBLE_DEVICES, the device count, LOCAL_RANK or SLURM_LOCALID).
    Run it as a job's tasks to check a binding before a long job, e.g.
    srun --ntasks-per-node=4 --gpus-per-task=1 lverse devices. On a machine without CUDA it
    answers for the devices CUDA_VISIBLE_DEVICES lists, as a CUDA machine would see them.
    """
    from lverse.core.resources import cuda_count, pick_device, visible_gpus
    cuda = cuda_count() > 0
    pick = pick_device(opts.device, count=None if cuda else len(visible_gpus()))
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    print(pick.describe(f"rank {rank}") + ("" if cuda else " [no CUDA here: what a CUDA process would use]"))


@command("demo", DemoConfig)
def _demo(cfg: DemoConfig) -> None:
    """run the whole pipeline on synthetic data, on a CPU, in under 20 minutes

    Serve synthetic image-caption pairs on 127.0.0.1 and run every stage on them as the command a
    user would type (each is printed): download (img2dataset), tokenizer, train-vae, encode (Ray),
    train (BiART, DeepSpeed, both directions), train-clip, caption and generate (CLIP-reranked),
    evaluate, report. A rerun skips finished stages. Ends with the report's path and the held-out
    caption_accuracy and t2i_color_accuracy (lverse/demo.py says how they are judged); exits 1 if
    either is below --min-accuracy. Before BiART trains, the AugVAE must keep the shapes' colours in
    the held-out reconstructions (lverse/demo.py VAE_GATE), or the demo stops there.
    """
    from lverse.demo import Demo
    results = Demo(cfg).run()
    log.info("demo finished in %d s; the report: %s", results["seconds"], results["report"])
    print(f"report={results['report']}")
    print(f"caption_accuracy={results['caption_accuracy']:.3f}")
    print(f"t2i_color_accuracy={results['t2i_color_accuracy']:.3f}")
    low = [k for k in ("caption_accuracy", "t2i_color_accuracy") if results[k] < cfg.min_accuracy]
    if low:
        raise DemoBelowTarget(f"{' and '.join(low)} below --min-accuracy {cfg.min_accuracy}: the models did not "
                              "learn enough (more steps?)")


# -- the parser and the exit status --------------------------------------------------------------

def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only``, only that command gets its options (the others
    keep their one-line summary), which is all that parsing a command line needs: making every
    command's options reads every config class's source for its help, and takes longer than the
    rest of ``lverse --help`` (benchmarks/cli.py)."""
    # No abbreviated options: a prefix that matches today (--ray for --ray-address) would change
    # meaning when an option is added.
    parser = argparse.ArgumentParser(prog="lverse", description=__doc__.split("\n")[0].replace("``", ""),
                                     allow_abbrev=False)
    # The `deepspeed` launcher passes --local_rank=N before the subcommand (LOCAL_RANK is read instead).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                        help="options for s3:// paths, as s3fs takes them, e.g. '{\"endpoint_url\": "
                             "\"http://10.0.0.5:9000\"}' (credentials: the usual AWS variables); they reach "
                             "every process the command starts")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        summary, _, description = inspect.getdoc(cmd.func).partition("\n\n")
        p = sub.add_parser(name, help=summary, description=description, allow_abbrev=False)
        if only in (None, name):
            cmd.add_options(p)
        p.set_defaults(lverse_command=cmd)  # not a field name of any command
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: the stage stops its workers and keeps what is done."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    if not faulthandler.is_enabled():  # a crash in native code (or an abort) prints every thread's stack
        faulthandler.enable()
    named = [word for word in (sys.argv[1:] if argv is None else argv) if word in COMMANDS]
    args = build_parser(named[0] if named else "").parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.storage_options is not None:
            storage.configure(args.storage_options)
        args.lverse_command.func(args.lverse_command.config(args))
    except (InputError, FileNotFoundError) as e:  # bad input: say what to change
        log.error("%s", e)
        return 2
    except OSError as e:  # a path that cannot serve is bad input too; the storage failing mid-work is not
        message = bad_path_message(e)
        if message is not None:
            log.error("%s", message)
            return 2
        message = full_storage_message(e)
        if message is None:
            raise
        log.error("%s", message)  # what is finished is kept, as for a failed shard
        return 1
    except (StageFailed, DemoBelowTarget) as e:  # the rest is done and kept; a rerun retries what failed
        log.error("%s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the workers are ended, finished shards kept
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        log.error("stopped by %s; what finished is kept, and the same command continues from there", name)
        return 128 + getattr(signal, name)
    return 0  # anything else is a bug: it propagates with its traceback


def run() -> None:
    """The ``lverse`` command (and ``python -m lverse.cli``): ``main``, then ``exit_now``. A bug's
    traceback is printed as the interpreter prints it, and the status is 1, as it would be. Every
    temporary file of the command's processes is made in a folder of its own, removed at its end
    (runtime/lifetime.py ``own_temporary_folder``)."""
    temporary = own_temporary_folder()
    try:
        code = main()
    except SystemExit:  # argparse's: --help answered, or a usage error
        end_temporary_folder(temporary)
        raise
    except Exception:
        traceback.print_exc()
        code = 1
    exit_now(code, temporary)


def exit_now(code: int, temporary: str | None = None) -> None:
    """End the process with ``code`` once the command is done or has failed, without the
    interpreter's teardown of native libraries, and without waiting on a daemonic child.

    Python's exit first joins the threads and runs the atexit handlers (Ray's shutdown,
    multiprocessing ending its children, logging's flush), then tears down the modules and the
    libraries' global state. In that last part native threads still alive (Arrow's I/O pool, a
    process group's backend) may need the GIL: Python ends such a thread, and the process aborts
    with "terminate called without an active exception" after its work is done, which a job
    script or a scheduler takes for a failure (seen in most full test runs on a busy 2-core
    machine, each time another process: a download array task, a rank of a finished 2-rank
    training run). So this does the first part as the interpreter would, flushes the standard
    streams and leaves with ``os._exit``. The price: objects still alive are not finalised, which
    lverse never relies on: every file it writes is closed (and renamed into place) before the
    command returns.

    Daemonic children still alive (DataLoader workers, when training failed while they ran) are
    killed first: multiprocessing's exit handler sends them SIGTERM and then waits for them, and a
    DataLoader worker ignores SIGTERM (runtime/trainer.py ``ignore_stop_signals``: a scheduler
    signals every process of a job step, and only the training process may act on it), so a run
    that failed after its loader started would wait forever (under SLURM, until its time limit). A
    daemonic child is one its parent's exit ends by definition; none of lverse's cleans up on
    SIGTERM."""
    daemonic = [child for child in multiprocessing.active_children() if child.daemon]
    if daemonic and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each as a failed worker
    for child in daemonic:
        child.kill()
    threading._shutdown()  # what the interpreter's exit does first: join the non-daemon threads
    atexit._run_exitfuncs()
    if temporary is not None:  # its processes have ended: the workers with the stage, Ray at its shutdown
        end_temporary_folder(temporary)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()

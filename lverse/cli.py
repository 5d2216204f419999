"""The ``lverse`` command: one subcommand per stage, each a thin wrapper over a library function.

A stage whose work a config dataclass describes takes its options from it (``add_options``: the
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
import dataclasses
import faulthandler
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable

from lverse.core import storage
from lverse.core.config import add_options, given_options, load_config, options_to_config
from lverse.core.errors import InputError
from lverse.core.files import bad_path_message
from lverse.demo import DemoConfig
from lverse.pipeline.caption import CaptionConfig
from lverse.pipeline.download import DownloadConfig
from lverse.pipeline.encode import EncodeConfig
from lverse.pipeline.generate import GenerateConfig
from lverse.pipeline.train_clip import ClipTrainConfig
from lverse.preprocessing.coco import CocoConfig
from lverse.run import TokenizerStage
from lverse.runtime.tasks import StageFailed
from lverse.slurm.render import STAGES, SubmitOptions

log = logging.getLogger("lverse")

# Integer options that count something: the command line refuses 0 and negatives as it parses them.
# Not --workers: a shard stage takes 0 (its items in the command's process), so each config checks
# its own (Execution, CocoConfig).
COUNTS = frozenset({
    "vocab_size", "max_sentences", "image_size", "samples_per_shard", "download_threads", "threads",
    "num_tasks", "batch_size", "decode_threads", "decode_batch", "candidates", "max_tokens", "top_k", "steps",
    "train", "heldout", "prompts", "vae_ml_steps", "vae_sl_steps", "biart_steps", "clip_steps",
    "caption_candidates", "image_candidates", "nodes", "ntasks_per_node", "cpus_per_task"})


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


def _options(p: argparse.ArgumentParser, cls: type, files: tuple[str, ...] = (), **kwargs) -> None:
    """The options of config dataclass ``cls``, with the command line's own checks: ``files``
    must exist, counts be positive."""
    names = {f.name for f in dataclasses.fields(cls)}
    add_options(p, cls, types={n: _positive for n in COUNTS & names} | {n: _existing_file for n in files}, **kwargs)


def _check_execution(cfg) -> None:
    if cfg.ray_address and cfg.executor != "ray":
        raise InputError(f"--ray-address {cfg.ray_address} is the Ray cluster of --executor ray: add it")


def _stage_config(cls: type, args: argparse.Namespace):
    """The config of a shard stage (an Execution) from its options."""
    cfg = options_to_config(cls, args)
    _check_execution(cfg)
    return cfg


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


# -- the commands --------------------------------------------------------------------------------
# Each is registered with the function that adds its options. Its docstring is its help: the first
# line the one-line summary of `lverse --help`, the rest the description of `lverse NAME --help`.

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, options: Callable[[argparse.ArgumentParser], None]):
    def register(func):
        COMMANDS[name] = (func, options)
        return func
    return register


def _tokenizer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captions", required=True, type=_existing_file,
                   help="a text file with one caption per line, or a Conceptual Captions TSV "
                   "(CC3M caption<TAB>url or CC12M url<TAB>caption)")
    p.add_argument("--output", required=True, help="output prefix, e.g. runs/cc3m/tokenizer")
    _options(p, TokenizerStage)


@command("tokenizer", _tokenizer_options)
def _tokenizer(args: argparse.Namespace) -> None:
    """fit the SentencePiece BPE caption tokenizer

    Fit a SentencePiece BPE model on captions (no BPE-dropout while fitting; BiART applies dropout
    0.1 when it trains). Writes PREFIX.model and PREFIX.vocab.
    """
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer, iter_captions
    stage = options_to_config(TokenizerStage, args)
    tok = CaptionTokenizer.fit(iter_captions(args.captions), args.output, vocab_size=stage.vocab_size,
                               max_sentences=stage.max_sentences)
    log.info("tokenizer with %d pieces written to %s", tok.vocab_size, tok.model_path)


def _convert_vae_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, type=_existing_file, help=".ckpt or .safetensors")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.add_argument("--to-sl", action="store_true", help="convert an ML model to SL")


@command("convert-vae", _convert_vae_options)
def _convert_vae(args: argparse.Namespace) -> None:
    """import an official AugVAE checkpoint, or turn ML into SL

    Read an AugVAE (the authors' Lightning .ckpt, or an lverse .safetensors) and write it as an
    lverse .safetensors file, optionally converted from ML to SL (fresh connectors: fine-tune
    afterwards).
    """
    from lverse.model.augvae import AugVAE, ml_to_sl
    from lverse.model.checkpoint import save_model
    vae = AugVAE.load(args.input)
    if args.to_sl:
        vae = ml_to_sl(vae)
    save_model(vae, args.output)
    log.info("AugVAE-%s (%d tokens per image) written to %s", vae.cfg.variant.upper(),
             vae.cfg.num_tokens, args.output)


# --threads is not offered: download's compute threads do not matter, and until the options came from
# DownloadConfig, --threads was what --download-threads is now; an old command line fails loudly.
@command("download", lambda p: _options(p, DownloadConfig, files=("input",), skip=("threads",)))
def _download(args: argparse.Namespace) -> None:
    """fetch image-caption lists into webdataset shards (img2dataset)

    Validate the input (malformed lines are counted, never fatal), split it into chunks of
    --samples-per-shard rows and fetch each chunk with img2dataset into one shard: NNNNN.tar (jpg,
    txt, json), NNNNN.parquet (every row with its status), NNNNN_stats.json (written last: the
    shard is done). A rerun fetches only missing shards and retries failed ones. Writes
    _summary.json.
    """
    from lverse.pipeline.download import run_download
    _print_json(run_download(_stage_config(DownloadConfig, args)))


@command("coco", lambda p: _options(p, CocoConfig, files=("karpathy",)))
def _coco(args: argparse.Namespace) -> None:
    """MS-COCO (Karpathy's splits, local images) -> image shards, references and prompts

    Write the paper's MS-COCO sets from Karpathy's split file and the COCO images on disk: train/
    (one sample per caption of the training splits, for encode and train), test/ (one per image of
    the evaluation split, for caption), t2i/ (Table 3's reference images), captions_train.txt
    (for tokenizer), references_test.json (for evaluate captions) and prompts_t2i.txt (for
    generate). A rerun skips finished shards. Writes _summary.json.
    """
    from lverse.preprocessing.coco import prepare_coco
    _print_json(prepare_coco(options_to_config(CocoConfig, args)))


@command("encode", lambda p: _options(p, EncodeConfig, files=("vae",)))
def _encode(args: argparse.Namespace) -> None:
    """turn image shards into AugVAE token shards (FP32)

    Encode every image shard into a token shard of the same name (uint16 codes, raw caption, key;
    the AugVAE checkpoint's sha256 recorded) through a frozen AugVAE in FP32. Written atomically
    with a done marker per shard: a rerun skips finished shards. Corrupt images are skipped and
    counted; an unreadable shard fails alone and is retried. Writes _summary.json.
    """
    from lverse.pipeline.encode import run_encode
    _print_json(run_encode(_stage_config(EncodeConfig, args)))


_MODEL_FILES = ("checkpoint", "vae", "tokenizer", "clip_checkpoint")


def _with_config(cls: type, files: tuple[str, ...]):
    """Options of a stage that also runs from a YAML file (``--config``), as the SLURM templates do."""
    def options(p: argparse.ArgumentParser) -> None:
        required = ", ".join("--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)
                             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        p.add_argument("--config", default=None, type=_existing_file,
                       help=f"a YAML of {cls.__name__} fields (the options below); options given here override "
                       f"its values. Without it, {required} are required")
        _options(p, cls, files=files, required=False)
    return options


def _config_from(cls: type, args: argparse.Namespace):
    if args.config:  # the SLURM templates' way: the file, with --task-index and --num-tasks on top
        return load_config(args.config, cls, given_options(cls, args))
    return options_to_config(cls, args)


@command("caption", _with_config(CaptionConfig, _MODEL_FILES))
def _caption(args: argparse.Namespace) -> None:
    """caption every image of a webdataset corpus (BiART + CLIP reranking)

    Caption every image of image shards (img2dataset) or token shards (lverse encode): CANDIDATES
    captions of up to MAX_TOKENS text tokens sampled per image with the KV cache, each cut after its
    first full stop, the best kept by CLIP. One parquet per input shard (key, url, caption,
    clip_score, error), written atomically; a rerun skips finished shards. Writes _summary.json.
    """
    from lverse.pipeline.caption import run_caption
    cfg = _config_from(CaptionConfig, args)
    _check_execution(cfg)
    _print_json(run_caption(cfg))


@command("generate", _with_config(GenerateConfig, ("prompts", *_MODEL_FILES)))
def _generate(args: argparse.Namespace) -> None:
    """text-to-image: N candidates per prompt, the best by CLIP

    For each prompt (one per line) sample CANDIDATES images with the KV cache, decode them with the
    AugVAE in FP32 and keep the one CLIP scores highest. Writes OUTPUT/NNNNN/ per prompt: best.png,
    candidates/, sheet.png (a contact sheet, the chosen one framed) and result.json (last: a rerun
    skips finished prompts). Prompts are taken PROMPTS_PER_ITEM at a time by local workers (one
    per GPU), Ray actors (--executor ray) or, with --task-index and --num-tasks, SLURM array tasks
    (lverse slurm submit generate). Writes _summary.json.
    """
    from lverse.pipeline.generate import run_generate
    cfg = _config_from(GenerateConfig, args)
    _check_execution(cfg)
    _print_json(run_generate(cfg))


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["captions", "reconstruction", "generations", "fid"], help="what to evaluate")
    p.add_argument("--predictions", default=None, help="captions: COCO results json or a caption output folder")
    p.add_argument("--references", default=None, type=_existing_file, help="captions: COCO-format captions json")
    p.add_argument("--shards", default=None, help="reconstruction, fid (Table 1): image shards")
    p.add_argument("--vae", default=None, type=_existing_file, help="reconstruction, fid (Table 1): the AugVAE")
    p.add_argument("--limit", type=_positive, default=None,
                   help="reconstruction, fid: at most this many images (fid of generations: the first N of each set)")
    p.add_argument("--vgg-checkpoint", default=None, type=_existing_file,
                   help="reconstruction: torchvision VGG16 weights for LPIPS (none: random features, tests only)")
    p.add_argument("--device", default="auto",
                   help="reconstruction, fid: cuda when available, else cpu (default: auto)")
    p.add_argument("--batch-size", type=_positive, default=16, help="reconstruction, fid: images a batch (default: 16)")
    p.add_argument("--generations", default=None,
                   help="generations: a `lverse generate` output folder; fid (Table 3): that, or a folder of images")
    p.add_argument("--reference-images", default=None,
                   help="fid (Table 3): a folder of images of the generated resolution, or image shards")
    p.add_argument("--blur-radii", type=float, nargs="+", default=None, metavar="R",
                   help="fid (Table 3): Gaussian blur radii applied to both sets, one FID each (default: 0; the paper: "
                   "0 1 2 4 8)")
    p.add_argument("--inception-weights", default=None,
                   help="fid: torch-fidelity's weights-inception-2015-12-05-6726825d.pth, a local file (never "
                   "downloaded)")
    p.add_argument("--output", default=None, help="also write the metrics to this json file")


@command("evaluate", _evaluate_options)
def _evaluate(args: argparse.Namespace) -> None:
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
    from lverse.pipeline import evaluate as ev
    if args.blur_radii is not None and (args.what != "fid" or args.shards):
        raise InputError("--blur-radii applies to evaluate fid of --generations against --reference-images")
    if args.what == "captions":
        if not (args.predictions and args.references):
            raise InputError("evaluate captions needs --predictions and --references")
        metrics = ev.caption_metrics(ev.load_predictions(args.predictions), ev.load_references(args.references))
    elif args.what == "reconstruction":
        if not (args.shards and args.vae):
            raise InputError("evaluate reconstruction needs --shards and --vae")
        metrics = ev.reconstruction_metrics(args.shards, args.vae, limit=args.limit, batch_size=args.batch_size,
                                            vgg_checkpoint=args.vgg_checkpoint, device=args.device)
    elif args.what == "fid":
        metrics = _fid(args)
    else:
        if not args.generations:
            raise InputError("evaluate generations needs --generations")
        metrics = ev.generation_clip_score(args.generations)
    if args.output:
        from lverse.core.files import atomic_write_json
        atomic_write_json(args.output, metrics)
    _print_json(metrics)


def _fid(args: argparse.Namespace) -> dict:
    from lverse.pipeline import evaluate as ev
    reconstruction, generation = bool(args.shards or args.vae), bool(args.generations or args.reference_images)
    if reconstruction == generation or not (args.shards and args.vae or args.generations and args.reference_images):
        raise InputError("evaluate fid needs either --shards and --vae (AugVAE reconstructions, Table 1) or "
                         "--generations and --reference-images (text to image, Table 3)")
    if reconstruction:
        return ev.reconstruction_fid(args.shards, args.vae, args.inception_weights, limit=args.limit,
                                     batch_size=args.batch_size, device=args.device)
    return ev.generation_fid(args.generations, args.reference_images, args.inception_weights,
                             blur_radii=tuple(args.blur_radii or (0,)), limit=args.limit,
                             batch_size=args.batch_size, device=args.device)


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder")
    p.add_argument("--images", default=None, help="image shards to show captioned images from (looked up by key)")
    p.add_argument("--max-captions", type=_positive, default=24, help="captions shown (default: 24)")


@command("report", _report_options)
def _report(args: argparse.Namespace) -> None:
    """write a static HTML report of a run folder

    Gather what the stages left under RUN_DIR (training curves from metrics.jsonl, evaluation json,
    AugVAE reconstructions, generated images with their prompts, captions beside their images) into
    RUN_DIR/report/index.html with its images in report/assets/; it opens from disk in a browser,
    no server.
    """
    from lverse.pipeline.report import write_report
    path = write_report(args.run_dir, images=args.images, max_captions=args.max_captions)
    print(path)
    log.info("report written: open %s in a browser (no server needed)", path)


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=_existing_file, help="run YAML (see configs/train_debug.yaml)")
    p.add_argument("--deepspeed", default=None,
                   help="a shipped DeepSpeed config by name (zero2_bf16, zero3_bf16_offload, ...: ds_configs/) or a "
                   "path (ZeRO stage, precision, offload); overrides the config's")
    p.add_argument("--run-dir", default=None, help="override run_dir of the config")
    p.add_argument("--steps", type=_positive, default=None, help="override steps of the config")


@command("train", _train_options)
def _train(args: argparse.Namespace) -> None:
    """train BiART under DeepSpeed ZeRO (resumes by itself)

    Train BiART on token shards, text->image on even steps and image->text on odd ones, under
    DeepSpeed ZeRO. Run it in every process of the job: `deepspeed --num_gpus N --module lverse.cli
    train ...` or torchrun on one node; `srun` (one task per GPU) under SLURM, whose variables are
    mapped for DeepSpeed. A run folder with a complete checkpoint is resumed exactly (model,
    optimizer, loss scale, lr, data position, RNG), also on another number of ranks. SIGTERM
    (preemption, scancel), SIGUSR1 (SLURM's time-limit warning) and SIGINT (Ctrl-C) all make every
    rank stop at the same next step, write one complete checkpoint and RUN_DIR/stopped.json, and
    exit 0; a second signal meanwhile does not interrupt the checkpoint.
    """
    from lverse.pipeline.train import TrainConfig, train
    from lverse.runtime.trainer import end_process
    train(load_config(args.config, TrainConfig, {"deepspeed": args.deepspeed, "run_dir": args.run_dir,
                                                 "steps": args.steps}))
    end_process()


def _train_vae_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=_existing_file, help="run YAML (see configs/train_vae_debug.yaml)")
    p.add_argument("--run-dir", default=None, help="override run_dir of the config")


@command("train-vae", _train_vae_options)
def _train_vae(args: argparse.Namespace) -> None:
    """train AugVAE: ML, conversion to SL, SL fine-tuning (resumes by itself)

    Train AugVAE-ML on image shards, convert it to SL and fine-tune it, data-parallel (torchrun /
    deepspeed launcher / srun, like train) with the EMA codebook all-reduced so every rank holds the
    same one. Writes augvae-ml.safetensors and augvae-sl.safetensors into the run folder; resumes
    from its newest checkpoint.
    """
    from lverse.pipeline.train_vae import VAETrainConfig, train_vae
    from lverse.runtime.trainer import end_process
    train_vae(load_config(args.config, VAETrainConfig, {"run_dir": args.run_dir}))
    end_process()


@command("train-clip", lambda p: _options(p, ClipTrainConfig))
def _train_clip(args: argparse.Namespace) -> None:
    """train a small open_clip model from scratch (no pretrained CLIP at hand)

    Contrastive training (open_clip's model and ClipLoss, one process) on the image-caption pairs of
    image shards, all held in memory: for small corpora such as the demo's, where no pretrained CLIP
    can be downloaded. Writes one .safetensors file for --clip MODEL --clip-checkpoint FILE of
    caption and generate.
    """
    from lverse.pipeline.train_clip import train_clip
    _print_json(train_clip(options_to_config(ClipTrainConfig, args)))


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the training run folder")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.add_argument("--step", type=_positive, default=None, help="a checkpoint's step (default: the newest)")


@command("export", _export_options)
def _export(args: argparse.Namespace) -> None:
    """write a training checkpoint as one safetensors file for inference

    Gather the newest complete checkpoint of a training run (any ZeRO stage) into fp32 weights in
    one .safetensors file with the model config, in-process.
    """
    from lverse.pipeline.train import export_checkpoint
    export_checkpoint(args.run_dir, args.output, step=args.step)


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", required=True, help="a folder of token shards (the --output of lverse encode), or "
                   "an s3:// prefix")
    p.add_argument("--index-dir", default=None,
                   help="the folder to write _index/ into instead of TOKENS (required for s3:// tokens; shared "
                        "storage on a cluster); training's data.index_dir names the same folder")
    p.add_argument("--workers", type=_positive, default=None,
                   help="processes reading the tars (default: the cores this process may use, at most 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("index", _index_options)
def _index(args: argparse.Namespace) -> None:
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
    storage.check_input(args.tokens)
    if not storage.isdir(args.tokens):
        raise FileNotFoundError(f"--tokens {args.tokens} is not a folder")
    _print_json(index_folder(args.tokens, progress=not args.quiet, workers=args.workers, index_dir=args.index_dir))


def _synthetic_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["serve"], help="serve")
    p.add_argument("--output", required=True, help="folder for train.tsv and heldout.tsv")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--train", type=_positive, default=1000, help="train samples (default: 1000)")
    p.add_argument("--heldout", type=_positive, default=100, help="held-out samples (default: 100)")
    p.add_argument("--image-size", type=_positive, default=128, help="side of served images (default: 128)")
    p.add_argument("--no-bad-urls", action="store_true", help="leave the bad URLs out of train.tsv")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


@command("synthetic", _synthetic_options)
def _synthetic_serve(args: argparse.Namespace) -> None:
    """serve the synthetic image-caption set on 127.0.0.1

    Serve procedurally drawn image-caption pairs over HTTP on 127.0.0.1 (the offline stand-in for
    Conceptual Captions), with bad URLs (404, 500, timeout, truncated JPEG, HTML, redirect); writes
    train.tsv and heldout.tsv in CC3M layout.
    """
    from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet
    data = SyntheticSet(seed=args.seed, train=args.train, heldout=args.heldout, image_size=args.image_size)
    with SyntheticServer(data, port=args.port) as server:
        paths = server.write_tsv(args.output, bad_urls=not args.no_bad_urls)
        log.info("serving %s; TSVs: %s (Ctrl-C to stop)", server.url, paths)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["run"], help="run")
    p.add_argument("config", type=_existing_file, help="pipeline YAML (see configs/pipeline_cc3m.yaml)")
    p.add_argument("--run-dir", default=None, help="override run_dir of the config")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join, e.g. auto (default: start one)")
    p.add_argument("--stage", choices=["download", "encode"], default=None,
                   help="run only this stage's block of work as one SLURM array task (with --task-index, "
                   "--num-tasks), in local processes; the slurm templates call this")
    p.add_argument("--task-index", type=int, default=None, help="this array task's index (0-based)")
    p.add_argument("--num-tasks", type=_positive, default=None, help="the number of array tasks")
    p.add_argument("--workers", type=_positive, default=None, help="encode: model replicas in this task")


@command("pipeline", _pipeline_options)
def _pipeline_run(args: argparse.Namespace) -> None:
    """run the data stages in order: download, tokenizer, encode

    Run download -> tokenizer -> encode from one YAML config on Ray, each stage once: a done marker
    per stage in the run folder, and a rerun continues where it stopped. Sections: run_dir,
    download (DownloadConfig: input, samples_per_shard, ...), tokenizer (vocab_size), encode
    (EncodeConfig: vae, batch_size, workers, ...), ray_address.
    """
    from lverse.run import PipelineConfig, run_pipeline, run_stage_task
    cfg = load_config(args.config, PipelineConfig, {"ray_address": args.ray_address, "run_dir": args.run_dir})
    if args.stage or args.task_index is not None:
        if not (args.stage and args.task_index is not None and args.num_tasks):
            raise InputError("--stage, --task-index and --num-tasks go together (one SLURM array task)")
        _print_json(run_stage_task(cfg, args.stage, args.task_index, args.num_tasks, args.workers))
        return
    results = run_pipeline(cfg)
    log.info("pipeline finished in %s; stages run now: %s", cfg.run_dir, sorted(results) or "none")


def _slurm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["submit"], help="submit")
    p.add_argument("stage", choices=STAGES, help="which template")
    _options(p, SubmitOptions, skip=("stage", "command"))
    p.add_argument("--command", dest="ray_command", default=None,
                   help="ray: the command to run on the Ray cluster, one string, e.g. \"lverse pipeline run "
                   "cfg.yaml --ray-address auto\" (split like a shell would; every word is quoted again)")


@command("slurm", _slurm_options)
def _slurm_submit(args: argparse.Namespace) -> None:
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
    opts = options_to_config(SubmitOptions, args, command=shlex.split(args.ray_command or ""))
    check(opts)
    path, job = submit(opts, plan(opts.stage, opts.config))
    if job is None:
        with open(path) as f:
            print(f.read(), end="")
        log.info("dry run: script kept at %s, not submitted", path)
    else:
        print(job)
        log.info("submitted job %s (script: %s)", job, path)


def _devices_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="what a stage is given: auto, cpu, cuda or cuda:N (default: auto)")


@command("devices", _devices_options)
def _devices(args: argparse.Namespace) -> None:
    """print the device this process would use, and why

    The rule every stage and training rank uses (lverse/core/resources.py pick_device): it follows
    what the process sees (CUDA_VISIBLE_DEVICES, the device count, LOCAL_RANK or SLURM_LOCALID).
    Run it as a job's tasks to check a binding before a long job, e.g.
    srun --ntasks-per-node=4 --gpus-per-task=1 lverse devices. On a machine without CUDA it
    answers for the devices CUDA_VISIBLE_DEVICES lists, as a CUDA machine would see them.
    """
    from lverse.core.resources import cuda_count, pick_device, visible_gpus
    cuda = cuda_count() > 0
    pick = pick_device(args.device, count=None if cuda else len(visible_gpus()))
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    print(pick.describe(f"rank {rank}") + ("" if cuda else " [no CUDA here: what a CUDA process would use]"))


@command("demo", lambda p: _options(p, DemoConfig))
def _demo(args: argparse.Namespace) -> None:
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
    cfg = options_to_config(DemoConfig, args)
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

def build_parser() -> argparse.ArgumentParser:
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
    for name, (func, options) in COMMANDS.items():
        summary, _, description = inspect.getdoc(func).partition("\n\n")
        p = sub.add_parser(name, help=summary, description=description, allow_abbrev=False)
        options(p)
        p.set_defaults(func=func)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: the stage stops its workers and keeps what is done."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    if not faulthandler.is_enabled():  # a crash in native code (or an abort) prints every thread's stack
        faulthandler.enable()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.storage_options is not None:
            storage.configure(args.storage_options)
        args.func(args)
    except (InputError, FileNotFoundError) as e:  # bad input: say what to change
        log.error("%s", e)
        return 2
    except OSError as e:  # a path that cannot serve is bad input too; the storage failing mid-work is not
        message = bad_path_message(e)
        if message is None:
            raise
        log.error("%s", message)
        return 2
    except (StageFailed, DemoBelowTarget) as e:  # the rest is done and kept; a rerun retries what failed
        log.error("%s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the workers are ended, finished shards kept
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        log.error("stopped by %s; what finished is kept, and the same command continues from there", name)
        return 128 + getattr(signal, name)
    return 0  # anything else is a bug: it propagates with its traceback


def run() -> None:
    """The ``lverse`` command (and ``python -m lverse.cli``): ``main``, then ``exit_now``."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code`` once the command is done, without the interpreter's teardown
    of native libraries.

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
    command returns. A command that fails with a traceback exits the usual way."""
    threading._shutdown()  # what the interpreter's exit does first: join the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()

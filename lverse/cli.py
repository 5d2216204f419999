"""The ``lverse`` command: one subcommand per stage, each a thin wrapper over a library function.

Every ``main`` takes ``argv`` so tests call it directly; arguments are checked before any work
starts, with a message that says what to change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from lverse.core.errors import InputError
from lverse.runtime.executors import StageFailed

log = logging.getLogger("lverse")


def _tokenizer(args: argparse.Namespace) -> None:
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer, iter_captions
    tok = CaptionTokenizer.fit(iter_captions(args.captions), args.output, vocab_size=args.vocab_size,
                               max_sentences=args.max_sentences)
    log.info("tokenizer with %d pieces written to %s", tok.vocab_size, tok.model_path)


def _convert_vae(args: argparse.Namespace) -> None:
    from lverse.model.augvae import AugVAE, ml_to_sl
    from lverse.model.checkpoint import save_model
    if args.input.endswith(".safetensors"):
        vae = AugVAE.from_pretrained(args.input)
    else:
        vae = AugVAE.from_official_checkpoint(args.input)
    if args.to_sl:
        vae = ml_to_sl(vae)
    save_model(vae, args.output)
    log.info("AugVAE-%s (%d tokens per image) written to %s", vae.cfg.variant.upper(),
             vae.cfg.num_tokens, args.output)


def _download(args: argparse.Namespace) -> None:
    from lverse.pipeline.download import DownloadConfig, run_download
    summary = run_download(DownloadConfig(
        input=args.input, output=args.output, input_format=args.format, url_col=args.url_col,
        caption_col=args.caption_col, image_size=args.image_size, resize_mode=args.resize_mode,
        samples_per_shard=args.samples_per_shard, download_threads=args.threads, timeout=args.timeout,
        executor="ray" if args.distributor == "ray" else "local", workers=args.workers, retries=args.retries,
        ray_address=args.ray_address))
    print(json.dumps(summary, indent=2))


def _encode(args: argparse.Namespace) -> None:
    from lverse.pipeline.encode import EncodeConfig, run_encode
    summary = run_encode(EncodeConfig(
        shards=args.shards, vae=args.vae, output=args.output, batch_size=args.batch_size,
        decode_threads=args.decode_threads, executor="ray" if args.ray_address or args.ray else "local",
        workers=args.workers, threads=args.threads, retries=args.retries, ray_address=args.ray_address,
        device=args.device))
    print(json.dumps(summary, indent=2))


def _pipeline_run(args: argparse.Namespace) -> None:
    from lverse.core.config import load_config
    from lverse.run import PipelineConfig, run_pipeline, run_stage_task
    cfg = load_config(args.config, PipelineConfig, {"ray_address": args.ray_address, "run_dir": args.run_dir})
    if args.stage or args.task_index is not None:
        if not (args.stage and args.task_index is not None and args.num_tasks):
            raise InputError("--stage, --task-index and --num-tasks go together (one SLURM array task)")
        summary = run_stage_task(cfg, args.stage, args.task_index, args.num_tasks, args.workers)
        print(json.dumps(summary, indent=2))
        return
    results = run_pipeline(cfg)
    log.info("pipeline finished in %s; stages run now: %s", cfg.run_dir, sorted(results) or "none")


def _caption(args: argparse.Namespace) -> None:
    from lverse.core.config import load_config
    from lverse.pipeline.caption import CaptionConfig, run_caption
    task = {"task_index": args.task_index, "num_tasks": args.num_tasks}
    if args.config:  # the SLURM template's way: every value from the file
        cfg = load_config(args.config, CaptionConfig, task)
    else:
        missing = [f"--{n}" for n in ("shards", "checkpoint", "vae", "tokenizer", "output") if getattr(args, n) is None]
        if missing:
            raise InputError(f"give --config CAPTION.yaml, or {', '.join(missing)}")
        cfg = CaptionConfig(
            shards=args.shards, checkpoint=args.checkpoint, vae=args.vae, tokenizer=args.tokenizer,
            output=args.output, candidates=args.candidates, max_tokens=args.max_tokens, batch_size=args.batch_size,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, clip=args.clip,
            clip_checkpoint=args.clip_checkpoint, keep_candidates=args.keep_candidates,
            executor="ray" if args.ray_address or args.ray else "local", workers=args.workers,
            threads=args.threads, ray_address=args.ray_address, device=args.device, seed=args.seed, **task)
    print(json.dumps(run_caption(cfg), indent=2))


def _generate(args: argparse.Namespace) -> None:
    from lverse.pipeline.generate import GenerateConfig, run_generate
    summary = run_generate(GenerateConfig(
        prompts=args.prompts, checkpoint=args.checkpoint, vae=args.vae, tokenizer=args.tokenizer, output=args.output,
        candidates=args.candidates, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        clip=args.clip, clip_checkpoint=args.clip_checkpoint, device=args.device, seed=args.seed))
    print(json.dumps(summary, indent=2))


def _evaluate(args: argparse.Namespace) -> None:
    from lverse.pipeline import evaluate as ev
    if args.what == "captions":
        if not (args.predictions and args.references):
            raise InputError("evaluate captions needs --predictions and --references")
        metrics = ev.caption_metrics(ev.load_predictions(args.predictions), ev.load_references(args.references))
    elif args.what == "reconstruction":
        if not (args.shards and args.vae):
            raise InputError("evaluate reconstruction needs --shards and --vae")
        metrics = ev.reconstruction_metrics(args.shards, args.vae, limit=args.limit, vgg_checkpoint=args.vgg_checkpoint,
                                            device=args.device)
    else:
        if not args.generations:
            raise InputError("evaluate generations needs --generations")
        metrics = ev.generation_clip_score(args.generations)
    if args.output:
        from lverse.core.files import atomic_write_json
        atomic_write_json(args.output, metrics)
    print(json.dumps(metrics, indent=2))


def _report(args: argparse.Namespace) -> None:
    from lverse.pipeline.report import write_report
    path = write_report(args.run_dir, images=args.images, max_captions=args.max_captions)
    print(path)
    log.info("report written: open %s in a browser (no server needed)", path)


def _train(args: argparse.Namespace) -> None:
    from lverse.core.config import load_config
    from lverse.pipeline.train import TrainConfig, train
    cfg = load_config(args.config, TrainConfig, {"deepspeed": args.deepspeed, "run_dir": args.run_dir,
                                                 "steps": args.steps})
    train(cfg)


def _train_vae(args: argparse.Namespace) -> None:
    from lverse.core.config import load_config
    from lverse.pipeline.train_vae import VAETrainConfig, train_vae
    train_vae(load_config(args.config, VAETrainConfig, {"run_dir": args.run_dir}))


def _train_clip(args: argparse.Namespace) -> None:
    from lverse.pipeline.train_clip import ClipTrainConfig, train_clip
    result = train_clip(ClipTrainConfig(
        shards=args.shards, output=args.output, model=args.model, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, eval_shards=args.eval_shards, seed=args.seed))
    print(json.dumps(result, indent=2))


def _export(args: argparse.Namespace) -> None:
    from lverse.pipeline.train import export_checkpoint
    export_checkpoint(args.run_dir, args.output, step=args.step)


def _slurm_submit(args: argparse.Namespace) -> None:
    from lverse.plans import plan
    from lverse.slurm.render import SubmitOptions, check, submit
    command = shlex.split(args.command) if args.command else []
    opts = SubmitOptions(
        stage=args.stage, config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        ntasks_per_node=args.ntasks_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
        time=args.time, array=args.array,
        job_name=args.job_name, command=command, run_dir=args.run_dir, dry_run=args.dry_run)
    check(opts)
    path, job = submit(opts, plan(opts.stage, opts.config))
    if job is None:
        with open(path) as f:
            print(f.read(), end="")
        log.info("dry run: script kept at %s, not submitted", path)
    else:
        print(job)
        log.info("submitted job %s (script: %s)", job, path)


def _synthetic_serve(args: argparse.Namespace) -> None:
    from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet
    data = SyntheticSet(seed=args.seed, train=args.train, heldout=args.heldout, image_size=args.image_size)
    with SyntheticServer(data, port=args.port) as server:
        paths = server.write_tsv(args.output, bad_urls=not args.no_bad_urls)
        log.info("serving %s; TSVs: %s (Ctrl-C to stop)", server.url, paths)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


def _demo(args: argparse.Namespace) -> None:
    from lverse.demo import Demo, DemoConfig
    cfg = DemoConfig(output=args.output, train=args.train, heldout=args.heldout, prompts=args.prompts,
                     vae_ml_steps=args.vae_ml_steps, vae_sl_steps=args.vae_sl_steps,
                     biart_steps=args.biart_steps, clip_steps=args.clip_steps,
                     caption_candidates=args.caption_candidates, image_candidates=args.image_candidates,
                     seed=args.seed, min_accuracy=args.min_accuracy)
    results = Demo(cfg).run()
    log.info("demo finished in %d s; the report: %s", results["seconds"], results["report"])
    print(f"report={results['report']}")
    print(f"caption_accuracy={results['caption_accuracy']:.3f}")
    print(f"t2i_color_accuracy={results['t2i_color_accuracy']:.3f}")
    low = [k for k in ("caption_accuracy", "t2i_color_accuracy") if results[k] < cfg.min_accuracy]
    if low:
        raise DemoBelowTarget(f"{' and '.join(low)} below --min-accuracy {cfg.min_accuracy}: the models did not "
                              "learn enough (more steps?)")


class DemoBelowTarget(Exception):
    pass


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive, default=None,
                   help="compute threads per worker (default: OMP_NUM_THREADS when set, else the worker's share of "
                   "the cores: cores // workers locally, its CPUs on Ray)")


def _sampling_options(p: argparse.ArgumentParser, top_k: int | None, top_p: float | None) -> None:
    """Sampling, CLIP and device options shared by caption and generate."""
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=_positive, default=top_k, help=f"sample from the k most likely tokens "
                   f"(default: {top_k or 'off'})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default: {top_p or 'off'})")
    p.add_argument("--clip", default="ViT-B-32", help="open_clip architecture (default: ViT-B-32)")
    p.add_argument("--clip-checkpoint", default=None, type=_existing_file,
                   help="its weights, a local file (none: random weights, tests only)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (drawn per shard / per prompt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lverse", description=__doc__.split("\n")[0])
    # The `deepspeed` launcher passes --local_rank=N before the subcommand (LOCAL_RANK is read instead).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenizer", help="fit the SentencePiece BPE caption tokenizer",
                       description="Fit a SentencePiece BPE model on captions (no BPE-dropout while "
                       "fitting; BiART applies dropout 0.1 when it trains). Writes PREFIX.model and "
                       "PREFIX.vocab.")
    p.add_argument("--captions", required=True, type=_existing_file,
                   help="a text file with one caption per line, or a Conceptual Captions TSV "
                   "(CC3M caption<TAB>url or CC12M url<TAB>caption)")
    p.add_argument("--output", required=True, help="output prefix, e.g. runs/cc3m/tokenizer")
    p.add_argument("--vocab-size", type=_positive, default=49808,
                   help="number of pieces (default: 49808, the paper's)")
    p.add_argument("--max-sentences", type=_positive, default=10_000_000,
                   help="captions sampled for fitting, to bound memory (default: 10M)")
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("convert-vae", help="import an official AugVAE checkpoint, or turn ML into SL",
                       description="Read an AugVAE (the authors' Lightning .ckpt, or an lverse "
                       ".safetensors) and write it as an lverse .safetensors file, optionally "
                       "converted from ML to SL (fresh connectors: fine-tune afterwards).")
    p.add_argument("--input", required=True, type=_existing_file, help=".ckpt or .safetensors")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.add_argument("--to-sl", action="store_true", help="convert an ML model to SL")
    p.set_defaults(func=_convert_vae)

    p = sub.add_parser("download", help="fetch image-caption lists into webdataset shards (img2dataset)",
                       description="Validate the input (malformed lines are counted, never fatal), split it "
                       "into chunks of --samples-per-shard rows and fetch each chunk with img2dataset into "
                       "one shard: NNNNN.tar (jpg, txt, json), NNNNN.parquet (every row with its status), "
                       "NNNNN_stats.json (written last: the shard is done). A rerun fetches only missing "
                       "shards and retries failed ones. Writes _summary.json.")
    p.add_argument("--input", required=True, type=_existing_file,
                   help="Conceptual Captions TSV (CC3M caption<TAB>url or CC12M url<TAB>caption, no header), "
                   "or a .parquet / .csv with named columns")
    p.add_argument("--output", required=True, help="output folder (storage every node sees, with Ray)")
    p.add_argument("--format", default="auto", choices=["auto", "cc3m", "cc12m", "parquet", "csv"],
                   help="input layout (default: by extension; a TSV's layout by which field is a URL)")
    p.add_argument("--url-col", default="url", help="URL column of parquet/CSV input (default: url)")
    p.add_argument("--caption-col", default="caption", help="caption column of parquet/CSV input (default: caption)")
    p.add_argument("--image-size", type=_positive, default=256, help="shorter side in pixels (default: 256)")
    p.add_argument("--resize-mode", default="keep_ratio", choices=["keep_ratio", "center_crop", "border"],
                   help="keep_ratio (default) keeps the whole picture for training's random crops")
    p.add_argument("--samples-per-shard", type=_positive, default=10000, help="rows per shard (default: 10000)")
    p.add_argument("--threads", type=_positive, default=64, help="concurrent downloads per shard (default: 64)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per image (default: 10)")
    p.add_argument("--distributor", default="multiprocessing", choices=["multiprocessing", "ray"],
                   help="multiprocessing: local processes (default); ray: one Ray task per shard")
    p.add_argument("--workers", type=_positive, default=2, help="shards in flight, multiprocessing (default: 2)")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed shard (default: 2)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join, e.g. auto (default: start one)")
    p.set_defaults(func=_download)

    p = sub.add_parser("encode", help="turn image shards into AugVAE token shards (FP32)",
                       description="Encode every image shard into a token shard of the same name (uint16 "
                       "codes, raw caption, key; the AugVAE checkpoint's sha256 recorded) through a frozen "
                       "AugVAE in FP32. Written atomically with a done marker per shard: a rerun skips "
                       "finished shards. Corrupt images are skipped and counted; an unreadable shard fails "
                       "alone and is retried. Writes _summary.json.")
    p.add_argument("--shards", required=True,
                   help="a folder of .tar shards, a glob ('raw/*.tar') or a range ('raw/{00000..00099}.tar')")
    p.add_argument("--vae", required=True, type=_existing_file, help="AugVAE: lverse .safetensors or official .ckpt")
    p.add_argument("--output", required=True, help="folder for the token shards")
    p.add_argument("--batch-size", type=_positive, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--decode-threads", type=_positive, default=None,
                   help="JPEG decode threads per worker (default: as many as its compute threads)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="model replicas: local processes, or Ray actors (one GPU each when the cluster has GPUs); "
                   "default: one per GPU, else 1 (pipeline/resources.py says why)")
    _threads_option(p)
    p.add_argument("--ray", action="store_true", help="run on Ray actors (a local Ray unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join, e.g. auto; implies --ray")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed shard (default: 1)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.set_defaults(func=_encode)

    p = sub.add_parser("caption", help="caption every image of a webdataset corpus (BiART + CLIP reranking)",
                       description="Caption every image of image shards (img2dataset) or token shards (lverse "
                       "encode): CANDIDATES captions of up to MAX_TOKENS text tokens sampled per image with the KV "
                       "cache, each cut after its first full stop, the best kept by CLIP. One parquet per input "
                       "shard (key, url, caption, clip_score, error), written atomically; a rerun skips finished "
                       "shards. Writes _summary.json.")
    p.add_argument("--config", default=None, type=_existing_file,
                   help="a YAML of the options below (CaptionConfig fields); the other options are then ignored")
    p.add_argument("--shards", help="a folder of .tar shards, a glob, or a {00000..00099} range")
    p.add_argument("--checkpoint", type=_existing_file, help="BiART .safetensors (lverse export)")
    p.add_argument("--vae", type=_existing_file, help="the AugVAE the model was trained with")
    p.add_argument("--tokenizer", type=_existing_file, help="the caption tokenizer's .model")
    p.add_argument("--output", help="folder for the parquet files")
    p.add_argument("--candidates", type=_positive, default=64,
                   help="captions sampled per image (1: no CLIP; default 64)")
    p.add_argument("--max-tokens", type=_positive, default=32, help="text tokens per candidate (default: 32)")
    p.add_argument("--batch-size", type=_positive, default=4, help="images per generation batch (default: 4)")
    _sampling_options(p, top_k=None, top_p=0.9)
    p.add_argument("--keep-candidates", action="store_true", help="also store every candidate and its score")
    p.add_argument("--workers", type=_positive, default=None,
                   help="model replicas, processes or Ray actors (default: one per GPU, else 1)")
    _threads_option(p)
    p.add_argument("--ray", action="store_true", help="run on Ray actors (a local Ray unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join, e.g. auto; implies --ray")
    p.add_argument("--task-index", type=int, default=None, help="as SLURM array task i: only its block of shards")
    p.add_argument("--num-tasks", type=_positive, default=1, help="the number of array tasks")
    p.set_defaults(func=_caption)

    p = sub.add_parser("generate", help="text-to-image: N candidates per prompt, the best by CLIP",
                       description="For each prompt (one per line) sample CANDIDATES images with the KV cache, decode "
                       "them with the AugVAE in FP32 and keep the one CLIP scores highest. Writes OUTPUT/NNNNN/ "
                       "per prompt: best.png, candidates/, sheet.png (a contact sheet, the chosen one framed) and "
                       "result.json (last: a rerun skips finished prompts).")
    p.add_argument("--prompts", required=True, type=_existing_file, help="a text file, one prompt per line")
    p.add_argument("--checkpoint", required=True, type=_existing_file, help="BiART .safetensors (lverse export)")
    p.add_argument("--vae", required=True, type=_existing_file, help="the AugVAE the model was trained with")
    p.add_argument("--tokenizer", required=True, type=_existing_file, help="the caption tokenizer's .model")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--candidates", type=_positive, default=64, help="images per prompt (1: no CLIP; default 64)")
    _sampling_options(p, top_k=256, top_p=None)
    p.set_defaults(func=_generate)

    p = sub.add_parser("evaluate", help="caption metrics, reconstruction metrics, CLIP score of generations",
                       description="captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, Java) and SPICE "
                       "when its Stanford models are present, of predictions (COCO results json or a `lverse "
                       "caption` output folder) against COCO-format references. reconstruction: PSNR, SSIM, "
                       "LPIPS of AugVAE reconstructions of image shards. generations: CLIP score of `lverse "
                       "generate` output.")
    p.add_argument("what", choices=["captions", "reconstruction", "generations"], help="what to evaluate")
    p.add_argument("--predictions", default=None, help="captions: COCO results json or a caption output folder")
    p.add_argument("--references", default=None, type=_existing_file, help="captions: COCO-format captions json")
    p.add_argument("--shards", default=None, help="reconstruction: image shards")
    p.add_argument("--vae", default=None, type=_existing_file, help="reconstruction: the AugVAE")
    p.add_argument("--limit", type=_positive, default=None, help="reconstruction: at most this many images")
    p.add_argument("--vgg-checkpoint", default=None, type=_existing_file,
                   help="reconstruction: torchvision VGG16 weights for LPIPS (none: random features, tests only)")
    p.add_argument("--device", default="cpu", help="reconstruction: cpu or cuda (default: cpu)")
    p.add_argument("--generations", default=None, help="generations: a `lverse generate` output folder")
    p.add_argument("--output", default=None, help="also write the metrics to this json file")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("report", help="write a static HTML report of a run folder",
                       description="Gather what the stages left under RUN_DIR (training curves from metrics.jsonl, "
                       "evaluation json, AugVAE reconstructions, generated images with their prompts, captions "
                       "beside their images) into RUN_DIR/report/index.html with its images in report/assets/; "
                       "it opens from disk in a browser, no server.")
    p.add_argument("run_dir", help="the run folder")
    p.add_argument("--images", default=None, help="image shards to show captioned images from (looked up by key)")
    p.add_argument("--max-captions", type=_positive, default=24, help="captions shown (default: 24)")
    p.set_defaults(func=_report)

    p = sub.add_parser("train", help="train BiART under DeepSpeed ZeRO (resumes by itself)",
                       description="Train BiART on token shards, text->image on even steps and image->text on "
                       "odd ones, under DeepSpeed ZeRO. Run it in every process of the job: `deepspeed "
                       "--num_gpus N --module lverse.cli train ...` or torchrun on one node; `srun` (one task per "
                       "GPU) under SLURM, whose variables are mapped for DeepSpeed. A run folder with a "
                       "complete checkpoint is resumed exactly (model, optimizer, loss scale, lr, data "
                       "position, RNG), also on another number of ranks. SIGUSR1 (stop_signal) makes it "
                       "checkpoint, write RUN_DIR/stopped.json and stop at the next step.")
    p.add_argument("--config", required=True, type=_existing_file, help="run YAML (see configs/train_debug.yaml)")
    p.add_argument("--deepspeed", default=None,
                   help="a shipped DeepSpeed config by name (zero2_bf16, zero3_bf16_offload, ...: ds_configs/) or a "
                   "path (ZeRO stage, precision, offload); overrides the config's")
    p.add_argument("--run-dir", default=None, help="override run_dir of the config")
    p.add_argument("--steps", type=_positive, default=None, help="override steps of the config")
    p.set_defaults(func=_train)

    p = sub.add_parser("train-vae", help="train AugVAE: ML, conversion to SL, SL fine-tuning (resumes by itself)",
                       description="Train AugVAE-ML on image shards, convert it to SL and fine-tune it, "
                       "data-parallel (torchrun / deepspeed launcher / srun, like train) with the EMA codebook "
                       "all-reduced so every rank holds the same one. Writes augvae-ml.safetensors and "
                       "augvae-sl.safetensors into the run folder; resumes from its newest checkpoint.")
    p.add_argument("--config", required=True, type=_existing_file, help="run YAML (see configs/train_vae_debug.yaml)")
    p.add_argument("--run-dir", default=None, help="override run_dir of the config")
    p.set_defaults(func=_train_vae)

    p = sub.add_parser("train-clip", help="train a small open_clip model from scratch (no pretrained CLIP at hand)",
                       description="Contrastive training (open_clip's model and ClipLoss, one process) on the "
                       "image-caption pairs of image shards, all held in memory: for small corpora such as the "
                       "demo's, where no pretrained CLIP can be downloaded. Writes one .safetensors file for "
                       "--clip MODEL --clip-checkpoint FILE of caption and generate.")
    p.add_argument("--shards", required=True, help="image shards (folder, glob or {00000..00009} range)")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.add_argument("--model", default="lverse-tiny", help="open_clip architecture (default: lverse-tiny, 64x64)")
    p.add_argument("--steps", type=_positive, default=600, help="optimizer steps (default: 600)")
    p.add_argument("--batch-size", type=_positive, default=128, help="pairs per step (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--eval-shards", default=None, help="held-out image shards: top-1 image->text accuracy after")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_train_clip)

    p = sub.add_parser("export", help="write a training checkpoint as one safetensors file for inference",
                       description="Gather the newest complete checkpoint of a training run (any ZeRO stage) into "
                       "fp32 weights in one .safetensors file with the model config, in-process.")
    p.add_argument("run_dir", help="the training run folder")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.add_argument("--step", type=_positive, default=None, help="a checkpoint's step (default: the newest)")
    p.set_defaults(func=_export)

    p = sub.add_parser("synthetic", help="serve the synthetic image-caption set on 127.0.0.1",
                       description="Serve procedurally drawn image-caption pairs over HTTP on 127.0.0.1 (the "
                       "offline stand-in for Conceptual Captions), with bad URLs (404, 500, timeout, truncated "
                       "JPEG, HTML, redirect); writes train.tsv and heldout.tsv in CC3M layout.")
    p.add_argument("action", choices=["serve"], help="serve")
    p.add_argument("--output", required=True, help="folder for train.tsv and heldout.tsv")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--train", type=_positive, default=1000, help="train samples (default: 1000)")
    p.add_argument("--heldout", type=_positive, default=100, help="held-out samples (default: 100)")
    p.add_argument("--image-size", type=_positive, default=128, help="side of served images (default: 128)")
    p.add_argument("--no-bad-urls", action="store_true", help="leave the bad URLs out of train.tsv")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_synthetic_serve)

    p = sub.add_parser("pipeline", help="run the data stages in order: download, tokenizer, encode",
                       description="Run download -> tokenizer -> encode from one YAML config on Ray, each stage "
                       "once: a done marker per stage in the run folder, and a rerun continues where it "
                       "stopped. Sections: run_dir, download (DownloadConfig: input, samples_per_shard, ...), "
                       "tokenizer (vocab_size), encode (EncodeConfig: vae, batch_size, workers, ...), "
                       "ray_address.")
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
    p.set_defaults(func=_pipeline_run)

    p = sub.add_parser("slurm", help="submit a stage as a SLURM job from its template (slurm/*.sbatch)",
                       description="Render the stage's SLURM template with this run's values (validated and "
                       "shell-quoted), keep the script in RUN_DIR/slurm/, and submit it with sbatch (the job id "
                       "is printed). download and encode are job arrays over input chunks / shard blocks "
                       "(planned now; a task skips finished shards, so a requeued one redoes only the rest); "
                       "train runs one task per GPU through srun and requeues itself after checkpointing on "
                       "the time-limit warning; ray starts a Ray cluster in the allocation and runs --command.")
    p.add_argument("action", choices=["submit"], help="submit")
    p.add_argument("stage", choices=["download", "encode", "train", "caption", "ray"], help="which template")
    p.add_argument("--config", default=None,
                   help="the run config: pipeline YAML (download, encode), training YAML (train), caption YAML "
                   "(caption: the options of `lverse caption`)")
    p.add_argument("--nodes", type=_positive, default=1, help="nodes (train, ray; default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node: train starts one task per GPU, encode one model per GPU (default: 0)")
    p.add_argument("--ntasks-per-node", type=_positive, default=None,
                   help="train: processes per node (default: one per GPU; 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=_positive, default=2, help="CPUs per task (default: 2)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--time", default="24:00:00", help="time limit, [days-]hours:minutes:seconds (default: 24:00:00)")
    p.add_argument("--array", default=None,
                   help="download/encode/caption: which array tasks, e.g. 0-99%%10 (throttle) or 3,7 (default: all)")
    p.add_argument("--job-name", default=None, help="job name: letters, digits, '.', '_', '-' (default: lverse-STAGE)")
    p.add_argument("--run-dir", default=None, help="where the script is kept (default: the config's run_dir)")
    p.add_argument("--dry-run", action="store_true", help="print the script and keep it, do not submit")
    p.add_argument("--command", default=None,
                   help="ray: the command to run on the Ray cluster, one string, e.g. \"lverse pipeline run "
                   "cfg.yaml --ray-address auto\" (split like a shell would; every word is quoted again)")
    p.set_defaults(func=_slurm_submit)

    from lverse.demo import VAE_TARGET_PSNR, DemoConfig
    d = DemoConfig()
    p = sub.add_parser("demo", help="run the whole pipeline on synthetic data, on a CPU, in under 20 minutes",
                       description="Serve synthetic image-caption pairs on 127.0.0.1 and run every stage on them as "
                       "the command a user would type (each is printed): download (img2dataset), tokenizer, "
                       "train-vae, encode (Ray), train (BiART, DeepSpeed, both directions), train-clip, caption "
                       "and generate (CLIP-reranked), evaluate, report. A rerun skips finished stages. Ends with "
                       "the report's path and the held-out caption_accuracy and t2i_color_accuracy (lverse/demo.py "
                       "says how they are judged); exits 1 if either is below --min-accuracy. Before BiART trains, "
                       "the AugVAE must keep the shapes' colours in the held-out reconstructions (lverse/demo.py "
                       "VAE_GATE), or the demo stops there.")
    p.add_argument("--output", default=d.output, help=f"output folder (default: {d.output})")
    p.add_argument("--train", type=_positive, default=d.train, help=f"synthetic training pairs (default: {d.train})")
    p.add_argument("--heldout", type=_positive, default=d.heldout, help=f"held-out pairs (default: {d.heldout})")
    p.add_argument("--prompts", type=_positive, default=d.prompts,
                   help=f"held-out captions to generate images for (default: {d.prompts})")
    p.add_argument("--vae-ml-steps", type=_positive, default=d.vae_ml_steps,
                   help=f"AugVAE-ML training steps (default: {d.vae_ml_steps})")
    p.add_argument("--vae-sl-steps", type=_positive, default=d.vae_sl_steps,
                   help=f"AugVAE-SL fine-tuning steps at most: it ends once a training shard's reconstructions "
                   f"reach {VAE_TARGET_PSNR} dB PSNR (default: {d.vae_sl_steps})")
    p.add_argument("--biart-steps", type=_positive, default=d.biart_steps,
                   help=f"BiART steps (default: {d.biart_steps})")
    p.add_argument("--clip-steps", type=_positive, default=d.clip_steps, help=f"CLIP steps (default: {d.clip_steps})")
    p.add_argument("--caption-candidates", type=_positive, default=d.caption_candidates,
                   help=f"captions per image, CLIP keeps one (default: {d.caption_candidates})")
    p.add_argument("--image-candidates", type=_positive, default=d.image_candidates,
                   help=f"images per prompt, CLIP keeps one (default: {d.image_candidates})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    p.add_argument("--min-accuracy", type=float, default=d.min_accuracy,
                   help=f"exit 1 when either accuracy is below this (default: {d.min_accuracy}; 0: never, and no "
                   "AugVAE gate)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what to change
        log.error("%s", e)
        return 2
    except (StageFailed, DemoBelowTarget) as e:  # the rest is done and kept; a rerun retries what failed
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``lverse`` command: one subcommand per stage, each a thin wrapper over a library function.

Every ``main`` takes ``argv`` so tests call it directly; arguments are checked before any work
starts, with a message that says what to change.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

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


def _demo(args: argparse.Namespace) -> None:
    from lverse.demo import DemoConfig, run_demo
    run_demo(DemoConfig(output=args.output, samples=args.samples, vae_steps=args.vae_steps,
                        biart_steps=args.biart_steps, seed=args.seed))
    log.info("demo finished; everything it wrote is in %s", args.output)


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lverse", description=__doc__.split("\n")[0])
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

    p = sub.add_parser("demo", help="run the pipeline end to end on synthetic data (CPU)",
                       description="Interim demo: the models end to end on synthetic image-caption "
                       "pairs, in-process on a CPU, in a few minutes.")
    p.add_argument("--output", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--samples", type=_positive, default=512, help="synthetic pairs (default: 512)")
    p.add_argument("--vae-steps", type=_positive, default=60, help="AugVAE steps per phase (default: 60)")
    p.add_argument("--biart-steps", type=_positive, default=300, help="BiART steps (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lverse: train and run L-Verse (AugVAE + BiART) on web-scale image-text data.

This package is the top layer (README, "Layout"):
    cli     the ``lverse`` command, one subcommand per stage
    run     ``lverse pipeline run``: download -> tokenizer -> encode, each stage once
    plans   what each stage's SLURM job is planned from (the launcher's registry of planners)
    demo    ``lverse demo``: the pipeline end to end on synthetic data

Below it: ``lverse.slurm`` (launcher), ``lverse.pipeline`` (stages), ``lverse.runtime``,
``lverse.model`` and ``lverse.preprocessing``, ``lverse.core``.
"""

__version__ = "0.1.0"

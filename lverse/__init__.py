"""lverse: train and run L-Verse (AugVAE + BiART) on web-scale image-text data.

Modules:
    cli     the ``lverse`` command, one subcommand per stage
    config  YAML run configs onto dataclasses (unknown keys refused)
    files   atomic file output (temporary name, then rename)
    demo    ``lverse demo``: the pipeline end to end on synthetic data

The models are in ``lverse.model``, data preparation in ``lverse.preprocessing``, stage drivers in
``lverse.pipeline``.
"""

__version__ = "0.1.0"

"""DeepSpeed configs shipped with lverse, found by name (``zero2_bf16``) from any folder: each
sets only the ZeRO stage, precision and offload; batch sizes, the optimizer and clipping come from
the run config (``pipeline/train.py``)."""

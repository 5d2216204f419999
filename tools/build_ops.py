"""Build DeepSpeed's JIT-compiled ops that a run on a CPU loads, once, at install time.

DeepSpeed compiles an op the first time a process asks for it and keeps the result under
``TORCH_EXTENSIONS_DIR`` (the Makefile points it into .venv). On a CPU every DeepSpeed run
loads the shared-memory collectives, and the offload configs load CPU Adam; compiled here, no
training run or test waits minutes for the compiler. On a GPU machine nothing is built here:
the CUDA ops are compiled on first use, against the GPU that is there.

Usage: python tools/build_ops.py  (run by ``make venv``)
"""

from __future__ import annotations

import sys

CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def main() -> int:
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        print(f"DeepSpeed accelerator {accelerator.device_name()!r}: its ops are built on first use")
        return 0
    for name in CPU_OPS:
        accelerator.create_op_builder(name).load()
        print(f"built {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

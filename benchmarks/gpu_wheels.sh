#!/usr/bin/env bash
# The wheels benchmarks/gpu.py needs on a lent GPU machine that its image lacks, into .whl/ at the
# repository root (ignored by git), for CPython 3.12 on x86-64 Linux: the machine has Python 3.12,
# torch 2.11, numpy, pyarrow, timm, huggingface_hub, sentencepiece, pyyaml, setuptools and a C
# compiler (its package list: KINDS.md of the device tool), and no network.
#
# Missing there, each at the version constraints.txt pins:
#   DeepSpeed and what it needs beyond the image: hjson, pydantic (pydantic-core, annotated-types,
#   typing-inspection, typing_extensions: the image's may be older than pydantic needs);
#   open_clip_torch (CLIP reranking) and ftfy (with wcwidth), which the tokenizer imports too.
# Ray, webdataset and the rest are not imported by the gpu tests or the benchmark's phases.
#
# DeepSpeed has no wheel on PyPI: its sdist is built here into a pure-Python wheel with no ops
# compiled (DS_BUILD_OPS=0; FusedAdam is JIT-built on the GPU machine on first use), with this
# venv's torch (its setup.py imports torch, so no build isolation).
#
# Then, on the GPU machine (carry .whl; one line):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . && PYTHONPATH=/tmp/site python3 benchmarks/gpu.py --minutes 8 --out $OUT 2>&1 | tee $OUT/gpu.log
# (the second install builds lverse itself there, its C tokenizer extension for that Python).
#
# Usage: benchmarks/gpu_wheels.sh [PYTHON]   (PYTHON: one with pip, torch and setuptools; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DEST=.whl
PURE="hjson annotated-types typing-inspection typing_extensions pydantic open_clip_torch ftfy wcwidth"
BINARY="pydantic_core"

pin() {  # name==version as constraints.txt pins it (names compared as pip does: case, - and _ alike)
    local want
    want=$(echo "$1" | tr 'A-Z_' 'a-z-')
    awk -F'==' -v want="$want" '{ name = tolower($1); gsub("_", "-", name) } name == want { print $1 "==" $2 }' \
        constraints.txt | head -1 | grep . || { echo "$1 is not pinned in constraints.txt" >&2; exit 1; }
}

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for name in $PURE $BINARY; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$DEST" "$(pin "$name")"
done
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$DEST" "$(pin deepspeed)"

ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1

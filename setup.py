"""lverse: a distributed pipeline that trains and runs L-Verse (AugVAE + BiART).

The importable folders at the repository root install under one namespace, so nothing installs a
bare top-level module called ``model``:

    lverse               lverse/          the CLI, `pipeline run`, the demo (top layer)
    lverse.slurm         slurm/           SLURM job templates and their renderer (launcher)
    lverse.pipeline      pipeline/        the stages (download, encode, train, caption, ...)
    lverse.runtime       runtime/         executors, the shard-stage runner, ranks, training core
    lverse.model         model/           AugVAE, BiART, CLIP scoring
    lverse.preprocessing preprocessing/   caption tokenizer, synthetic data
    lverse.core          core/            files, configs, shards, devices (imports no other layer)
    lverse.ds_configs    ds_configs/      DeepSpeed configs, found by name

Exact versions of every dependency live in constraints.txt (`make lock` writes it from constraints.in);
install with ``pip install -c constraints.txt -e .[all]``.
"""

from setuptools import Extension, setup

EXTRAS = {
    # The AugVAE training loss (LPIPS) and image I/O need torchvision.
    "vae": ["torchvision", "lpips>=0.1.4", "pillow"],
    # img2dataset 1.47 pins webdataset<0.3 and albumentations<2 (constraints.in pins webdataset).
    "data": ["img2dataset>=1.45", "webdataset", "pyarrow", "ray[default]>=2.9", "pillow"],
    # BiART training. DeepSpeed compiles its ops (FusedAdam, cpu_adam) on first use; NVIDIA apex is
    # optional and never comes from PyPI (the PyPI package `apex` is unrelated).
    "train": ["deepspeed>=0.16", "tensorboard"],
    # Batch inference: CLIP reranking (open_clip; weights are local files, never downloaded).
    "infer": ["open_clip_torch>=2.20", "pyarrow", "pillow"],
    # Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr); its tokenizer and METEOR need Java. FID with
    # torch-fidelity, the paper's tool (its Inception weights are a local file, never downloaded).
    "eval": ["pycocoevalcap>=1.2", "lpips>=0.1.4", "torch-fidelity>=0.4"],
    # s3:// inputs and outputs for every stage (core/storage.py). The lower bound matters: without it
    # pip settles on s3fs 0.4 (boto3-based, no async calls, which core/storage needs) whenever the
    # newest boto3 (moto's) wants a botocore newer than the newest aiobotocore allows.
    "s3": ["s3fs>=2023.1"],
    # The tests: pytest-xdist runs them side by side (Makefile), moto is their S3-compatible server.
    "dev": ["pytest>=8,<9", "pytest-xdist>=3.5", "ruff>=0.6", "moto[server]>=5"],
}
EXTRAS["all"] = sorted({dep for name, deps in EXTRAS.items() if name != "dev" for dep in deps})

setup(
    name="lverse",
    version="0.1.0",
    description="Train and run L-Verse (AugVAE + BiART) on web-scale image-text data",
    python_requires=">=3.10",
    packages=["lverse", "lverse.core", "lverse.model", "lverse.runtime", "lverse.pipeline", "lverse.preprocessing",
              "lverse.slurm", "lverse.ds_configs"],
    package_dir={
        "lverse": "lverse",
        "lverse.core": "core",
        "lverse.runtime": "runtime",
        "lverse.model": "model",
        "lverse.pipeline": "pipeline",
        "lverse.preprocessing": "preprocessing",
        "lverse.slurm": "slurm",
        "lverse.ds_configs": "ds_configs",
    },
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
        "sentencepiece>=0.2",
        "ftfy",
    ],
    package_data={"lverse.pipeline": ["clusters/*.yaml"], "lverse.slurm": ["*.sbatch"],
                  "lverse.model": ["clip_configs/*.json"], "lverse.ds_configs": ["*.json"]},
    # BPE-dropout's merge loop in C (preprocessing/_bpe.c): a C compiler and Python's headers build it
    # at install time.
    ext_modules=[Extension("lverse.preprocessing._bpe", ["preprocessing/_bpe.c"], extra_compile_args=["-O2"])],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lverse=lverse.cli:run"]},
)

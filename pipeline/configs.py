"""Every pipeline stage's options, one dataclass a stage, apart from the code that runs it.

A config dataclass is the one place a stage's options are written (core/config.py): the ``lverse``
command makes its flags from it, a YAML file fills it, and the stage takes it as its one argument.
They live here, not in the stage modules, because the command line needs them without the stages'
imports: building ``lverse COMMAND --help`` must not import torch, DeepSpeed or Ray (about 2 s).
So this module imports only the standard library and lverse's light modules (tests/test_layers.py
checks that importing it loads no torch); a check that needs a model or a file belongs to the stage.

    download     DownloadConfig      image-caption lists -> image shards (img2dataset)
    tokenizer    TokenizerConfig     the caption tokenizer (SentencePiece BPE)
    encode       EncodeConfig        image shards -> AugVAE token shards
    caption      CaptionConfig       images -> captions (BiART + CLIP reranking)
    generate     GenerateConfig      prompts -> images (BiART + AugVAE + CLIP reranking)
    train-clip   ClipTrainConfig     a small open_clip model from scratch
    train        TrainConfig         BiART under DeepSpeed (ModelConfig, DataConfig, OptimConfig)
    train-vae    VAETrainConfig      AugVAE: ML, conversion to SL, SL fine-tuning
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from lverse.core.config import at_least
from lverse.core.errors import InputError
from lverse.core.vocab import VOCAB_SIZE
from lverse.runtime.stage import Execution, ModelExecution

InputFormat = Literal["auto", "cc3m", "cc12m", "parquet", "csv"]
FORMATS = typing.get_args(InputFormat)
ResizeMode = Literal["keep_ratio", "center_crop", "border"]  # img2dataset's
RESIZE_MODES = typing.get_args(ResizeMode)
# Each crop costs a forward pass an image and 2 bytes x num_tokens a sample in the token index
# (CC3M: about 6 GB a crop); a prefetched sample holds K + 1 decoded images (0.8 MB each at 256 px).
MAX_CROPS = 16


@dataclass(frozen=True, kw_only=True)
class DownloadConfig(Execution):
    input: str  # TSV (CC3M caption<TAB>url / CC12M url<TAB>caption), parquet or CSV
    output: str  # folder for shards, chunks and the summary (shared storage on a cluster)
    input_format: InputFormat = "auto"  # auto: by extension, and a TSV's layout by which field is a URL
    url_col: str = "url"  # column of URLs (parquet/CSV)
    caption_col: str = "caption"  # column of captions (parquet/CSV)
    image_size: int = 256  # shorter side after resizing
    # keep_ratio keeps the whole picture with its shorter side at image_size, so training's random
    # crop (ratio 0.75) sees different parts of it; center_crop would throw the sides away here.
    resize_mode: ResizeMode = "keep_ratio"
    samples_per_shard: int = 10000  # rows per chunk, so images per shard at most
    download_threads: int = 64  # concurrent downloads within a chunk
    timeout: float = 10.0  # seconds per image request
    # A server busy for a moment lets one request time out and answers the next; an image that
    # failed stays missing, since its shard counts as done. img2dataset retries every failure, so
    # each dead link (a third of CC3M's) costs image_retries more requests, and each host that
    # never answers image_retries more timeouts: hence none by default, as in img2dataset.
    image_retries: int = 0  # times a failed image request is made again at once
    workers: int = 2  # chunks in flight at once (local executor)
    retries: int = 2  # times a failed chunk is tried again

    def __post_init__(self):
        super().__post_init__()
        if self.input_format not in FORMATS:
            raise InputError(f"input_format must be one of {FORMATS}, got {self.input_format!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.samples_per_shard <= 0 or self.image_size <= 0:
            raise InputError("samples_per_shard and image_size must be positive")
        if self.image_retries < 0:
            raise InputError(f"image_retries must be 0 or more, got {self.image_retries}")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = VOCAB_SIZE  # SentencePiece BPE pieces (the paper's)
    max_sentences: int = 10_000_000  # captions sampled for fitting, to bound memory

    def __post_init__(self):
        if self.vocab_size < 1 or self.max_sentences < 1:
            raise InputError("vocab_size and max_sentences must be at least 1")


@dataclass(frozen=True, kw_only=True)
class EncodeConfig(ModelExecution):
    shards: str  # a folder, a glob ("raw/*.tar") or a range ("raw/{00000..00099}.tar")
    vae: str  # AugVAE checkpoint: lverse .safetensors or the official .ckpt
    output: str  # folder for token shards and _summary.json
    batch_size: int = 32  # images per forward pass
    decode_threads: int | None = None  # JPEG decode + resize threads per worker (None: its thread share)
    crops: int = 0  # random crops (0.75 of the shorter side) encoded per image beside the centre crop

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.crops <= MAX_CROPS:
            raise InputError(f"crops must be between 0 and {MAX_CROPS} (random crops encoded per image; each costs a "
                             f"forward pass an image and 2 bytes x num_tokens a sample in the index), got {self.crops}")


@dataclass(frozen=True, kw_only=True)
class CaptionConfig(ModelExecution):
    shards: str  # image shards or token shards: a folder, a glob or a {00000..00099} range
    checkpoint: str  # BiART .safetensors (`lverse export`)
    vae: str  # the AugVAE (encodes raw images; token shards must come from it)
    tokenizer: str  # the caption tokenizer's .model
    output: str  # folder for one parquet per input shard
    candidates: int = 64  # captions sampled per image, CLIP keeps one
    max_tokens: int = 32  # text tokens sampled per candidate
    batch_size: int = 4  # images per generation batch (batch_size x candidates sequences)
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_k: int | None = None  # sample from the k most likely tokens (None: off)
    top_p: float | None = 0.9  # nucleus sampling mass (None: off)
    clip: str = "ViT-B-32"  # open_clip architecture
    clip_checkpoint: str | None = None  # its weights, a local file (None: random weights, tests only)
    keep_candidates: bool = False  # also store every candidate and its CLIP score
    seed: int = 0  # sampling seed (drawn per shard)
    ignore_provenance: bool = False  # accept a --vae or --tokenizer other than the checkpoint's training run's
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # BiART's: auto is bf16 on CUDA, fp32 on a CPU


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(ModelExecution):
    prompts: str  # a text file, one prompt per line
    checkpoint: str  # BiART .safetensors
    vae: str  # the AugVAE the model was trained with
    tokenizer: str  # the caption tokenizer's .model
    output: str  # folder for one subfolder per prompt
    candidates: int = 64  # images sampled per prompt, CLIP keeps one
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_k: int | None = 256  # sample from the k most likely tokens (None: off)
    top_p: float | None = None  # nucleus sampling mass (None: off)
    decode_batch: int = 16  # candidates decoded by the AugVAE at once
    clip: str = "ViT-B-32"  # open_clip architecture
    clip_checkpoint: str | None = None  # its weights, a local file (None: random weights, tests only)
    seed: int = 0  # sampling seed (drawn per prompt)
    prompts_per_item: int = 16  # prompts per work item: what a worker, Ray actor or array task takes at once
    ignore_provenance: bool = False  # accept a --vae or --tokenizer other than the checkpoint's training run's
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # BiART's: auto is bf16 on CUDA, fp32 on a CPU


@dataclass(frozen=True)
class ClipTrainConfig:
    shards: str  # image shards (img2dataset: jpg + txt)
    output: str  # .safetensors file for the weights
    model: str = "lverse-tiny"  # open_clip architecture (model/clip_configs/ holds ours)
    steps: int = 600  # optimizer steps
    batch_size: int = 128  # image-caption pairs per step
    lr: float = 1e-3  # peak learning rate (warmup, then cosine to 0)
    weight_decay: float = 0.1
    warmup_steps: int = 50  # steps of linear warmup
    eval_shards: str | None = None  # held-out image shards, scored after training
    seed: int = 0  # random seed


@dataclass
class ModelConfig:
    preset: str = "debug"  # a BiART preset (model/biart.py PRESETS): biart-500m, biart-mini, debug
    overrides: dict = field(default_factory=dict)  # BiARTConfig fields to change, e.g. {n_layer: 4}


@dataclass
class DataConfig:
    shards: str = ""  # token shards: a folder, a glob or a {00000..00099} range
    tokenizer: str = ""  # the caption tokenizer's .model file
    vae: str = ""  # the AugVAE checkpoint the shards were encoded with (its hash is checked)
    workers: int = 2  # DataLoader workers per rank (any number: they share one global order)
    resampled: bool = False  # each epoch draws N samples with replacement instead of a permutation of all N
    bpe_dropout: float = 0.1  # BPE-dropout on captions at load time
    # the folder the token index (_index/) is in; None: beside the shards, or RUN_DIR/token_index for
    # s3:// shards (the index is memory-mapped, so it lives on a file system; on several nodes a shared one)
    index_dir: str | None = None


@dataclass
class OptimConfig:
    lr: float | None = None  # peak lr; None: lr_per_sample x global batch (the paper's rule)
    lr_per_sample: float = 4.5e-7  # the paper's lr per sample of global batch
    weight_decay: float = 0.01  # AdamW, not on embeddings, biases, LayerNorms
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from 0
    # "cosine" to min_lr_ratio x lr at the last step, "constant", or "plateau" (the paper's): halved after
    # `patience` log intervals without a `plateau_threshold` relative fall of the mean loss, to min_lr_ratio x lr
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    patience: int = 5  # plateau: log intervals without improvement before the lr halves
    plateau_threshold: float = 0.01  # plateau: the relative fall of an interval's mean loss that counts
    grad_clip: float = 1.0  # global grad-norm clip (0: off)
    fused: bool = True  # FusedAdam on CUDA, DeepSpeedCPUAdam with offload (both compile on first use)


@dataclass
class TrainConfig:
    run_dir: str = "runs/biart"  # checkpoints, logs, samples, the resolved config
    steps: int = 1000  # optimizer steps in all
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    deepspeed: str = "zero2_bf16"  # ZeRO stage, precision, offload: a shipped ds_configs/ name or a path
    activation_checkpointing: bool = False  # recompute each block in the backward pass (BiARTConfig's flag)
    # torch.compile each block's forward (not generation's cached steps); off: not measured on CUDA
    # yet, and no faster on 2 CPU cores for a minute of compiling (benchmarks/README.md)
    compile: bool = False
    seed: int = 0  # initialisation, data order, dropout
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    checkpoint_every_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last (0: off)
    checkpoint_background: bool = True  # copy the state to host memory and write it while training goes on
    keep_checkpoints: int = 3  # newest complete checkpoints kept
    log_every: int = 10  # steps between log lines / TensorBoard points
    sample_every: int = 0  # steps between sample captions and images (0: never)
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: measured at start
    tensorboard: bool = True  # also log to TensorBoard (run_dir/tensorboard)
    wandb: bool = False  # also log to Weights & Biases (needs `wandb` installed)
    wandb_project: str = "lverse"  # the Weights & Biases project
    export: bool = True  # write run_dir/biart.safetensors at the end
    ignore_provenance: bool = False  # resume although data.vae or data.tokenizer differ from the checkpoint's
    master_port: int | None = None  # rendezvous port (None: from the launcher / SLURM job id)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        at_least(self, 1, "steps", "micro_batch_size", "grad_accum", "checkpoint_every", "log_every")
        at_least(self, 0, "keep_checkpoints", "sample_every", "checkpoint_every_minutes")
        at_least(self.data, 0, "workers")
        if self.optim.schedule == "plateau" and self.log_every % 2:
            raise InputError(f"schedule plateau judges the mean loss of each log interval, and directions alternate "
                             f"step by step: log_every must be even (got {self.log_every}) so every interval "
                             "holds as many steps of each")


@dataclass
class VAETrainConfig:
    run_dir: str = "runs/augvae"  # checkpoints, logs, reconstructions, the exported models
    shards: str = ""  # image shards of `lverse download` (img2dataset webdataset tars)
    preset: str = "debug-ml"  # an AugVAE ML preset (model/augvae.py PRESETS): augvae-ml, debug-ml
    init: str | None = None  # an ML .safetensors to start from (ml_steps: 0 fine-tunes SL only)
    ml_steps: int = 1000  # ML training steps
    sl_steps: int = 1000  # SL fine-tuning steps after the conversion
    batch_size: int = 8  # images per rank per step
    lr: float | None = None  # None: lr_per_sample x global batch
    lr_per_sample: float = 4.5e-6  # the paper's lr per image of global batch
    warmup_steps: int = 0  # linear warmup at the start of each phase
    # after warmup, per phase: "constant", "cosine" to min_lr_ratio x lr at its end, or "plateau": halved after
    # `patience` log intervals without improvement, down to min_lr_ratio x lr
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    patience: int = 5  # plateau: log intervals without improvement before the lr halves
    plateau_threshold: float = 0.01  # plateau: the relative fall of the interval's mean loss that counts as one
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's
    weight_decay: float = 1e-5  # Adam's (decoupled, AdamW)
    crop_ratio: float = 0.75  # smallest random crop, as a fraction of the shorter side
    perceptual_weight: float = 0.1  # LPIPS weight (0: MSE and commitment only)
    vgg_checkpoint: str | None = None  # torchvision vgg16 weights for LPIPS (None: random VGG, tests only)
    workers: int = 2  # DataLoader workers per rank
    shuffle_shards: int = 4  # shards read and permuted together
    resampled: bool = False  # draw shards with replacement instead of epochs
    seed: int = 0  # initialisation, crops, data order
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at a phase's end)
    keep_checkpoints: int = 3  # newest complete checkpoints kept
    log_every: int = 10  # steps between log lines / TensorBoard points
    sample_every: int = 0  # steps between reconstruction grids (0: never)
    eval_shards: str = ""  # held-out image shards: PSNR of their reconstructions is logged ("": none)
    eval_every: int = 100  # steps between held-out evaluations
    eval_images: int = 256  # held-out images evaluated (the first of eval_shards, centre crops)
    target_psnr: float | None = None  # end SL once the held-out PSNR reaches this; sl_steps is then a ceiling
    tensorboard: bool = True  # also log to TensorBoard (run_dir/tensorboard)
    master_port: int | None = None  # rendezvous port (None: from the launcher / SLURM job id)

    def __post_init__(self):
        at_least(self, 1, "batch_size", "checkpoint_every", "log_every", "eval_every", "eval_images",
                 "shuffle_shards")
        at_least(self, 0, "ml_steps", "sl_steps", "workers", "keep_checkpoints", "sample_every")

"""The runtime: how stages run, shared by all of them; knows no stage.

Modules:
    executors    run_tasks: one task per item on local processes, Ray tasks or Ray actors, with
                 driver-side retries (TaskResult, StageFailed)
    stage        the shard-stage runner of download, encode and caption: array block, executor,
                 one ``_summary.json`` schema (Execution, run_shard_stage, array_block)
    distributed  rank / world from torchrun, DeepSpeed or SLURM (world_info_from_env, setup_env)
    data         training data: BiART's global sample order (any ranks and workers, resumable to
                 the sample; a sample's view and BPE-dropout from (seed, epoch, key): view_pick,
                 sample_seed), the AugVAE's shard streams per (rank, worker)
    token_index  the memory-mapped index of a folder of token shards, their random crops too
                 (build, check, read; for s3:// shards in a folder of its own)
    metrics      MetricsLogger: metrics.jsonl, log lines, TensorBoard, W&B
    trainer      the training core of BiART, AugVAE and CLIP training: process setup, reseeding,
                 the stop signal, one lr Schedule, the checkpoint lifecycle, image grids
    deepspeed    DeepSpeed: its config (loaded, checked), the kernels, optimizer and engine a
                 model trains with (wrap), its checkpoints (writer, safe loading, universal, stage 0)
    model_cache  the models a worker process loads once and keeps between items
"""

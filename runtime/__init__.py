"""The runtime: how stages run, shared by all of them; knows no stage.

Modules:
    tasks        run_tasks: one task per item on an Executor, with driver-side retries
                 (TaskResult, StageFailed, Executor)
    local_pool   the executors of one machine: InProcess (workers 0), LocalPool (spawned processes)
    lifetime     a worker dies with the driver, and what it starts with it; a second Ctrl-C ends
                 the driver at once (die_with_parent, guard_group, stopping)
    ray_cluster  joining a Ray cluster and keeping the driver's SIGTERM while it waits on Ray; the
                 actors a model stage starts (ray_pool); outputs every node sees (check_shared)
    ray_tasks    the executors of a Ray cluster: RayTasks (a task per item), RayActors (a model each)
    stage        the shard-stage runner of download, encode, caption and generate: array block,
                 the executor from the stage's config (executor_for), one ``_summary.json`` schema
                 (Execution, ModelExecution, run_shard_stage, array_block)
    distributed  rank / world from torchrun, DeepSpeed or SLURM (world_info_from_env, setup_env)
    data         training data: BiART's global sample order (any ranks and workers, resumable to
                 the sample; a sample's view and BPE-dropout from (seed, epoch, key): view_pick,
                 sample_seed), the AugVAE's shard streams per (rank, worker)
    token_index  the memory-mapped index of a folder of token shards, their random crops too: its
                 format (one VERSION) and reading it (TokenIndex, TokenSamples, open_samples)
    token_index_build  building it: by `lverse index` (index_folder), or by rank 0 of a training
                 run that finds none while the other ranks wait (ensure_index); build_index
    metrics      MetricsLogger: metrics.jsonl, log lines, TensorBoard, W&B
    trainer      the training core of BiART, AugVAE and CLIP training: process setup, reseeding,
                 the stop signal, one lr Schedule, the checkpoint lifecycle, image grids
    deepspeed    DeepSpeed: its config (loaded, checked), the kernels, optimizer and engine a
                 model trains with (wrap), its checkpoints (writer, safe loading, universal, stage 0)
    model_cache  the models a worker process loads once and keeps between items
"""

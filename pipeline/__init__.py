"""Stage drivers: each stage works on one shard at a time, on a swappable executor.

Modules:
    executors  run_tasks (local processes, Ray tasks or Ray actors; driver-side retries),
               TaskResult, StageFailed
    download   Conceptual Captions -> webdataset shards with img2dataset (DownloadConfig, run_download)
    encode     image shards -> AugVAE token shards (EncodeConfig, run_encode, read_samples)
    run        `lverse pipeline run`: download -> tokenizer -> encode (PipelineConfig, run_pipeline)
    data       training streams: shards per (rank, worker), resumable to the micro-batch (Stream,
               Batches, TokenBatch, token_shard_counts, image_shard_counts, read_tar)
    distributed rank / world from torchrun, DeepSpeed or SLURM (world_info_from_env, setup_env)
    train      `lverse train`: BiART under DeepSpeed ZeRO (TrainConfig, train, wrap, export_checkpoint)
    train_vae  `lverse train-vae`: AugVAE ML -> SL, data-parallel (VAETrainConfig, train_vae)
    metrics    MetricsLogger: metrics.jsonl, log lines, TensorBoard, W&B
    caption    `lverse caption`: batch captioning with CLIP reranking (CaptionConfig, run_caption,
               sample_captions)
    generate   `lverse generate`: text-to-image with CLIP reranking (GenerateConfig, run_generate)
    evaluate   `lverse evaluate`: caption_metrics, reconstruction_metrics, generation_clip_score
    report     `lverse report`: write_report (static HTML)
    slurm      `lverse slurm submit`: render slurm/*.sbatch, keep and sbatch it (SubmitOptions,
               render, submit, array_block)
    clusters/  `ray up` configs: local.yaml (on-premise), aws.yaml
"""

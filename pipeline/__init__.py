"""Stage drivers: each stage works on one shard at a time, on a swappable executor.

Modules:
    executors  run_tasks (local processes, Ray tasks or Ray actors; driver-side retries),
               TaskResult, StageFailed
    download   Conceptual Captions -> webdataset shards with img2dataset (DownloadConfig, run_download)
    encode     image shards -> AugVAE token shards (EncodeConfig, run_encode, read_samples)
    run        `lverse pipeline run`: download -> tokenizer -> encode (PipelineConfig, run_pipeline)
    clusters/  `ray up` configs: local.yaml (on-premise), aws.yaml
"""

"""The stages, one module each; a stage imports the core, the models and the runtime, never
another stage, but ``configs``: every stage's options, in a module that imports no torch, so the
command line builds its help without the stages.

Modules:
    configs    DownloadConfig, TokenizerConfig, EncodeConfig, CaptionConfig, GenerateConfig,
               ClipTrainConfig, TrainConfig (ModelConfig, DataConfig, OptimConfig), VAETrainConfig
    download   Conceptual Captions -> webdataset shards with img2dataset (run_download)
    encode     image shards -> AugVAE token shards, with --crops K random crops (run_encode,
               crop_boxes, crop_views)
    caption    `lverse caption`: batch captioning with CLIP reranking (run_caption,
               sample_captions)
    generate   `lverse generate`: text-to-image with CLIP reranking (run_generate)
    evaluate   `lverse evaluate`: caption_metrics (truncated and whole), reconstruction_metrics,
               generation_clip_score, reconstruction_fid, generation_fid (with blur radii)
    report     `lverse report`: write_report (static HTML), the paper's figures beside a run's (PAPER)
    train      `lverse train`: BiART under DeepSpeed (ZeRO or stage 0) (train, export_checkpoint)
    train_vae  `lverse train-vae`: AugVAE ML -> SL, data-parallel (train_vae)
    train_clip `lverse train-clip`: a small open_clip model from scratch (train_clip)
    clusters/  `ray up` configs: local.yaml (on-premise), aws.yaml

download, encode and caption are shard stages: their configs extend ``runtime.stage.Execution``
and they run through ``runtime.stage.run_shard_stage``.
"""

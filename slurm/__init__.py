"""SLURM job templates, one per launch shape, rendered by ``lverse slurm submit`` (see
``lverse.pipeline.slurm``): ``{{NAME}}`` placeholders are filled with validated, shell-quoted values.

    download.sbatch  job array: task i fetches its block of input chunks (img2dataset)
    encode.sbatch    job array: task i encodes its block of image shards, one AugVAE per GPU
    train.sbatch     NODES x GPUs tasks through srun; checkpoint + requeue on the warning signal
    caption.sbatch   job array: task i captions its block of shards
    ray.sbatch       a Ray cluster in the allocation (head on the first node), then a command
"""

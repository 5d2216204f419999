"""Run under torchrun by test_ds_configs.py: load a run's newest checkpoint into the DeepSpeed engine
(any ZeRO stage) and save its weights (gathered under ZeRO-3) and its logits on a fixed batch, both
directions, for comparison with the exported safetensors model.

    python -m torch.distributed.run --nproc_per_node N tests/engine_logits.py RUN_DIR OUT.pt
"""

import os
import sys

import torch

from lverse.model.biart import BiART, Direction
from lverse.pipeline.configs import TrainConfig
from lverse.pipeline.train import build_model_config, ds_config
from lverse.runtime.deepspeed import deepspeed_loads, wrap
from lverse.runtime.distributed import setup_env
from lverse.runtime.trainer import complete_checkpoints, read_run_config


def main(run_dir: str, out: str) -> None:
    import deepspeed
    import deepspeed.comm as dist
    setup_env()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = read_run_config(run_dir, TrainConfig)
    bcfg = build_model_config(cfg)
    engine, _ = wrap(BiART(bcfg), ds_config(cfg, dist.get_world_size()), 1e-3, torch.device("cpu"), cfg.optim)
    folder = complete_checkpoints(run_dir)[-1][1]
    with deepspeed_loads(folder):
        engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
    engine.eval()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(bcfg.image_vocab, (2, bcfg.seq_len - 1), generator=g)
    with torch.no_grad():
        logits = {d.name: engine(seq, d, targets=seq)[0].float() for d in Direction}
    params = list(engine.module.parameters())
    gathered = deepspeed.zero.GatheredParameters(params) if cfg.deepspeed.endswith(("zero3_bf16.json",
                                                                                    "zero3_fp16.json")) else None
    if gathered is not None:
        gathered.__enter__()
    weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    if gathered is not None:
        gathered.__exit__(None, None, None)
    if dist.get_rank() == 0:
        torch.save({"seq": seq, "weights": weights, **logits}, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])

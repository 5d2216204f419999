"""The registry of planners: what a stage's SLURM job is planned from.

The launcher (``lverse.slurm.render``) knows no stage; it renders the template of a launch shape
from a ``Plan``. Each planner here reads a stage's run config and says where the run writes and,
for job arrays, how many items the array tasks split (planned now, so bad input fails at submit).
"""

from __future__ import annotations

import os

from lverse.core.config import load_config
from lverse.core.errors import InputError
from lverse.core.shards import expand_shards
from lverse.pipeline.configs import CaptionConfig, GenerateConfig, TrainConfig
from lverse.slurm.render import Plan


def _pipeline_stage(stage: str):
    def planner(config: str) -> Plan:
        from lverse.run import PipelineConfig, stage_items
        cfg = load_config(config, PipelineConfig)
        return Plan(run_dir=cfg.run_dir, items=len(stage_items(cfg, stage)))
    return planner


def _caption(config: str) -> Plan:
    cfg = load_config(config, CaptionConfig)
    return Plan(run_dir=cfg.output, items=len(expand_shards(cfg.shards)))


def _generate(config: str) -> Plan:
    from lverse.pipeline.generate import prompt_items, read_prompts
    cfg = load_config(config, GenerateConfig)
    return Plan(run_dir=cfg.output, items=len(prompt_items(len(read_prompts(cfg.prompts)), cfg.prompts_per_item)))


def _train(config: str) -> Plan:
    cfg = load_config(config, TrainConfig)

    def elastic(nodes: int, min_nodes: int, ranks_per_node: int) -> None:
        from lverse.pipeline.train import check_elastic  # torch and DeepSpeed: only for --elastic
        check_elastic(cfg, nodes, min_nodes, ranks_per_node)

    return Plan(run_dir=cfg.run_dir, check_elastic=elastic)


PLANNERS = {"download": _pipeline_stage("download"), "encode": _pipeline_stage("encode"), "caption": _caption,
            "generate": _generate, "train": _train, "ray": lambda config: Plan(run_dir=os.getcwd())}


def plan(stage: str, config: str | None) -> Plan:
    if stage not in PLANNERS:
        raise InputError(f"stage must be one of {sorted(PLANNERS)}, got {stage!r}")
    return PLANNERS[stage](config)

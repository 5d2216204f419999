"""Training logs: ``metrics.jsonl`` (every logged step, machine-readable), a readable log line,
TensorBoard, and Weights & Biases when asked for. Only rank 0 writes; other ranks' calls are no-ops.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: str, rank: int, tensorboard: bool = True, wandb_config: dict | None = None,
                 wandb_project: str = "lverse"):
        """``wandb_config``: the run config to log to W&B; None or empty: no W&B."""
        self.rank, self.tb, self.wandb = rank, None, None
        if rank:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_config:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("wandb: true needs `pip install wandb`") from e
            self.wandb = wandb.init(project=wandb_project, dir=run_dir, config=wandb_config, resume="allow",
                                    id=os.path.basename(os.path.abspath(run_dir)))

    def log(self, metrics: dict) -> None:
        """``metrics`` has ``step``; None values are kept in the jsonl and left out elsewhere."""
        if self.rank:
            return
        step = metrics["step"]
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "step" and v is not None)
        log.info("step %d | %s", step, shown)
        for k, v in metrics.items():
            if self.tb and k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def image(self, tag: str, array: np.ndarray, step: int) -> None:
        """(H, W, 3) uint8."""
        if self.tb:
            self.tb.add_image(tag, array, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

"""Training logs: ``metrics.jsonl`` (every logged step, machine-readable), a readable log line,
TensorBoard, and Weights & Biases when asked for. Only rank 0 writes; other ranks' calls are no-ops.

``metrics.jsonl`` holds two kinds of record, one JSON object a line:

- a logged step: ``step`` and the stage's metrics, with ``world_size`` (ranks) and ``time`` (Unix
  seconds, when it was logged) added here;
- an event, told apart by its ``event`` key (readers of the curves skip it, ``step_records``).
  The one event so far is ``"reformed"``: a start of the run on another number of ranks than its
  previous start (a job requeued onto fewer nodes, an elastic job that lost one):
  ``{"event": "reformed", "step": S, "last_step_before": L, "world_size_before": A,
  "world_size": B, "seconds_lost": T, "time": ...}`` -- S is the first step done after the start,
  L the last step the previous start logged, T the wall time from L's record to S's end: what the
  failure cost, the redone steps ``resumed step + 1 .. L`` included.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: str, rank: int, tensorboard: bool = True, wandb_config: dict | None = None,
                 wandb_project: str = "lverse", world_size: int = 1):
        """``wandb_config``: the run config to log to W&B; None or empty: no W&B. ``world_size``: the
        ranks of this start, recorded with every step and compared with the previous start's."""
        self.rank, self.world_size, self.tb, self.wandb = rank, world_size, None, None
        if rank:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.previous = last_step_record(self.path)  # the previous start's last logged step
        if self.previous and self.previous.get("world_size", world_size) != world_size:
            log.warning("the run's previous start trained on %d ranks (last logged step %d), this one on %d",
                        self.previous["world_size"], self.previous["step"], world_size)
        else:
            self.previous = None  # nothing to record
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
        self._append({**metrics, "world_size": self.world_size, "time": time.time()})
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "step" and v is not None)
        log.info("step %d | %s", step, shown)
        for k, v in metrics.items():
            if self.tb and k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def first_step_done(self, step: int) -> None:
        """Call once, when this start's first step is done: on another number of ranks than the
        previous start, the re-formation is recorded (the module's docstring has the record)."""
        if self.rank or self.previous is None:
            return
        before, now = self.previous, time.time()
        event = {"event": "reformed", "step": step, "last_step_before": before["step"],
                 "world_size_before": before["world_size"], "world_size": self.world_size,
                 "seconds_lost": round(now - before["time"], 3), "time": now}
        self._append(event)
        log.warning("re-formed on %d ranks (from %d): step %d done %.1f s after step %d was logged",
                    self.world_size, before["world_size"], step, event["seconds_lost"], before["step"])
        if self.wandb:
            self.wandb.log({"reformed/world_size": self.world_size, "reformed/seconds_lost": event["seconds_lost"]},
                           step=step)
        self.previous = None

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

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


def read_records(path: str) -> list[dict]:
    """Every record of a ``metrics.jsonl``, steps and events; a line a killed writer left half
    written (the file's last) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def step_records(records: list[dict]) -> list[dict]:
    """The logged steps of ``records``, without the events."""
    return [r for r in records if "event" not in r]


def run_history(records: list[dict]) -> list[dict]:
    """The logged steps of ``records`` as the run went on: a resumed run logs again the steps
    after its checkpoint, and those lines replace the ones it had logged before it stopped (a
    curve drawn from every line would go back and forth)."""
    history: list[dict] = []
    for record in step_records(records):
        while history and history[-1]["step"] >= record["step"]:
            history.pop()
        history.append(record)
    return history


def events(records: list[dict], kind: str) -> list[dict]:
    """The events of one kind (e.g. ``"reformed"``) of ``records``."""
    return [r for r in records if r.get("event") == kind]


def last_step_record(path: str, tail: int = 1 << 16) -> dict | None:
    """The last logged step of ``path`` (None: no file, or no step in it), read from the file's
    last ``tail`` bytes first: a long run's file is large."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail))
        lines = f.read().decode("utf-8", "replace").splitlines()[1 if size > tail else 0:]
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" not in record:
            return record
    if size <= tail:
        return None
    steps = step_records(read_records(path))
    return steps[-1] if steps else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

"""TensorBoard: event files in `<run dir>/tensorboard` (`logger.tensorboard.log_dir`),
readable by `tensorboard --logdir`: every step's metrics as scalars, the config, sample
tables and the summary as text.

Resuming: the writer starts with `purge_step` = the first step trained again, so
TensorBoard discards what an earlier attempt wrote from that step on and each step is
shown once, as the resumed run logged it (the same after an in-job restart: `rewind`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from orchestrator.tracking.base import Sink

log = logging.getLogger("orchestrator")


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders it); cells on one line."""

    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return " ".join(text.replace("|", "\\|").splitlines())  # every line break str knows

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardSink(Sink):
    name = "TensorBoard"

    def __init__(self, log_dir: Path, start_step: int, config_dict: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.log_dir = log_dir
        self.last = start_step
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1, flush_secs=10)
        if start_step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(config_dict, indent=1) + "\n```", 0)
        log.info("TensorBoard: %s (`tensorboard --logdir %s`)", log_dir, log_dir)

    @classmethod
    def open(cls, logger_cfg, run_dir: Path, start_step: int, config_dict: dict[str, Any]) -> Optional[Sink]:
        log_dir = Path(logger_cfg.tensorboard.log_dir or run_dir / "tensorboard")
        try:
            return cls(log_dir, start_step, config_dict)
        except ImportError:
            log.warning("TensorBoard: the tensorboard package is missing (pip install -e '.[tracking]'); not logging")
            return None

    def where(self) -> Optional[str]:
        return f"`tensorboard --logdir {self.log_dir}`"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.last = step

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: Optional[int]) -> None:
        self.writer.add_text(key, markdown_table(columns, rows), self.last if step is None else step)

    def log_summary(self, values: dict[str, Any]) -> None:
        rows = [[k, v] for k, v in values.items()]
        self.writer.add_text("summary", markdown_table(["key", "value"], rows), self.last)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        self.writer.close()
        self.writer = self._writer_cls(str(self.log_dir), purge_step=step + 1, flush_secs=10)
        self.last = step

    def close(self, finished: bool) -> None:
        self.writer.close()

"""The trainer's figures as TensorBoard scalars (`swarm train --tensorboard DIR`): one point per optimizer step.

Written with ``torch.utils.tensorboard`` (it needs the ``tensorboard`` package, an optional extra:
``pip install 'swarm[tensorboard]'``). Scalars, by tag (x = the step):

- ``train/loss``: the step's mean loss over its completed micro-batches (absent for a step that completed none)
- ``train/tokens``: tokens trained so far; ``train/tokens_per_s``: tokens per second since the start
- ``microbatches/completed`` and ``microbatches/dropped``: the step's; ``microbatches/retried``: retries so far,
  ``microbatches/retried_step``: the step's
- ``time/elapsed_s``: seconds since training started; ``time/step_s``: the step's duration

At the end, :meth:`TensorBoardReporter.close` adds the summary's mean per-stage timings (``timing/stageK/fwd_s`` ...)
and its drop and retry reasons as text.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Dict, Optional

INSTALL_HINT = "pip install tensorboard (or the project's extra: pip install 'swarm[tensorboard]')"


def check_available(log_dir: str) -> None:
    """Raise ValueError, saying what to do, unless the reporter can run: the ``tensorboard`` package is
    installed and ``log_dir`` can be created and written. Cheap (no import), so the CLI calls it before it starts
    anything."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}"
        )
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--tensorboard {log_dir}: cannot create the directory ({e.strerror})") from None
    if not os.access(log_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--tensorboard {log_dir}: the directory is not writable")


class TensorBoardReporter:
    """Writes one event file under ``log_dir`` (TensorBoard's layout: point TensorBoard at the directory, or at a
    parent holding several runs)."""

    def __init__(self, log_dir: str, flush_secs: int = 10) -> None:
        check_available(log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # a tensorboard too broken or too old for torch's writer
            raise ValueError(
                f"--tensorboard: torch cannot use the installed tensorboard ({e}): {INSTALL_HINT}"
            ) from e
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs)
        self._retried = 0
        self._elapsed = 0.0

    def on_step(self, row: Dict[str, Any]) -> None:
        """One metrics row of :class:`swarm.trainer.Trainer` (the ``--metrics-out`` line of a step)."""
        step = int(row["step"])
        elapsed = float(row["elapsed_s"])
        add = self.writer.add_scalar
        if row.get("loss") is not None:
            add("train/loss", float(row["loss"]), step)
        add("train/tokens", int(row["tokens"]), step)
        add("train/tokens_per_s", row["tokens"] / elapsed if elapsed > 0 else 0.0, step)
        add("microbatches/completed", int(row["completed"]), step)
        add("microbatches/dropped", int(row["dropped"]), step)
        add("microbatches/retried", int(row["retried"]), step)
        add("microbatches/retried_step", int(row["retried"]) - self._retried, step)
        add("time/elapsed_s", elapsed, step)
        add("time/step_s", elapsed - self._elapsed, step)
        self._retried = int(row["retried"])
        self._elapsed = elapsed

    def close(self, summary: Optional[Dict[str, Any]] = None) -> None:
        """Add the run's summary (mean timings per stage, drop and retry reasons), flush and close the file."""
        if summary:
            last = max(int(summary.get("steps", 1)) - 1, 0)
            for stage, parts in sorted((summary.get("timing") or {}).items()):
                if isinstance(parts, dict):
                    for name, value in sorted(parts.items()):
                        if isinstance(value, (int, float)):
                            self.writer.add_scalar(f"timing/{stage}/{name}", float(value), last)
            for key in ("drop_reasons", "retry_reasons"):
                if summary.get(key):
                    self.writer.add_text(f"summary/{key}", json.dumps(summary[key], sort_keys=True), last)
        self.writer.flush()
        self.writer.close()

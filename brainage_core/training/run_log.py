"""The files and log lines a training run writes besides its checkpoints.

Rank 0 appends one JSON line per epoch to ``out_dir/train_log.jsonl`` (``epoch``, ``train_loss``, ``lr``,
``epoch_s``, ``steps``) and one per evaluation to ``out_dir/metrics.jsonl``; a resumed run first drops the
lines after its checkpoint's epoch (:func:`truncate_jsonl`). :func:`epoch_line` is the one line logged
per epoch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"

#: the metrics shown in the epoch line, when the evaluation has them
SHOWN_METRICS = ("val_mae_int", "val_mae_ext", "val_bacc", "val_lc", "test_mae_int", "test_mae_ext", "test_bacc")

__all__ = ["METRICS_FILE", "TRAIN_LOG_FILE", "append_jsonl", "epoch_line", "truncate_jsonl"]


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` to ``path`` as one JSON line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=False) + "\n")


def truncate_jsonl(path: Path, last_epoch: int) -> None:
    """Keep the lines of ``path`` whose ``epoch`` <= ``last_epoch`` (all lines are dropped when 0)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def epoch_line(epochs: int, record: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> str:
    """``epoch e/E  loss ...  lr ...  s s``, then the evaluation's metrics when ``metrics`` is given."""
    width = len(str(epochs))
    line = (
        f"epoch {record['epoch']:>{width}}/{epochs}  loss {record['train_loss']:.4f}  lr {record['lr']:.2e}  "
        f"{record['epoch_s']:.1f} s"
    )
    if metrics:
        shown = []
        for key in SHOWN_METRICS:
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                shown.append(f"{key} {value:.3f}")
        if metrics.get("leaked"):
            shown.append("LEAKED")
        protocol = f", {metrics['protocol']} probes" if metrics.get("protocol") else ""
        line += "  | " + "  ".join(shown) + f"  (eval {metrics.get('eval_s', 0.0):.1f} s{protocol})"
    return line

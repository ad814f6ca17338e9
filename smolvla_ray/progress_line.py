"""The progress line rank 0 prints after each report, and its parser: one format, written
by the trainer, read back by `smolvla-ray logs --follow` from a job's log stream.

    [smolvla-ray] step 40/60 loss 0.1234 lr 1.00e-03 52.1 samples/s eta 12s (checkpoint)
"""

from __future__ import annotations

import re
from typing import Any

PREFIX = "[smolvla-ray]"
_LINE = re.compile(
    r"\[smolvla-ray\] step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\S+) "
    r"lr (?P<lr>\S+) (?P<sps>\S+) samples/s eta (?P<eta>\S+?)s(?P<ckpt> \(checkpoint\))?"
)


def format_progress_line(
    *,
    step: int,
    total_steps: int,
    loss: float,
    lr: float,
    samples_per_s: float,
    eta_s: float,
    checkpoint: bool,
) -> str:
    """The line (without newline) that `parse_progress_line` reads back."""
    return (
        f"{PREFIX} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e} "
        f"{samples_per_s:.1f} samples/s eta {eta_s:.0f}s" + (" (checkpoint)" if checkpoint else "")
    )


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """A progress line (anywhere in `line`, e.g. after Ray's `(RayTrainWorker pid=..)`
    prefix) as a record for `observe.progress.Progress.update`; None for any other line."""
    match = _LINE.search(line)
    if match is None:
        return None
    try:
        return {
            "step": int(match["step"]),
            "total_steps": int(match["total"]),
            "loss": float(match["loss"]),
            "lr": float(match["lr"]),
            "samples_per_s": float(match["sps"]),
            "eta_s": float(match["eta"]),
            "checkpoint": match["ckpt"] is not None,
        }
    except ValueError:  # a field that looks right but is not a number
        return None

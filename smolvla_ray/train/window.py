"""The metric window: what the steps since the last report measured, summarised into the
record every rank reports (means over the window; grad norm and lr of its last step).

The steps' device tensors are read here, once per report, not at every step (step.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from smolvla_ray.train.step import StepResult


@dataclass
class MetricWindow:
    """Steps since the last report; `summary()` closes the window and opens the next."""

    world_size: int = 1
    started: float = field(default_factory=time.perf_counter)
    results: list[tuple[int, StepResult]] = field(default_factory=list)
    data_waits: list[float] = field(default_factory=list)
    comm_bytes: int = 0

    def add(self, step: int, result: StepResult, *, data_wait_s: float, comm_bytes: int) -> None:
        self.results.append((step, result))
        self.data_waits.append(data_wait_s)
        self.comm_bytes = comm_bytes  # per step, the same every step: the last one's

    def summary(self) -> tuple[dict[str, Any], list[int]]:
        """The window's metrics and its steps whose update was skipped (non-finite loss or
        gradient norm); the next window starts now."""
        steps = [(number, result.resolve()) for number, result in self.results]
        elapsed = time.perf_counter() - self.started
        samples = sum(r.num_samples for _, r in steps) * self.world_size

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        last = steps[-1][1]
        record = {
            "loss": mean([r.loss for _, r in steps]),
            "grad_norm": last.grad_norm,
            "lr": last.lr,
            "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
            "step_s": elapsed / len(steps),
            "data_wait_s": mean(self.data_waits),
            "forward_s": mean([r.forward_s for _, r in steps]),
            "backward_s": mean([r.backward_s for _, r in steps]),
            "optimizer_s": mean([r.optimizer_s for _, r in steps]),
            "comm_bytes": self.comm_bytes,
        }
        nonfinite = [number for number, r in steps if not r.finite]
        self.started, self.results, self.data_waits = time.perf_counter(), [], []
        return record, nonfinite

"""An exponential moving average (EMA) of the trainable weights (`train.ema`).

After optimizer step `step` (counted from 1: the trainer's `state.step` once the step is
taken), the EMA of each trainable parameter becomes

    step <= start_step                          ema = weights        (a copy)
    step > start_step, step % update_every == 0  ema = decay x ema + (1 - decay) x weights
    otherwise                                   unchanged

computed as `torch.lerp(ema, weights, w)` with w = 1 or 1 - decay (lerp's `end - (end -
start) x (1 - w)` makes w = 1 an exact copy). The EMA starts as a copy of the weights it is
built from: the step-0 weights, or on a resume without an EMA in the checkpoint (the EMA
turned on mid-run) the resumed ones. `update_every` counts the run's steps, so a resume
updates on the same steps as an uninterrupted run.

Only the trainable parameters have one (the frozen ones never change), held in float32
whatever the parameters' dtype, on their device. Every rank keeps its own: the weights are
the same everywhere after DDP's all-reduce, so no collective is needed.

A step whose loss or gradient norm was not finite was not applied and must not move the
EMA. That is known on the device only (`StepResult.finite`; on CUDA the fused AdamW skipped
the update through `found_inf`, train/step.py), so `w` is multiplied by it on the device:
nothing here waits for the GPU. (With a device tensor as its weight, torch's CUDA
`_foreach_lerp_` runs one kernel per parameter rather than fused ones: a few hundred small
launches per step at base size.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from smolvla_ray.settings import EmaSettings


class WeightEMA:
    """The float32 EMA of `params` (the trainable view's Parameters, in its order)."""

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        decay: float,
        start_step: int = 0,
        update_every: int = 1,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.params = list(params)
        self.decay, self.start_step, self.update_every = decay, start_step, update_every
        self.averages: list[Tensor] = []
        self.reset()

    @classmethod
    def from_settings(cls, ema: EmaSettings | None, params: Sequence[Tensor]) -> WeightEMA | None:
        """The EMA `ema` asks for, started from `params` as they are; None when it is off."""
        if ema is None:
            return None
        return cls(
            params, decay=ema.decay, start_step=ema.start_step, update_every=ema.update_every
        )

    @torch.no_grad()
    def reset(self) -> None:
        """Start again from the current weights."""
        self.averages = [p.detach().to(torch.float32, copy=True) for p in self.params]

    def weight(self, step: int) -> float:
        """The lerp weight of step `step` (1-based): 1 (copy), 1 - decay, or 0 (no update)."""
        if step <= self.start_step:
            return 1.0
        if step % self.update_every == 0:
            return 1.0 - self.decay
        return 0.0

    @torch.no_grad()
    def update(self, step: int, finite: Tensor) -> None:
        """After optimizer step `step`; `finite` (a bool scalar on the parameters' device)
        says whether the step was applied. No host sync."""
        weight = self.weight(step)
        if weight == 0.0:
            return
        applied = finite.to(device=self.averages[0].device, dtype=torch.float32) * weight
        torch._foreach_lerp_(self.averages, self._float_params(), [applied] * len(self.averages))

    def _float_params(self) -> list[Tensor]:
        return [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]

    def tensors(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The EMA by parameter name (for a checkpoint)."""
        return dict(zip(names, self.averages, strict=True))

    @torch.no_grad()
    def load(self, tensors: Mapping[str, Tensor], names: Sequence[str]) -> None:
        """Put a checkpoint's EMA (`tensors`, by name) in place, exactly."""
        missing = [n for n in names if n not in tensors]
        extra = sorted(set(tensors) - set(names))
        if missing or extra:
            raise RuntimeError(
                "the checkpoint's EMA does not match this policy's trainable parameters: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for average, name in zip(self.averages, names, strict=True):
            average.copy_(tensors[name].to(average.device, torch.float32))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA in the parameters for the duration (an evaluation), the raw weights back
        afterwards, bit for bit. In-place copies under no_grad: DDP, the optimizer and its
        state keep the very same Parameters, and the next step sees the raw weights."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for param, average in zip(self.params, self.averages, strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, raw, strict=True):
                    param.copy_(saved)

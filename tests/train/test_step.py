"""The step keeps the device busy: its loss, gradient norm and "finite" flag stay tensors
until a log step reads them, and on CUDA a non-finite step is skipped by the fused AdamW's
`found_inf` instead of a host `if`. The fused kernel runs on CPU too, so both are checked
here: a skipped step leaves weights and optimizer state untouched, and a finite step equals
the unfused update up to rounding."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from smolvla_ray.build import open_dataset
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec, spec_from_dict
from smolvla_ray.train.optim import build_optimizer, build_scheduler
from smolvla_ray.train.setup import build_loader
from smolvla_ray.train.step import StepResult, train_step
from smolvla_ray.train.trainer import WorkerContext, _build
from tests.inprocess import single_process_group
from tests.integration.conftest import tiny_spec_dict

CPU = torch.device("cpu")


def spec_for(dataset: str, storage: Path) -> JobSpec:
    return spec_from_dict(
        tiny_spec_dict(
            dataset, storage, "step", scaling={"num_workers": 1},
            data={"uri": dataset, "num_loader_workers": 0, "feature_cache": "off"},
            train={"steps": 4, "batch_size": 4, "optimizer": {"lr": 1e-3}},
        )
    )  # fmt: skip


def one_step(worker, batch: dict, *, fused: bool) -> tuple[StepResult, dict, dict]:
    """A step on a copy of the worker's DDP module; its weights and optimizer state after."""
    ddp = copy.deepcopy(worker.ddp)
    params = list(ddp.module.params)
    optimizer = build_optimizer(
        params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10, fused=fused
    )
    scheduler = build_scheduler(
        optimizer, kind="constant", warmup_steps=0, decay_steps=1, decay_lr=0.0, total_steps=1
    )
    result = train_step(
        ddp, [batch], optimizer=optimizer, scheduler=scheduler, step=0, seed=0,
        grad_clip_norm=10.0, device=CPU, autocast_dtype=None,
    )  # fmt: skip
    weights = {str(i): p.detach().clone() for i, p in enumerate(params)}
    state = {str(i): optimizer.state.get(p, {}) for i, p in enumerate(params)}
    return result, weights, state


def test_fused_steps_match_and_skip_non_finite_ones(tmp_path: Path, demo_dataset: str) -> None:
    settings = RunSettings.from_spec(spec_for(demo_dataset, tmp_path))
    with single_process_group():
        meta = open_dataset(settings, storage_options={})
        worker = _build(settings, WorkerContext(), meta)
        loader = build_loader(
            settings, meta, worker.policy, rank=0, world_size=1, cursor=None, storage_options={},
            device=CPU,
        )  # fmt: skip
        batch = next(iter(loader))
        before = {str(i): p.detach().clone() for i, p in enumerate(worker.ddp.module.params)}

        plain, plain_weights, _ = one_step(worker, batch, fused=False)
        fused, fused_weights, fused_state = one_step(worker, batch, fused=True)
        assert isinstance(plain.loss, torch.Tensor) and isinstance(fused.grad_norm, torch.Tensor)
        a, b = plain.resolve(), fused.resolve()
        assert a.finite and b.finite and a.loss == b.loss and a.grad_norm == b.grad_norm
        for name, weight in plain_weights.items():
            assert not torch.equal(weight, before[name]), name  # the step did update
            torch.testing.assert_close(fused_weights[name], weight, rtol=1e-5, atol=1e-7)
        assert all(int(s["step"]) == 1 for s in fused_state.values())

        poisoned = dict(batch)
        poisoned["action"] = batch["action"].clone()
        poisoned["action"][0, 0, 0] = float("nan")
        for fused_optimizer in (False, True):
            result, weights, state = one_step(worker, poisoned, fused=fused_optimizer)
            resolved = result.resolve()
            assert not resolved.finite
            for name, weight in weights.items():
                assert torch.equal(weight, before[name]), (fused_optimizer, name)
            for moments in state.values():  # nothing was applied: no step, zero moments
                assert int(moments.get("step", 0)) == 0
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in moments:
                        assert not moments[key].any(), key

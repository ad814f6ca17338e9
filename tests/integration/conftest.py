"""Integration fixtures: a real embedded Ray instance and a real synthetic LeRobot dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="package")
def ray_local() -> Iterator[None]:
    """A private embedded Ray with room for two CPU workers plus Ray Train's controller,
    shut down after the last integration test (later tests check nothing started Ray).

    `address="local"`: always a new Ray of its own, never a cluster that runs on this
    machine (a `ray start` of another test or user), whatever RAY_ADDRESS says."""
    import ray

    from smolvla_ray.driver import start_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    root = str(Path(__file__).resolve().parents[2])  # so workers import tests.* modules
    start_ray(
        "local", num_cpus=4, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}}
    )
    yield
    ray.shutdown()


def tiny_spec_dict(dataset: str, storage: Path, name: str, **sections: Any) -> dict[str, Any]:
    """A job spec for the tiny policy on `dataset`; `sections` update its sections."""
    spec: dict[str, Any] = {
        "name": name,
        "policy": {"preset": "tiny"},
        # The video path; tests/integration/cache covers training from the feature cache.
        "data": {"uri": dataset, "num_loader_workers": 0, "feature_cache": "off"},
        "train": {
            "steps": 6,
            "batch_size": 4,
            "log_every": 1,
            "optimizer": {"lr": 1e-3},
            "scheduler": {"warmup_steps": 2, "decay_steps": 100},
        },
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage": str(storage), "every_steps": None, "keep_last": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(spec.get(section), dict):
            spec[section] = {**spec[section], **values}
        else:
            spec[section] = values
    return spec

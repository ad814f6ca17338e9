"""`RunSettings` (settings.py): the spec's values the worker side reads, derived ones resolved
once, the public dict checkpoints and metric sinks record, and a frozen, picklable object
that a worker rebuilds from that dict."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest

from smolvla_ray.settings import AugmentSettings, RunSettings, normalized_spec_json
from smolvla_ray.spec import JobSpec, spec_from_dict


def job(tmp_path: Path, **sections: Any) -> JobSpec:
    return spec_from_dict(
        {
            "name": "run",
            "policy": {"preset": "tiny", "chunk_size": 4, "n_action_steps": 4},
            "data": {"uri": str(tmp_path / "data")},
            "train": {"steps": 10, "batch_size": 4},
            "checkpoint": {"storage": str(tmp_path / "runs")},
            "storage_options": {"key": "AKIA-secret", "endpoint_url": "http://s3:9000"},
            **sections,
        }
    )


def test_derived_values_are_resolved_once_from_the_spec(tmp_path: Path) -> None:
    spec = job(tmp_path)
    settings = RunSettings.from_spec(spec)
    assert settings.run_uri == str(tmp_path / "runs" / "run")
    assert (settings.train.precision, settings.train.frozen_dtype) == ("fp32", "fp32")
    assert settings.policy.config_updates == spec.policy_config_updates()
    assert settings.policy.config_updates["chunk_size"] == 4
    assert settings.data.episodes is None and settings.eval is None
    assert settings.data.augment is None  # off
    assert settings.train.optimizer.lr == spec.train.optimizer.lr
    assert settings.data.cache_max_bytes == int(spec.data.cache_max_bytes)

    gpu = RunSettings.from_spec(job(tmp_path, scaling={"use_gpu": True}))
    assert (gpu.use_gpu, gpu.train.precision, gpu.train.frozen_dtype) == (True, "bf16", "bf16")

    held = RunSettings.from_spec(
        job(
            tmp_path,
            data={"uri": "d", "episodes": {"start": 2, "stop": 9}, "augment": {"enable": True}},
            eval={"episodes": [7, 8]},
        )
    )
    assert held.data.episodes == range(2, 9) and held.eval is not None
    assert held.eval.episodes == (7, 8) and held.eval.batch_size == 4  # train.batch_size
    assert isinstance(held.data.augment, AugmentSettings)
    assert held.data.augment.brightness == (0.8, 1.2)


def test_the_public_dict_is_what_checkpoints_and_sinks_recorded(tmp_path: Path) -> None:
    spec = job(tmp_path)
    settings = RunSettings.from_spec(spec)
    assert settings.spec_json == spec.public_dict()
    assert "key" not in settings.spec_json["storage_options"]  # secrets never recorded
    # A worker rebuilds the very same settings from the dict the driver sends.
    assert RunSettings.from_spec_json(settings.spec_json) == settings
    assert normalized_spec_json(settings.spec_json) == settings.spec_json


def test_settings_are_frozen_and_picklable(tmp_path: Path) -> None:
    settings = RunSettings.from_spec(job(tmp_path, eval={"split": 0.2}))
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train.steps = 20  # type: ignore[misc]


def test_an_older_recorded_spec_gets_this_versions_defaults(tmp_path: Path) -> None:
    recorded = job(tmp_path).public_dict()
    del recorded["train"]["attention_fp32"]  # a field added later
    assert normalized_spec_json(recorded)["train"]["attention_fp32"] is False
    broken = {"name": "old", "train": {"momentum": 0.9}}  # no longer a valid spec
    assert normalized_spec_json(broken) == broken

"""Finetuning a smolvla_base-shaped checkpoint on a dataset with other cameras and widths,
without Ray: mismatches exit 2 before anything starts, the feature cache is keyed by the
rename map, and an empty camera trains the same from the cache as from video."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from smolvla_ray.cli import app
from smolvla_ray.data.meta import load_meta
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import spec_from_dict
from tests.realshape import (
    ACTION_DIM,
    RENAME_MAP,
    STATE_DIM,
    write_base_shaped_checkpoint,
    write_libero_shaped_dataset,
)

CAM = "observation.images."
runner = CliRunner()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("real")
    return {
        "base": write_base_shaped_checkpoint(root / "smolvla_base"),
        "dataset": write_libero_shaped_dataset(root / "libero", episodes=2, length=12),
    }


def spec_dict(real: dict[str, str], storage: Path, **data) -> dict:
    return {
        "name": "real",
        "policy": {"pretrained": real["base"]},
        "data": {"uri": real["dataset"], "rename_map": RENAME_MAP, **data},
        "train": {"steps": 2, "batch_size": 2},
        "checkpoint": {"storage": str(storage)},
    }


def write_spec(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


SWAP = json.dumps({f"{CAM}image": f"{CAM}camera2", f"{CAM}image2": f"{CAM}camera1"})
# (--set overrides, words the message must hold): each must exit 2 before Ray starts.
RUN_MISMATCHES = {
    "no map": (["data.rename_map={}"], [f"{CAM}image", f"{CAM}camera1", "--set data.rename_map="]),
    "unknown key": ([f'data.rename_map={{"{CAM}front": "{CAM}camera1"}}'],
                    [f"{CAM}front", f"{CAM}image2"]),
    "two keys to one": (
        [f'data.rename_map={{"{CAM}image": "{CAM}camera1", "{CAM}image2": "{CAM}camera1"}}'],
        [f"{CAM}image", f"{CAM}image2", f"{CAM}camera1"],
    ),
    "target not in the policy": (
        [f'data.rename_map={{"{CAM}image": "{CAM}camera1", "{CAM}image2": "{CAM}wrist"}}'],
        [f"{CAM}wrist", f"{CAM}camera3"],
    ),
    "state above max": (["policy.overrides={max_state_dim: 6}"],
                        ["observation.state", "8 dims", "max_state_dim=6"]),
    "cameras without the map's key": (["data.cameras=[image]"],
                                      [f"{CAM}image2", "data.cameras leaves out"]),
    "unused camera and unsourced camera": (
        [f'data.rename_map={{"{CAM}image": "{CAM}camera1"}}'],
        [f"{CAM}image2", f"{CAM}camera2", "LeRobot refuses"],
    ),
    "not camera to camera": (
        [f'data.rename_map={{"{CAM}image": "{CAM}camera1", "{CAM}image2": "{CAM}camera2", '
         '"observation.state": "observation.joints"}'],
        ["observation.joints", "only cameras"],
    ),
    "map with a preset": (["policy.pretrained=null", "policy.preset=tiny"],
                          ["data.rename_map", "preset"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RUN_MISMATCHES))
def test_run_exits_2_naming_the_keys_before_anything_starts(
    case: str, real: dict[str, str], tmp_path: Path
) -> None:
    import ray

    overrides, words = RUN_MISMATCHES[case]
    path = write_spec(tmp_path / "spec.yaml", spec_dict(real, tmp_path / "runs"))
    args = ["run", path]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())  # the terminal wraps long messages
    for word in words:
        assert word in flat, (word, flat)
    assert not (tmp_path / "runs").exists()  # nothing started: not even the storage probe
    assert not ray.is_initialized()


def test_validate_resolves_local_files_and_skips_remote_ones(
    real: dict[str, str], tmp_path: Path
) -> None:
    path = write_spec(tmp_path / "spec.yaml", spec_dict(real, tmp_path / "runs"))
    ok = runner.invoke(app, ["validate", path])
    assert ok.exit_code == 0, ok.output
    assert "observation.images.image2  ->  observation.images.camera2" in ok.output
    bad = runner.invoke(app, ["validate", path, "--set", "data.rename_map={}"])
    assert bad.exit_code == 2 and "no dataset camera feeds the policy" in bad.output
    remote = runner.invoke(app, ["validate", path, "--set", "data.uri=s3://bucket/libero"])
    assert remote.exit_code == 0 and "features not checked" in remote.output


def test_swapping_two_cameras_is_another_feature_cache(
    real: dict[str, str], tmp_path: Path
) -> None:
    from smolvla_ray.build import resolve_dataset_features
    from smolvla_ray.cache.store import cache_key, key_inputs

    meta = load_meta(real["dataset"])
    keys = {}
    for name, overrides in [("map", []), ("swapped", [f"data.rename_map={SWAP}"])]:
        settings = RunSettings.from_spec(spec_from_dict(spec_dict(real, tmp_path), overrides))
        config, resolution = resolve_dataset_features(settings, meta, storage_options={})
        inputs = key_inputs(settings, config, resolution, meta, storage_options={})
        keys[name] = cache_key(inputs)
        sources = {k: v["source"] for k, v in inputs["cameras"].items()}
        expected = RENAME_MAP if name == "map" else json.loads(SWAP)
        assert sources == {v: k for k, v in expected.items()}
    assert keys["map"] != keys["swapped"]


def test_an_empty_camera_trains_the_same_from_cached_features(
    real: dict[str, str], tmp_path: Path
) -> None:
    from smolvla_ray.build import build_policy
    from smolvla_ray.keys import FEATURES_SUFFIX

    spec = spec_from_dict(spec_dict(real, tmp_path, feature_cache="off"),
                          ["policy.overrides={empty_cameras: 1}"])  # fmt: skip
    settings = RunSettings.from_spec(spec)
    policy = build_policy(settings, load_meta(real["dataset"]), storage_options={}).eval()
    assert policy.feature_resolution.image_features == {
        f"{CAM}camera1": (3, 64, 80),
        f"{CAM}camera2": (3, 64, 80),
        f"{CAM}camera3": (3, 256, 256),
    }  # camera3 has no source and takes the empty slot
    g = torch.Generator().manual_seed(0)
    batch = {
        f"{CAM}camera1": torch.rand(2, 3, 64, 80, generator=g),
        f"{CAM}camera2": torch.rand(2, 3, 64, 80, generator=g),
        "observation.state": torch.randn(2, STATE_DIM, generator=g),
        "action": torch.randn(2, policy.config.chunk_size, ACTION_DIM, generator=g),
        "observation.language.tokens": torch.randint(5, 300, (2, 6), generator=g),
        "observation.language.attention_mask": torch.ones(2, 6, dtype=torch.bool),
    }
    noise = torch.randn(2, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    time = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        from_video, _ = policy(dict(batch), noise=noise, time=time)
        cached = {k: v for k, v in batch.items() if not k.startswith(CAM)}
        cached.update(policy.encode_images(batch))
        assert set(cached) >= {f"{CAM}camera1{FEATURES_SUFFIX}", f"{CAM}camera2{FEATURES_SUFFIX}"}
        from_cache, _ = policy(cached, noise=noise, time=time)
    torch.testing.assert_close(from_cache, from_video, rtol=1e-5, atol=1e-6)

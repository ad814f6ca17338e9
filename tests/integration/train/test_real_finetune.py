"""A real user's finetune: a smolvla_base-shaped checkpoint (camera1..3, 6-D) on a dataset with
other camera names (image, image2), an 8-D state and a 7-D action, through Ray, from the
feature cache; then the export, loaded back and driven by raw observations under the
dataset's own key names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smolvla_ray import driver
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.checkpoint.export import export_checkpoint
from smolvla_ray.checkpoint.format import read_checkpoint
from smolvla_ray.features import FeatureResolution
from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics
from tests.integration.conftest import tiny_spec_dict
from tests.realshape import (
    ACTION_DIM,
    RENAME_MAP,
    STATE_DIM,
    write_base_shaped_checkpoint,
    write_libero_shaped_dataset,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
CAM = "observation.images."


def test_base_shaped_checkpoint_finetunes_on_other_cameras_and_widths(tmp_path: Path) -> None:
    base = write_base_shaped_checkpoint(tmp_path / "smolvla_base")
    dataset = write_libero_shaped_dataset(tmp_path / "libero", episodes=2, length=30)
    spec = spec_from_dict(
        tiny_spec_dict(
            dataset, tmp_path / "runs", "real",
            policy={"pretrained": base, "preset": None},
            data={"rename_map": RENAME_MAP, "feature_cache": "on"},
            # One worker with the batch of two (2 workers = 1 with double batch, test_train_loop).
            train={"steps": 40, "log_every": 5, "batch_size": 8, "optimizer": {"lr": 1e-3}},
            scaling={"num_workers": 1},
        )
    )  # fmt: skip
    resolution = driver.preflight(spec)
    assert [(r.policy_key, r.status) for r in resolution.cameras] == [
        (f"{CAM}camera1", "used"), (f"{CAM}camera2", "used"), (f"{CAM}camera3", "left out")
    ]  # fmt: skip
    driver.run(spec)

    records = read_metrics(run_uri(str(tmp_path / "runs"), "real"))
    first, last = records[0]["loss"], records[-1]["loss"]  # means over 5 steps each
    assert last < 0.8 * first, (first, last)

    # The checkpoint records the resolution; the cache encoded the renamed cameras.
    (info,) = list_checkpoints(run_uri(str(tmp_path / "runs"), "real"), {})[-1:]
    loaded = read_checkpoint(fetch_checkpoint(info.uri, tmp_path / "ckpt", {}))
    assert FeatureResolution.from_json(loaded.state.features) == resolution
    (key_file,) = (tmp_path / "runs" / "feature-cache").glob("*/key.json")
    cameras = json.loads(key_file.read_text())["cameras"]
    assert {k: v["source"] for k, v in cameras.items()} == {
        f"{CAM}camera1": f"{CAM}image",
        f"{CAM}camera2": f"{CAM}image2",
    }

    out = tmp_path / "pretrained_model"
    export_checkpoint(info.uri, str(out))
    config = json.loads((out / "config.json").read_text())
    assert list(config["input_features"]) == [f"{CAM}camera1", f"{CAM}camera2",
                                              "observation.state"]  # fmt: skip
    assert config["input_features"]["observation.state"]["shape"] == [STATE_DIM]
    assert config["output_features"]["action"]["shape"] == [ACTION_DIM]
    steps = json.loads((out / "policy_preprocessor.json").read_text())["steps"]
    assert steps[0] == {"registry_name": "rename_observations_processor",
                        "config": {"rename_map": RENAME_MAP}}  # fmt: skip

    # Ours loads the export and acts on a raw observation under the dataset's key names.
    policy = SmolVLAPolicy.from_pretrained(str(out)).eval()
    assert policy.processor is not None and policy.processor.rename_map == RENAME_MAP
    g = torch.Generator().manual_seed(0)
    raw = {
        f"{CAM}image": torch.rand(3, 64, 80, generator=g),
        f"{CAM}image2": torch.rand(3, 64, 80, generator=g),
        "observation.state": torch.randn(STATE_DIM, generator=g),
        "task": "push the block to the left",
    }
    batch = policy.processor.preprocess(raw)
    action = policy.processor.postprocess(policy.select_action(batch))
    assert action.shape == (1, ACTION_DIM) and torch.isfinite(action).all()

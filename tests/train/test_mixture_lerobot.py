"""A mixture across writers: a dataset LeRobot 0.6.1 wrote itself (one camera `front`
renamed to the policy's `top`, 5-D state, 4-D action, two tasks) mixed with one of this
project's writer (cameras top and wrist, 6-D state and action). Both feed the same policy
camera, a killed run resumes to the same weights, and the export for LeRobot's dataset
carries its keys, widths and statistics."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from smolvla_ray.checkpoint.discovery import list_checkpoints
from smolvla_ray.cli import app
from smolvla_ray.data.meta import load_meta
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import spec_from_dict
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict
from tests.train.test_mixture import two_arms  # noqa: F401  (a fixture)
from tests.train.test_trainer import trainable


def across_writers(ours: str, lerobots: str, storage: Path, name: str):
    spec = tiny_spec_dict(
        ours, storage, name, scaling={"num_workers": 1},
        train={"steps": 6, "log_every": 2, "batch_size": 4},
        checkpoint={"storage": str(storage), "every_steps": 2},
    )  # fmt: skip
    spec["data"] = {
        "datasets": [
            {"uri": ours, "name": "ours"},
            {
                "uri": lerobots,
                "name": "lerobot",
                "rename_map": {"observation.images.front": "observation.images.top"},
            },
        ],
        "num_loader_workers": 0,
    }
    return spec_from_dict(spec)


def test_a_mixture_with_a_dataset_lerobot_wrote_trains_resumes_and_exports(
    tmp_path: Path,
    two_arms: tuple[str, str],  # noqa: F811
    lerobot_dataset: str,
) -> None:
    ours = two_arms[0]
    state, reporter = train_in_process(across_writers(ours, lerobot_dataset, tmp_path, "whole"))
    assert state is not None and state.step == 6
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in reporter.reports])))

    killed = across_writers(ours, lerobot_dataset, tmp_path, "killed")
    assert train_in_process(killed, stop_after=2)[0] is None  # newest checkpoint: 2
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 2
    whole, resumed = trainable(tmp_path, "whole", 6), trainable(tmp_path, "killed", 6)
    assert set(whole) == set(resumed)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name

    info = list_checkpoints(run_uri(str(tmp_path), "whole"))[-1]
    out = tmp_path / "export-lerobot"
    result = CliRunner().invoke(app, ["export", info.uri, str(out), "--dataset", "lerobot"])
    assert result.exit_code == 0, result.output
    policy = SmolVLAPolicy.from_pretrained(str(out))
    assert list(policy.config.image_features) == ["observation.images.top"]
    assert (policy.config.state_dim, policy.config.action_dim) == (5, 4)
    stats = load_meta(lerobot_dataset).stats
    for key in ("observation.state", "action"):
        expected = torch.as_tensor(stats[key]["mean"], dtype=torch.float32)
        assert torch.equal(policy.processor.stats[key]["mean"], expected), key
    # LeRobot's raw key is renamed at inference as in training.
    assert policy.processor.rename_map == {"observation.images.front": "observation.images.top"}

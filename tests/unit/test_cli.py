"""The command line: its surface is frozen here (it grows only on purpose) and exit codes
follow the contract: 0 success, 2 invalid input (nothing started), 1 failure."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from smolvla_ray.cli import app

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
COMMANDS = {
    "demo-dataset": {"out", "format", "episodes", "cameras", "codec", "fps"},
    "validate": {"spec", "set_"},
    "schema": set(),
    "run": {"spec", "set_", "address", "progress", "force"},
    "checkpoints": {"uri", "verify"},
    "report": None,  # options owned by the report command's docs
    "export": {"checkpoint", "out", "raw_weights", "merge", "dataset"},
    "evaluate": {
        "source",
        "data",
        "episodes",
        "out",
        "max_samples",
        "batch_size",
        "seed",
        "device",
        "plot_episodes",
        "revision",
        "raw_weights",
    },
    "submit": {"spec", "address", "set_", "ship_package", "wait", "force"},
    "status": {"job_id", "address"},
    "logs": {"job_id", "address", "follow", "progress"},
    "stop": {"job_id", "address"},
    "list": {"address"},
}
runner = CliRunner()


def test_command_surface_is_frozen() -> None:
    import typer.main

    click_app = typer.main.get_command(app)
    assert set(click_app.commands) == set(COMMANDS)
    for name, params in COMMANDS.items():
        if params is not None:
            assert {p.name for p in click_app.commands[name].params} == params, name


def test_half_a_gpu_per_worker_is_exit_2() -> None:
    half = runner.invoke(
        app,
        [
            "validate", str(CONFIGS / "tiny-demo.yaml"), "--set", "scaling.use_gpu=true",
            "--set", "scaling.resources_per_worker={GPU: 0.5}",
        ],
    )  # fmt: skip
    assert half.exit_code == 2, half.output
    assert "resources_per_worker.GPU=0.5: each worker drives exactly one GPU" in half.output


def test_validate_and_schema() -> None:
    ok = runner.invoke(app, ["validate", str(CONFIGS / "tiny-demo.yaml")])
    assert ok.exit_code == 0 and "valid job spec 'tiny-demo'" in ok.output
    bad = runner.invoke(
        app, ["validate", str(CONFIGS / "tiny-demo.yaml"), "--set", "train.steps=0"]
    )
    assert bad.exit_code == 2 and "train.steps" in bad.output
    schema = runner.invoke(app, ["schema"])
    assert schema.exit_code == 0 and "train" in json.loads(schema.output)["properties"]


def test_run_refuses_bad_input_before_starting_anything(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    no_data = runner.invoke(
        app,
        [
            "run",
            str(CONFIGS / "tiny-demo.yaml"),
            "--set",
            f"data.uri={tmp_path / 'no-dataset'}",
            "--set",
            f"checkpoint.storage={tmp_path / 'runs'}",
        ],
    )
    assert no_data.exit_code == 2 and "info.json" in no_data.output
    assert not (tmp_path / "runs").exists()  # nothing started: not even the storage probe


def test_cluster_commands_fail_clearly_when_unreachable() -> None:
    result = runner.invoke(app, ["status", "some-job", "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach a Ray dashboard" in result.output

"""Weights & Biases as a metric sink, with the real wandb package in offline mode (no server,
no network): a tiny in-process finetune's records in W&B's offline run files, a killed run
whose resume continues the same W&B run, no secret in the config W&B got, and the refusals
(a bad spec, wandb not installed) before anything starts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from smolvla_ray.cli import app
from smolvla_ray.run_layout import CONTROL_FILES, WANDB_RUN_FILE, run_uri
from smolvla_ray.spec import SpecError, spec_from_dict
from smolvla_ray.train.metrics import WANDB_CHECKPOINT_KEY, read_metrics, tensorboard_tag
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict

SECRET = "fake-secret-5d1e8b0c93"  # must never reach W&B
PROJECT = "smolvla-test"


@dataclass
class OfflineRun:
    """What one W&B offline run directory holds, read back from its `.wandb` file."""

    run_id: str = ""
    project: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    start: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def read_offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run W&B wrote under `wandb_dir` (its WANDB_DIR), oldest first.

    A `.wandb` file is W&B's transaction log of protobuf `Record`s; `wandb sync` reads it with
    `DataStore`, and so does this (wandb has no public reader of offline runs)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    runs = []
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run, store = OfflineRun(), DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.run_id, run.project, run.name = r.run_id, r.project, r.display_name
                run.tags, run.start = list(r.tags), r.start_time.ToSeconds()
                run.config |= {i.key: json.loads(i.value_json) for i in r.config.update}
            elif kind == "config":
                run.config |= {i.key: json.loads(i.value_json) for i in record.config.update}
            elif kind == "history":
                run.history.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
                )  # fmt: skip
            elif kind == "summary":
                run.summary |= {i.key: json.loads(i.value_json) for i in record.summary.update}
        runs.append(run)
    return sorted(runs, key=lambda r: r.start)


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B's files in tmp_path, and its process-wide setup (which reads the environment
    once) torn down afterwards so that each test reads its own."""
    import wandb

    directory = tmp_path / "wandb-files"
    directory.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no Sentry reports from tests
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline needs none; online fails
    wandb.teardown()
    yield directory
    wandb.teardown()


def wandb_spec(dataset: str, storage: Path, name: str, *, steps: int, **sections: Any):
    train = {"steps": steps, "log_every": 2}
    return spec_from_dict(
        tiny_spec_dict(dataset, storage, name, train=train, scaling={"num_workers": 1}, **sections)
    )


TRAINING = ("loss", "lr", "grad_norm", "comm_bytes")  # the same when a step is run again
TIMINGS = ("samples_per_s", "step_s")


def check_history(
    history: list[dict[str, Any]], records: list[dict[str, Any]], keys: tuple[str, ...]
) -> None:
    """W&B's rows are the records, step for step, under TensorBoard's tags."""
    assert [row["_step"] for row in history] == [r["step"] for r in records]
    for key in keys:
        logged = [row[tensorboard_tag(key)] for row in history]
        assert logged == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert tensorboard_tag("loss") == "train/loss" and tensorboard_tag("step_s") == "perf/step_s"
    assert not any("fingerprint" in key for row in history for key in row)


def stored_run_id(storage: Path, name: str) -> str:
    return json.loads((storage / name / WANDB_RUN_FILE).read_text())["run_id"]


def test_a_finetune_logs_to_an_offline_wandb_run_without_secrets(
    tmp_path: Path, demo_dataset: str, wandb_dir: Path
) -> None:
    observe = {"wandb_project": PROJECT, "wandb_tags": ["tiny", "ci"], "wandb_mode": "offline"}
    # An option the local filesystem ignores; it is a secret (unknown keys are).
    spec = wandb_spec(
        demo_dataset, tmp_path, "wandb-run", steps=6, observe=observe,
        storage_options={"password": SECRET},
    )  # fmt: skip
    train_in_process(spec)

    uri = run_uri(str(tmp_path), "wandb-run")
    records = read_metrics(uri)
    (run,) = read_offline_runs(wandb_dir)
    assert run.run_id == stored_run_id(tmp_path, "wandb-run") and WANDB_RUN_FILE in CONTROL_FILES
    assert (run.project, run.name, run.tags) == (PROJECT, "wandb-run", ["tiny", "ci"])
    check_history(run.history, records, TRAINING + TIMINGS)
    assert run.summary[WANDB_CHECKPOINT_KEY] == f"{uri}/checkpoint_{6:09d}"

    # The config is the public spec: the run's settings, no credential, not even its key.
    config = run.config
    assert config["name"] == "wandb-run" and config["train"]["steps"] == 6
    assert config["observe"]["wandb_project"] == PROJECT
    assert "password" not in config["storage_options"]
    assert SECRET not in json.dumps(config)


def test_a_killed_run_resumes_the_same_wandb_run(
    tmp_path: Path, demo_dataset: str, wandb_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # W&B's own WANDB_MODE wins over the spec's online (which, with no API key, would fail).
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = wandb_spec(
        demo_dataset, tmp_path, "wandb-killed", steps=12, observe={"wandb_project": PROJECT},
        checkpoint={"storage": str(tmp_path), "every_steps": 4},
    )  # fmt: skip
    state, _ = train_in_process(spec, stop_after=10)  # dies after step 10; newest ckpt: 8
    assert state is None
    run_id = stored_run_id(tmp_path, "wandb-killed")
    state, _ = train_in_process(spec)
    assert state is not None and state.resumed_from_step == 8
    assert stored_run_id(tmp_path, "wandb-killed") == run_id  # made once, read back

    first, second = read_offline_runs(wandb_dir)
    assert first.run_id == second.run_id == run_id
    # Step 10 was logged before the kill: the resumed run logs only what came after it.
    assert [row["_step"] for row in first.history] == [2, 4, 6, 8, 10]
    assert [row["_step"] for row in second.history] == [12]
    # metrics.jsonl's step 10 is the resumed run's: its timings differ, its training does not.
    records = read_metrics(run_uri(str(tmp_path), "wandb-killed"))
    check_history(first.history + second.history, records, TRAINING)
    assert WANDB_CHECKPOINT_KEY not in first.summary
    assert second.summary[WANDB_CHECKPOINT_KEY].endswith(f"checkpoint_{12:09d}")


@pytest.mark.parametrize(
    ("observe", "words"),
    [
        ({"wandb_project": "team/project"}, "observe.wandb_project: must not contain /"),
        ({"wandb_project": " "}, "observe.wandb_project: must be 1 to 128 characters"),
        ({"wandb_project": "p", "wandb_entity": "a:b"}, "observe.wandb_entity: must not"),
        ({"wandb_project": "p", "wandb_tags": ["x" * 65]}, "must be 1 to 64 characters"),
        ({"wandb_project": "p", "wandb_run_name": ""}, "observe.wandb_run_name: must not be"),
        ({"wandb_project": "p", "wandb_mode": "disabled"}, "'online' or 'offline'"),
    ],
)
def test_bad_wandb_settings_are_refused(
    tmp_path: Path, demo_dataset: str, observe: dict[str, Any], words: str
) -> None:
    with pytest.raises(SpecError) as caught:
        wandb_spec(demo_dataset, tmp_path, "bad", steps=2, observe=observe)
    assert words in str(caught.value)


def test_run_refuses_wandb_when_it_is_not_installed(
    tmp_path: Path, demo_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smolvla_ray import driver

    starts: list[str] = []  # Ray may run in this test process already (another test's fixture)
    monkeypatch.setattr(driver, "start_ray", lambda *a, **k: starts.append("started"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec is None
    data = tiny_spec_dict(demo_dataset, tmp_path / "runs", "no-wandb", scaling={"num_workers": 1})
    data["observe"] = {"wandb_project": PROJECT}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "pip install 'smolvla-ray[wandb]'" in result.output
    assert "observe.wandb_project: null" in result.output
    assert starts == []  # refused before Ray would start

"""Held-out evaluation in-process: LeRobot's per-task split, held-out frames never in a
training batch, evaluations that repeat exactly, a validation loss that a recomputation from
the exported policy reproduces, patience, and best-checkpoint retention beside keep_last."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smolvla_ray.build import eval_episodes, open_dataset, run_episodes
from smolvla_ray.checkpoint.best import read_ranking, resolve_best
from smolvla_ray.checkpoint.discovery import list_checkpoints
from smolvla_ray.checkpoint.export import export_checkpoint
from smolvla_ray.data.meta import load_meta
from smolvla_ray.data.split import split_by_task
from smolvla_ray.data.synthetic import TASKS, write_demo_dataset
from smolvla_ray.features import resolve_features
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.run_layout import BEST_DIR, run_uri
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec, spec_from_dict
from smolvla_ray.storage import filesystem
from smolvla_ray.train.evaluation import evaluate_batches
from smolvla_ray.train.metrics import read_metrics
from smolvla_ray.train.setup import build_held_out
from tests.inprocess import record_episodes, train_in_process
from tests.integration.conftest import tiny_spec_dict

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def nine_episodes(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three tasks x three episodes (task = episode index mod 3), 20 frames each."""
    root = tmp_path_factory.mktemp("datasets") / "nine"
    return write_demo_dataset(str(root), num_episodes=9, episode_length=20)


def spec_for(dataset: str, storage: Path, name: str, *, train=None, **sections) -> JobSpec:
    train = {"steps": 6, "batch_size": 4, "log_every": 2, **(train or {})}
    sections.setdefault("eval", {"split": 0.3, "every_steps": 3, "max_samples": 12})
    sections.setdefault("checkpoint", {"storage": str(storage), "every_steps": 3})
    return spec_from_dict(
        tiny_spec_dict(dataset, storage, name, scaling={"num_workers": 1}, train=train, **sections)
    )


def test_the_split_is_lerobots_per_task_rule(nine_episodes: str, lerobot_dataset: str) -> None:
    meta = load_meta(nine_episodes)
    assert len(TASKS) == 3
    # ceil(3 x 0.3) = 1: the last episode of each task; ceil(3 x 0.5) = 2: the last two.
    assert split_by_task(meta, range(9), 0.3) == [6, 7, 8]
    assert split_by_task(meta, range(9), 0.5) == [3, 4, 5, 6, 7, 8]
    assert split_by_task(meta, [0, 3, 1], 0.5) == [3, 1]  # within a selection, its order
    # A dataset LeRobot wrote: "pick the cube" in episodes 0 and 2, "place the cube" in 1.
    written = load_meta(lerobot_dataset)
    assert [e.tasks for e in written.episodes] == [("pick the cube",), ("place the cube",)] * 1 + [
        ("pick the cube",)
    ]
    for fraction in (0.1, 0.5, 0.9):  # ceil(2 x f) of [0, 2] and ceil(1 x f) of [1]
        pick = [0, 2][2 - math.ceil(2 * fraction) :]
        assert sorted(split_by_task(written, range(3), fraction)) == sorted([*pick, 1])


def test_held_out_frames_never_reach_a_training_batch(
    tmp_path: Path, nine_episodes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(nine_episodes, tmp_path, "split", train={"steps": 12})
    settings = RunSettings.from_spec(spec)
    meta = open_dataset(settings, storage_options={})
    assert eval_episodes(settings, meta) == [6, 7, 8]
    assert run_episodes(settings, meta) == [0, 1, 2, 3, 4, 5]

    trained, evaluated = record_episodes(monkeypatch)
    state, _ = train_in_process(spec)
    assert state is not None and state.step == 12
    assert len(trained) == 12 * 4  # every training sample, checked one by one
    assert set(trained) <= {0, 1, 2, 3, 4, 5}
    assert len(evaluated) == 4 * 12 and set(evaluated) <= {6, 7, 8}  # 4 evaluations


def test_evaluations_repeat_exactly_and_match_the_exported_policy(
    tmp_path: Path, nine_episodes: str
) -> None:
    spec = spec_for(nine_episodes, tmp_path, "exact")
    train_in_process(spec)
    run = run_uri(str(tmp_path), "exact")
    final = next(r for r in read_metrics(run) if r["step"] == 6)
    assert final["eval/samples"] == 12

    # The final checkpoint, exported and loaded as a user would, evaluated twice.
    (last,) = [i for i in list_checkpoints(run) if i.step == 6]
    export_checkpoint(last.uri, str(tmp_path / "export"), {})
    policy = SmolVLAPolicy.from_pretrained(str(tmp_path / "export"))  # with its processor
    settings = RunSettings.from_spec(spec)
    meta = open_dataset(settings, storage_options={})
    policy.feature_resolution = resolve_features(policy.config, meta.features)
    held_out = build_held_out(settings, meta, policy, storage_options={})
    assert held_out is not None
    first = evaluate_batches(policy, held_out.batches(), seed=spec.train.seed, device=CPU)
    again = evaluate_batches(policy, held_out.batches(), seed=spec.train.seed, device=CPU)
    assert first.summary() == again.summary() and first.table() == again.table()
    summary = first.summary()
    for key in ("eval/loss", "eval/action_mse", "eval/action_l1", "eval/action_mse_robot"):
        assert summary[key] == pytest.approx(final[key], rel=1e-6), key
    table = json.loads((Path(run) / "eval" / "eval_000000006.json").read_text())
    assert table["summary"]["eval/loss"] == final["eval/loss"]
    assert len(table["per_dimension"]["mse"]) == policy.config.action_dim
    assert len(table["per_horizon_step"]["mse"]) == policy.config.chunk_size


def test_patience_stops_a_run_whose_evaluation_plateaus(
    tmp_path: Path, nine_episodes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # lr 1e-30: updates below every weight's float32 ulp, so the weights never change and every
    # evaluation equals the first: no improvement.
    spec = spec_for(
        nine_episodes, tmp_path, "plateau",
        train={"steps": 30, "optimizer": {"lr": 1e-30}, "scheduler": {"type": "constant"}},
        eval={"split": 0.3, "every_steps": 2, "max_samples": 6, "patience": 3},
        checkpoint={"storage": str(tmp_path), "every_steps": 10},
    )  # fmt: skip
    state, _ = train_in_process(spec)
    # Evaluations at 2 (best), 4, 6, 8: three without improvement -> stop at step 8.
    assert state is not None and state.step == 8
    assert state.best_step == 2 and state.evals_since_best == 3
    assert "stopping early at step 8: eval/action_mse has not improved for 3" in (
        capsys.readouterr().out
    )
    assert [i.step for i in list_checkpoints(run_uri(str(tmp_path), "plateau"))] == [8]


def test_keep_best_keeps_the_best_while_keep_last_rotates_and_the_run_resumes(
    tmp_path: Path, nine_episodes: str
) -> None:
    spec = spec_for(
        nine_episodes, tmp_path, "best",
        train={"steps": 12, "optimizer": {"lr": 3e-3}},
        eval={"split": 0.3, "every_steps": 2, "max_samples": 6},
        checkpoint={"storage": str(tmp_path), "every_steps": 2, "keep_last": 2, "keep_best": 2},
    )  # fmt: skip
    assert train_in_process(spec, stop_after=8)[0] is None  # killed after step 8's checkpoint
    state, _ = train_in_process(spec)  # resumes from step 8
    assert state is not None and state.resumed_from_step == 8 and state.step == 12

    run = run_uri(str(tmp_path), "best")
    values = {r["step"]: r["eval/action_mse"] for r in read_metrics(run) if "eval/action_mse" in r}
    assert sorted(values) == [2, 4, 6, 8, 10, 12]
    expected = sorted(values, key=lambda s: values[s])[:2]
    ranking = read_ranking(*filesystem(run, {}))
    assert [r["step"] for r in ranking] == expected
    assert [r["value"] for r in ranking] == [values[s] for s in expected]
    copies = sorted(p.name for p in (Path(run) / BEST_DIR).iterdir() if p.is_dir())
    assert copies == [f"checkpoint_{s:09d}" for s in sorted(expected)]
    # keep_last (in-process: the reporter does not rotate; Ray does) is untouched by best/:
    assert resolve_best(f"{run}/best", {}) == f"{run}/best/checkpoint_{expected[0]:09d}"
    export_checkpoint(resolve_best(f"{run}/best", {}), str(tmp_path / "best-export"), {})
    assert (tmp_path / "best-export" / "model.safetensors").is_file()


def test_the_evaluate_command_on_a_checkpoint_and_bad_input(
    tmp_path: Path, nine_episodes: str
) -> None:
    from typer.testing import CliRunner

    from smolvla_ray.cli import app

    spec = spec_for(nine_episodes, tmp_path, "cli", train={"steps": 3})
    train_in_process(spec)
    run = run_uri(str(tmp_path), "cli")
    (last,) = [i for i in list_checkpoints(run) if i.step == 3]
    runner = CliRunner()
    out = tmp_path / "eval"
    result = runner.invoke(
        app, ["evaluate", last.uri, "--data", nine_episodes, "--out", str(out),
              "--max-samples", "12", "--plot-episodes", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # Its own held-out episodes by default, and the very numbers the run logged at step 3.
    assert "the checkpoint's held-out episodes" in result.output
    record = json.loads((out / "evaluation.json").read_text())
    assert record["episodes"] == [6, 7, 8]
    logged = next(r for r in read_metrics(run) if r["step"] == 3)
    assert record["summary"]["eval/loss"] == pytest.approx(logged["eval/loss"], rel=1e-6)
    assert (out / "trajectories.png").stat().st_size > 10_000
    assert "| action dim | MSE |" in (out / "evaluation.md").read_text()

    # Other episodes; then bad input: exit 2, nothing written.
    result = runner.invoke(
        app, ["evaluate", last.uri, "--data", nine_episodes, "--out", str(tmp_path / "e2"),
              "--episodes", "0:2", "--plot-episodes", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e2" / "evaluation.json").read_text())["episodes"] == [0, 1]
    for args, message in [
        (["--episodes", "40:42"], "out of range"),
        (["--episodes", "a,b"], "--episodes 'a,b'"),
    ]:
        bad = runner.invoke(
            app, ["evaluate", last.uri, "--data", nine_episodes, "--out",
                  str(tmp_path / "bad"), *args],
        )  # fmt: skip
        assert bad.exit_code == 2 and message in bad.output, bad.output
    missing = runner.invoke(app, ["evaluate", str(tmp_path / "nope"), "--data", nine_episodes])
    assert missing.exit_code == 2
    assert not (tmp_path / "bad").exists()


def test_the_report_plots_the_held_out_curves(tmp_path: Path, nine_episodes: str) -> None:
    from PIL import Image

    from smolvla_ray.observe.report import write_report

    spec = spec_for(nine_episodes, tmp_path, "report")
    train_in_process(spec)
    run = run_uri(str(tmp_path), "report")
    report = write_report(run, tmp_path / "out", {})
    evaluated = [r for r in read_metrics(run) if "eval/loss" in r]
    assert report.plotted.eval_steps == [3, 6] == [r["step"] for r in evaluated]
    assert report.plotted.eval_loss == [r["eval/loss"] for r in evaluated]
    assert report.plotted.eval_action_mse == [r["eval/action_mse"] for r in evaluated]
    assert Image.open(report.png).size == (800, 1150)  # a fourth panel
    markdown = report.markdown.read_text()
    assert "| held-out evaluation | 2 evaluations;" in markdown
    assert f"at step {report.summary['best_step']}" in markdown


def test_evaluation_on_a_dataset_lerobot_wrote_after_an_interrupted_run(
    tmp_path: Path, lerobot_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shapes we did not choose: LeRobot's own writer, one camera `front`, 5-D state, 4-D
    action (padded to the policy's 8), two tasks. LeRobot's split holds out episode 2 of
    "pick the cube" and episode 1 of "place the cube"; a killed run resumes and its
    evaluations equal the uninterrupted run's."""
    trained, evaluated = record_episodes(monkeypatch)
    sections = {
        "eval": {"split": 0.5, "every_steps": 2, "max_samples": 8},
        "checkpoint": {"storage": str(tmp_path), "every_steps": 2, "keep_best": 1},
    }
    whole = spec_for(lerobot_dataset, tmp_path, "whole", train={"steps": 6}, **sections)
    settings = RunSettings.from_spec(whole)
    meta = open_dataset(settings, storage_options={})
    assert eval_episodes(settings, meta) == [1, 2] and run_episodes(settings, meta) == [0]
    train_in_process(whole)
    assert set(trained) == {0} and set(evaluated) == {1, 2}
    killed = spec_for(lerobot_dataset, tmp_path, "killed", train={"steps": 6}, **sections)
    assert train_in_process(killed, stop_after=4)[0] is None
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 4
    a, b = (
        {r["step"]: r["eval/action_mse_robot"] for r in read_metrics(run_uri(str(tmp_path), n))
         if "eval/action_mse_robot" in r}
        for n in ("whole", "killed")
    )  # fmt: skip
    assert sorted(a) == [2, 4, 6] and a == b
    table = json.loads((tmp_path / "whole" / "eval" / "eval_000000006.json").read_text())
    assert len(table["per_dimension"]["mse"]) == 4  # the dataset's action width, not 8

"""Bad input as a hostile new user gives it: every case exits with its code and a message
that names the problem, with no traceback, no password echoed, Ray never started and
nothing written where the user did not ask.

Each case builds its input in a fresh directory (`Case.make`), runs the CLI in-process and
checks (exit code, message fragments). `run` cases also check that the run's storage was
not created (preflight fails before even the write probe) and that Ray was not started.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from smolvla_ray.cli import app

runner = CliRunner()
SECRET = "hunter2secret"


@dataclass
class Env:
    """What a case can build on: a scratch directory and a dataset copy of its own."""

    tmp: Path
    demo: str
    environ: dict = field(default_factory=dict)  # set while the command runs

    def dataset(self) -> Path:
        copy = self.tmp / "dataset"
        if not copy.exists():
            shutil.copytree(self.demo, copy)
        return copy

    def spec(self, **sections) -> dict:
        spec = {
            "name": "adversarial",
            "policy": {"preset": "tiny"},
            "data": {"uri": str(self.dataset()), "num_loader_workers": 0},
            "train": {"steps": 2, "batch_size": 2},
            "checkpoint": {"storage": str(self.tmp / "runs")},
        }
        for section, values in sections.items():
            spec[section] = {**spec.get(section, {}), **values}
        return spec

    def write(self, data: dict | str | bytes, name: str = "spec.yaml") -> str:
        path = self.tmp / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return str(path)

    def fake_checkpoint(self, manifest: dict | None) -> Path:
        directory = self.tmp / "runs" / "old" / "checkpoint_000000004"
        directory.mkdir(parents=True)
        for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
            (directory / name).write_bytes(b"x" * 16)
        (directory / "state.json").write_text("{}")
        if manifest is not None:
            (directory / "manifest.json").write_text(json.dumps(manifest))
        return directory


@dataclass
class Case:
    make: Callable[[Env], list[str]]  # the CLI arguments, after building the input
    code: int
    words: tuple[str, ...]


def run_with(**sections) -> Callable[[Env], list[str]]:
    return lambda env: ["run", env.write(env.spec(**sections))]


def validate_with(**sections) -> Callable[[Env], list[str]]:
    return lambda env: ["validate", env.write(env.spec(**sections))]


def yaml_text(text: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        return ["validate", env.write(text.replace("DATA", str(env.dataset())))]

    return make


def truncate(relative: str, keep: int) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        path = env.dataset() / relative
        path.write_bytes(path.read_bytes()[:keep])
        return ["run", env.write(env.spec())]

    return make


def remove(relative: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        (env.dataset() / relative).unlink()
        return ["run", env.write(env.spec())]

    return make


def pretrained_cut_short(env: Env) -> list[str]:
    from smolvla_ray.data.synthetic import STATE_DIM
    from smolvla_ray.policy import PolicyConfig
    from smolvla_ray.policy.modeling import SmolVLAPolicy

    base = env.tmp / "base"
    cameras = {"top": (3, 96, 128), "wrist": (3, 96, 128)}
    config = PolicyConfig.preset("tiny").with_features(
        state_dim=STATE_DIM, action_dim=STATE_DIM, cameras=cameras
    )
    SmolVLAPolicy(config).save_pretrained(str(base))
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    spec = env.spec(policy={"preset": None, "pretrained": str(base)})
    return ["run", env.write(spec)]


def from_checkpoint(manifest: dict | None) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        source = env.fake_checkpoint(manifest)
        return ["run", env.write(env.spec(checkpoint={"from_checkpoint": str(source)}))]

    return make


def checkpoints_of(manifest: dict | None) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        env.fake_checkpoint(manifest)
        return ["checkpoints", str(env.tmp / "runs" / "old"), "--no-verify"]

    return make


def metrics_file(text: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        run = env.tmp / "runs" / "old"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(text)
        return ["report", str(run), "--out", str(env.tmp / "report")]

    return make


def onto_file(command: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        target = env.tmp / "target.txt"
        target.write_text("keep me")
        if command == "export":
            return ["export", str(env.fake_checkpoint(None)), str(target)]
        if command == "report":
            return ["report", str(env.tmp / "runs" / "none"), "--out", str(target)]
        return ["demo-dataset", str(target), "--episodes", "1"]

    return make


RECORD = '{"step": 1, "loss": 0.5, "lr": 0.001, "time": 1.0}'
GOOD_MANIFEST = {"files": {}}

CASES: dict[str, Case] = {
    # --- the spec file and --set ---
    "spec not UTF-8": Case(lambda e: ["validate", e.write(b"name: \xff\xfe\n")], 2,
                           ("not UTF-8",)),
    "spec missing": Case(lambda e: ["validate", str(e.tmp / "nope.yaml")], 2, ("does not exist",)),
    "spec is a directory": Case(lambda e: ["validate", str(e.tmp)], 2, ("is a directory",)),
    "spec empty": Case(lambda e: ["validate", e.write("")], 2, ("is empty",)),
    "spec a list": Case(lambda e: ["validate", e.write("- a\n- b\n")], 2, ("mapping",)),
    "spec bad YAML": Case(lambda e: ["validate", e.write("name: [unclosed\n")], 2,
                          ("invalid YAML", "line")),
    "duplicate key": Case(
        yaml_text("name: a\nname: b\npolicy: {preset: tiny}\ndata: {uri: DATA}\n"
                  "train: {steps: 2, batch_size: 2}\ncheckpoint: {storage: /tmp/x}\n"),
        2, ("'name' appears twice", "lines 1 and 2"),
    ),
    "duplicate nested key": Case(
        yaml_text("name: a\npolicy: {preset: tiny}\ndata: {uri: DATA}\n"
                  "train:\n  steps: 2\n  batch_size: 2\n  optimizer:\n    lr: 0.1\n    lr: 0.2\n"
                  "checkpoint: {storage: /tmp/x}\n"),
        2, ("'lr' appears twice",),
    ),
    "--set given twice": Case(
        lambda e: ["validate", e.write(e.spec()), "--set", "train.steps=5", "--set",
                   "train.steps=6"], 2, ("train.steps is given twice",),
    ),
    "--set duplicate key in a value": Case(
        lambda e: ["validate", e.write(e.spec()), "--set",
                   "data.rename_map={observation.images.a: observation.images.b, "
                   "observation.images.a: observation.images.c}"],
        2, ("appears twice",),
    ),
    "--set unknown field": Case(
        lambda e: ["validate", e.write(e.spec()), "--set", "train.stepz=5"], 2,
        ("no field 'stepz'", "steps"),
    ),
    "unknown section field": Case(validate_with(train={"step": 3}), 2, ("train.step",)),
    "lr infinite": Case(validate_with(train={"optimizer": {"lr": float("inf")}}), 2,
                        ("train.optimizer.lr", "finite")),
    "lr nan": Case(validate_with(train={"optimizer": {"lr": float("nan")}}), 2,
                   ("train.optimizer.lr",)),
    "grad clip infinite": Case(
        validate_with(train={"optimizer": {"grad_clip_norm": float("inf")}}), 2,
        ("grad_clip_norm",),
    ),
    "zero steps": Case(validate_with(train={"steps": 0}), 2, ("train.steps",)),
    "camera climbing out": Case(validate_with(data={"cameras": ["../../x"]}), 2,
                                ("camera '../../x'",)),
    "camera with a slash": Case(validate_with(data={"cameras": ["a/b"]}), 2, ("'/'",)),
    "storage memory://": Case(validate_with(checkpoint={"storage": "memory://runs"}), 2,
                              ("memory://", "Ray's workers")),
    "storage http": Case(validate_with(checkpoint={"storage": "https://example.com/r"}), 2,
                         ("read-only",)),
    "storage typo scheme": Case(validate_with(checkpoint={"storage": "s4://b/runs"}), 2,
                                ("unknown URL scheme", "s3://")),
    "dataset typo scheme": Case(validate_with(data={"uri": "gz://b/d"}), 2,
                                ("unknown URL scheme",)),
    "mlflow password": Case(
        validate_with(observe={"mlflow_tracking_uri": f"http://me:{SECRET}@mlflow:5000"}), 2,
        ("MLFLOW_TRACKING_PASSWORD",),
    ),
    "feature_cache typo": Case(validate_with(data={"feature_cache": "maybe"}), 2,
                               ("feature_cache",)),
    # --- run: everything knowable before Ray starts ---
    "episodes list out of range": Case(run_with(data={"episodes": [0, 99]}), 2,
                                       ("data.episodes", "[99]", "0..3")),
    "episodes range out of range": Case(run_with(data={"episodes": {"start": 2, "stop": 50}}),
                                        2, ("data.episodes", "out of range")),
    "dataset missing": Case(run_with(data={"uri": "/nonexistent/dataset"}), 2,
                            ("info.json",)),
    "info.json broken": Case(
        lambda e: [(e.dataset() / "meta/info.json").write_text("{"), "run",
                   e.write(e.spec())][1:], 2, ("info.json", "not valid JSON"),
    ),
    "stats.json missing": Case(remove("meta/stats.json"), 2, ("statistics", "observation.state")),
    "data parquet truncated": Case(truncate("data/chunk-000/file-000.parquet", 100), 2,
                                   ("file-000.parquet", "not a readable parquet")),
    "pretrained missing": Case(run_with(policy={"preset": None, "pretrained": "/no/such/dir"}),
                               2, ("/no/such/dir",)),
    "pretrained weights cut short": Case(pretrained_cut_short, 2,
                                         ("model.safetensors", "bytes")),
    "from_checkpoint missing": Case(
        run_with(checkpoint={"from_checkpoint": "/no/such/checkpoint_000000004"}), 2,
        ("from_checkpoint", "does not exist"),
    ),
    "from_checkpoint unfinished": Case(from_checkpoint(None), 2,
                                       ("from_checkpoint", "no manifest.json")),
    "from_checkpoint manifest lists nothing": Case(from_checkpoint(GOOD_MANIFEST), 2,
                                                   ("does not list", "trainable.safetensors")),
    "storage is a file": Case(
        lambda e: [(e.tmp / "afile").write_text("x"), "run",
                   e.write(e.spec(checkpoint={"storage": str(e.tmp / "afile")}))][1:],
        2, ("not writable",),
    ),
    "run --progress typo": Case(lambda e: ["run", e.write(e.spec()), "--progress", "fancy"], 2,
                                ("--progress 'fancy'",)),
    # --- the other commands ---
    "demo-dataset camera climbing out": Case(
        lambda e: ["demo-dataset", str(e.tmp / "d"), "--cameras", "../../x"], 2,
        ("camera '../../x'",),
    ),
    "demo-dataset onto a dataset": Case(lambda e: ["demo-dataset", str(e.dataset())], 2,
                                        ("already exists",)),
    "demo-dataset onto a file": Case(onto_file("demo-dataset"), 2, ("is a file",)),
    "demo-dataset format": Case(lambda e: ["demo-dataset", str(e.tmp / "d"), "--format", "v9"],
                                2, ("--format 'v9'",)),
    "checkpoints unknown scheme": Case(lambda e: ["checkpoints", "foo://bar"], 2,
                                       ("unknown URL scheme 'foo://'",)),
    "checkpoints none": Case(lambda e: ["checkpoints", str(e.tmp / "empty")], 1,
                             ("no checkpoints",)),
    "checkpoints manifest omits files": Case(checkpoints_of(GOOD_MANIFEST), 1,
                                             ("INVALID", "does not list")),
    "export onto a file": Case(onto_file("export"), 2, ("is a file",)),
    "export a checkpoint whose manifest lists nothing": Case(
        lambda e: ["export", str(e.fake_checkpoint(GOOD_MANIFEST)), str(e.tmp / "out")], 1,
        ("does not list", "trainable.safetensors"),
    ),
    "export into a checkpoint": Case(
        lambda e: ["export", str(e.fake_checkpoint(None)),
                   str(e.tmp / "runs/old/checkpoint_000000004/pretrained_model")],
        2, ("inside the checkpoint checkpoint_000000004",),
    ),
    "export unknown scheme": Case(lambda e: ["export", "foo://c", str(e.tmp / "out")], 2,
                                  ("unknown URL scheme",)),
    "report onto a file": Case(onto_file("report"), 2, ("is a file",)),
    "report without metrics": Case(lambda e: ["report", str(e.tmp / "runs" / "none"),
                                              "--out", str(e.tmp / "r")], 1,
                                   ("metrics.jsonl does not exist",)),
    "report corrupt metrics line": Case(metrics_file(f"{RECORD}\nnot json\n{RECORD}\n"), 1,
                                        ("metrics.jsonl: line 2",)),
    # --- bounded waits: a dead service fails fast, in one line ---
    "run on a dead cluster address": Case(
        lambda e: ["run", e.write(e.spec()), "--address", "127.0.0.1:9"], 2,
        ("the Ray cluster at 127.0.0.1:9 does not answer",),
    ),
    "run with a dead MLflow": Case(
        run_with(observe={"mlflow_tracking_uri": "http://127.0.0.1:9"}), 2,
        ("MLflow at 127.0.0.1:9 does not answer",),
    ),
    "run with a dead storage endpoint": Case(
        lambda e: ["run", e.write({**e.spec(checkpoint={"storage": "s3://b/runs"}),
                                   "storage_options": {"endpoint_url": "http://127.0.0.1:9"}})],
        2, ("storage endpoint", "127.0.0.1:9 does not answer"),
    ),
    "checkpoints on a dead storage endpoint": Case(
        lambda e: [e.environ.update(SMOLVLA_STORAGE_OPTIONS='{"endpoint_url": '
                                    '"http://127.0.0.1:9"}'),
                   "checkpoints", "s3://b/runs/x"][1:],
        1, ("storage endpoint", "does not answer"),
    ),
    "submit address with a password": Case(
        lambda e: ["submit", e.write(e.spec()), "--address",
                   f"http://me:{SECRET}@127.0.0.1:9"], 1, ("127.0.0.1:9",),
    ),
}  # fmt: skip


def test_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_with_a_clear_message(
    name: str, tmp_path: Path, demo_dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    check(CASES[name], name, Env(tmp_path, demo_dataset), monkeypatch)


# The dataset cases again on a dataset LeRobot 0.6.1 wrote itself (3 episodes: 0..2).
LEROBOT_WRITTEN_CASES = {
    "episodes out of range": Case(run_with(data={"episodes": [0, 3]}), 2,
                                  ("data.episodes", "[3]", "0..2")),
    **{name: CASES[name] for name in ("episodes range out of range", "info.json broken",
                                      "stats.json missing", "data parquet truncated")},
}  # fmt: skip


@pytest.mark.parametrize("name", list(LEROBOT_WRITTEN_CASES))
def test_a_dataset_lerobot_wrote_gone_bad_exits_2(
    name: str, tmp_path: Path, lerobot_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path / "case", lerobot_dataset)
    env.tmp.mkdir()
    check(LEROBOT_WRITTEN_CASES[name], name, env, monkeypatch)


def check(case: Case, name: str, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    tmp_path = env.tmp
    monkeypatch.delenv("SMOLVLA_STORAGE_OPTIONS", raising=False)  # a case may set it
    monkeypatch.setenv(
        "SMOLVLA_RAY_STORAGE_RETRY_S", os.environ.get("SMOLVLA_RAY_STORAGE_RETRY_S", "120")
    )
    args = case.make(env)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, args, env=env.environ)
    output = " ".join(result.output.split())  # the terminal wraps long messages
    assert result.exit_code == case.code, (result.exit_code, output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    for word in case.words:
        assert word in output, (word, output)
    assert SECRET not in output
    assert not ray.is_initialized()
    if args[0] == "run" and case.code == 2:
        assert not (tmp_path / "runs" / "adversarial").exists()  # not even the write probe
    if args[0] in ("validate", "checkpoints", "report") or "onto" in name:
        created = sorted(p.name for p in tmp_path.iterdir())
        assert created == before, (before, created)  # nothing written


def test_yaml_as_users_write_it(tmp_path: Path, demo_dataset) -> None:
    """`feature_cache: off`, unquoted as the docs show it, is `off` (YAML reads false)."""
    from smolvla_ray.spec import load_spec

    path = tmp_path / "spec.yaml"
    for word, expected in [("off", "off"), ("on", "on"), ("auto", "auto")]:
        path.write_text(
            f"name: a\npolicy: {{preset: tiny}}\ndata: {{uri: {demo_dataset}, feature_cache: "
            f"{word}}}\ntrain: {{steps: 2, batch_size: 2}}\ncheckpoint: {{storage: {tmp_path}}}\n"
        )
        assert load_spec(path).data.feature_cache == expected


def test_metrics_tolerate_a_torn_last_line(tmp_path: Path) -> None:
    from smolvla_ray.train.metrics import JsonlSink, read_metrics

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(f'{RECORD}\n{{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(str(run))] == [1]
    sink = JsonlSink(str(run), {})  # a resumed run appends after the complete records
    sink.log({"step": 2, "loss": 0.4})
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2]


def test_secrets_in_urls_are_masked_in_the_public_spec(tmp_path: Path) -> None:
    from smolvla_ray.spec import spec_from_dict

    spec = spec_from_dict(
        {
            "name": "a",
            "policy": {"preset": "tiny"},
            "data": {"uri": "s3://b/d"},
            "train": {"steps": 2, "batch_size": 2},
            "checkpoint": {"storage": "s3://b/runs"},
            "storage_options": {"endpoint_url": f"http://me:{SECRET}@minio:9000"},
        }
    )
    public = json.dumps(spec.public_dict())
    assert SECRET not in public and "http://***@minio:9000" in public


def test_transient_answers_are_retried_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster that has just started answers "No available agent" until its job agent is
    up: `submit` retries that, and only that, within SMOLVLA_RAY_CONNECT_TIMEOUT_S."""
    import time

    from smolvla_ray.waits import retry_transient

    def transient(err: Exception) -> bool:
        return "No available agent" in str(err)

    answers = iter([RuntimeError("500: No available agent to submit job")] * 2 + ["job-1"])

    def call() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry_transient(call, transient=transient, what="submit") == "job-1"
    with pytest.raises(ValueError, match="bad spec"):  # not transient: at once
        retry_transient(lambda: (_ for _ in ()).throw(ValueError("bad spec")),
                        transient=transient, what="submit")  # fmt: skip
    monkeypatch.setenv("SMOLVLA_RAY_CONNECT_TIMEOUT_S", "1.5")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="No available agent"):

        def never() -> str:
            raise RuntimeError("No available agent")

        retry_transient(never, transient=transient, what="submit")
    assert time.monotonic() - start < 3

"""Metric sinks, live progress and the run report after real tiny runs on local disk and on
the loopback S3 server. The sinks live on rank 0 of the trainer, so the runs are in-process
(tests/inprocess.py); live progress is the driver's watcher of metrics.jsonl."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import fsspec
import pytest

from smolvla_ray.observe.progress import MetricsWatcher, Progress
from smolvla_ray.observe.report import FIGURE_DPI, FIGURE_INCHES, write_report
from smolvla_ray.run_layout import TENSORBOARD_DIR, run_uri
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import MLFLOW_CHECKPOINT_TAG, read_metrics, tensorboard_tag
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict

SECRET = "fake-secret-7f3a9c2e51"  # must never reach MLflow, TensorBoard or the report
STEPS, LOG_EVERY = 10, 2


def observed_spec(dataset: str, storage: str, name: str, **sections: Any):
    train = {"steps": STEPS, "log_every": LOG_EVERY}
    scaling = {"num_workers": 1}  # in-process: one worker
    return spec_from_dict(
        tiny_spec_dict(dataset, storage, name, train=train, scaling=scaling, **sections)
    )


def read_scalars(uri: str, storage_options: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `uri`, by tag, as (step, value).

    Event files are TFRecords (length, crc, Event protobuf, crc); tensorboardX ships the
    protobuf classes, so no TensorBoard install is needed to read them."""
    from tensorboardX.proto import event_pb2

    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    names = sorted(p for p in fs.ls(root, detail=False) if "tfevents" in p)
    assert names, f"no event files in {uri}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        data, offset = fs.cat_file(name), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_tensorboard(uri: str, options: dict[str, Any], records: list[dict]) -> None:
    scalars = read_scalars(f"{uri}/{TENSORBOARD_DIR}", options)
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "step_s", "checkpoint_s"):
        steps, values = zip(*scalars[tensorboard_tag(key)], strict=True)
        assert list(steps) == [r["step"] for r in records], key
        assert list(values) == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert not any("fingerprint" in tag for tag in scalars)  # strings are not metrics


def check_report(uri: str, options: dict[str, Any], records: list[dict], out: Path) -> str:
    report = write_report(uri, out, options)
    assert png_size(report.png) == tuple(int(i * FIGURE_DPI) for i in FIGURE_INCHES)
    plotted = report.plotted
    assert plotted.steps == [r["step"] for r in records]
    assert plotted.loss == [r["loss"] for r in records]
    assert plotted.lr == [r["lr"] for r in records]
    assert plotted.samples_per_s == [r["samples_per_s"] for r in records]
    markdown = report.markdown.read_text()
    assert f"{records[-1]['loss']:.4f} at the end" in markdown
    assert "| restarts survived | 0 |" in markdown
    assert f"| {STEPS} |" in markdown and "manifest ok" in markdown  # the final checkpoint
    assert SECRET not in markdown
    # Regenerating gives the same files: the README's picture can be rebuilt.
    again = write_report(uri, out / "again", options)
    assert again.png.read_bytes() == report.png.read_bytes()
    assert again.markdown.read_text() == markdown
    return markdown


def test_local_run_tensorboard_mlflow_progress_report(
    tmp_path: Path, demo_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracking = f"file:{tmp_path / 'mlruns'}"
    observe = {"mlflow_tracking_uri": tracking, "mlflow_experiment": "observe-test"}
    storage = str(tmp_path / "runs")
    # An option the local filesystem ignores; it is a secret (unknown keys are) to be kept out.
    spec = observed_spec(
        demo_dataset, storage, "observed", observe=observe, storage_options={"password": SECRET}
    )
    uri = run_uri(storage, "observed")
    shown = io.StringIO()
    with MetricsWatcher(uri, {}, Progress("json", STEPS, stream=shown), interval_s=0.2):
        train_in_process(spec)

    records = read_metrics(uri)
    assert [r["step"] for r in records] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    check_tensorboard(uri, {}, records)

    # Live progress in JSON mode: one object per record, in order, ending at the last step.
    updates = [json.loads(line) for line in shown.getvalue().splitlines()]
    assert [u["step"] for u in updates] == [r["step"] for r in records]
    assert [u["loss"] for u in updates] == [r["loss"] for r in records]
    assert {u["total_steps"] for u in updates} == {STEPS} and updates[-1]["eta_s"] == 0.0

    # MLflow: params from the public spec (no secret), every metric per step, final checkpoint.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("observe-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "observed" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["name"] == "observed" and params["train.steps"] == str(STEPS)
    assert params["policy.preset"] == "tiny" and params["observe.mlflow_tracking_uri"] == tracking
    assert not any(SECRET in key or SECRET in value for key, value in params.items())
    assert not any("password" in key for key in params)
    for key in ("loss", "lr", "samples_per_s", "comm_bytes"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [r["step"] for r in records], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in records]), key
    final = f"{uri}/checkpoint_{STEPS:09d}"
    assert run.data.tags[MLFLOW_CHECKPOINT_TAG] == final and Path(final).is_dir()

    check_report(uri, {}, records, tmp_path / "report")


def test_s3_run_tensorboard_and_report(
    tmp_path: Path, demo_dataset: str, s3_server, s3_bucket: str
) -> None:
    storage = s3_server.url(s3_bucket, "runs")
    # moto accepts any credentials: a recognisable secret shows any leak.
    options = {**s3_server.storage_options, "secret": SECRET}
    spec = observed_spec(demo_dataset, storage, "observed-s3", storage_options=options)
    train_in_process(spec)

    uri = run_uri(storage, "observed-s3")
    records = read_metrics(uri, options)
    assert [r["step"] for r in records] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    check_tensorboard(uri, options, records)
    markdown = check_report(uri, options, records, tmp_path / "report")
    assert s3_server.endpoint_url in markdown  # public options stay; the secret does not

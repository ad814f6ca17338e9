"""Progress display: parsing rank 0's lines, and every output mode (no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from smolvla_ray.observe.progress import MetricsWatcher, Progress, default_mode
from smolvla_ray.progress_line import format_progress_line, parse_progress_line

LINE = "[smolvla-ray] step 10/60 loss 0.1234 lr 1.00e-04 12.3 samples/s eta 30s"


def test_the_trainer_writes_what_the_parser_reads():
    fields = {"step": 10, "total_steps": 60, "loss": 0.1234, "lr": 1e-4,
              "samples_per_s": 12.3, "eta_s": 30.0}  # fmt: skip
    assert format_progress_line(**fields, checkpoint=False) == LINE
    line = format_progress_line(**fields, checkpoint=True)
    assert parse_progress_line(line) == {**fields, "checkpoint": True}


def test_parse_progress_line_reads_every_field():
    assert parse_progress_line(LINE) == {
        "step": 10,
        "total_steps": 60,
        "loss": 0.1234,
        "lr": 1e-4,
        "samples_per_s": 12.3,
        "eta_s": 30.0,
        "checkpoint": False,
    }


def test_parse_progress_line_after_ray_prefix_and_with_checkpoint():
    line = f"(RayTrainWorker pid=4242) {LINE.replace('10/60', '60/60')} (checkpoint)\n"
    parsed = parse_progress_line(line)
    assert parsed is not None
    assert parsed["step"] == 60 and parsed["checkpoint"] is True


@pytest.mark.parametrize(
    "line",
    [
        "",
        "[smolvla-ray] resuming at step 4 from /tmp/x",
        "[smolvla-ray] 2 worker(s) on cpu; parameters: 1 total",
        "[smolvla-ray] step x/60 loss 0.1 lr 1e-4 1.0 samples/s eta 3s",
        "[smolvla-ray] step 1/60 loss nope lr 1e-4 1.0 samples/s eta 3s",
    ],
)
def test_other_lines_are_not_progress(line: str):
    assert parse_progress_line(line) is None


def test_json_mode_writes_one_parseable_object_per_update():
    out = io.StringIO()
    progress = Progress("json", 60, stream=out)
    progress.update(parse_progress_line(LINE))
    progress.update({"step": 20, "loss": 0.1, "lr": 2e-4, "samples_per_s": 8.0, "step_s": 0.5})
    progress.close()
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert objects == [
        {
            "event": "progress",
            "step": 10,
            "total_steps": 60,
            "loss": 0.1234,
            "lr": 1e-4,
            "samples_per_s": 12.3,
            "eta_s": 30.0,
        },
        {
            "event": "progress",
            "step": 20,
            "total_steps": 60,
            "loss": 0.1,
            "lr": 2e-4,
            "samples_per_s": 8.0,
            "eta_s": 20.0,  # step_s x remaining steps
        },
    ]


def test_lines_mode_is_plain_text():
    out = io.StringIO()
    progress = Progress("lines", stream=out)
    progress.update(parse_progress_line(LINE))
    assert out.getvalue() == (
        "step 10/60 (17%)  loss 0.1234  lr 1.00e-04  12.3 samples/s  eta 0:30\n"
    )


def test_quiet_mode_writes_nothing_and_bar_mode_draws():
    quiet, bar = io.StringIO(), io.StringIO()
    Progress("quiet", 60, stream=quiet).update(parse_progress_line(LINE))
    shown = Progress("bar", 60, stream=bar)
    shown.update(parse_progress_line(LINE))
    shown.close()
    assert quiet.getvalue() == ""
    assert "10/60" in bar.getvalue() and "loss 0.1234" in bar.getvalue()


def test_mode_defaults_and_validation():
    assert default_mode(io.StringIO()) == "lines"  # not a terminal
    with pytest.raises(ValueError, match="progress mode 'fancy'"):
        Progress("fancy")  # type: ignore[arg-type]


def test_watch_metrics_shows_new_records_only(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    old = {"step": 2, "loss": 9.0, "samples_per_s": 1.0, "step_s": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    out = io.StringIO()
    watcher = MetricsWatcher(str(run), None, Progress("json", 6, stream=out), interval_s=0.05)
    watcher.start()
    new = [{"step": s, "loss": 1.0 / s, "samples_per_s": 4.0, "step_s": 0.25} for s in (4, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [old, *new]))
    watcher.stop()
    shown = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [s["step"] for s in shown] == [4, 6]  # the earlier run's record is not shown
    assert [s["eta_s"] for s in shown] == [0.5, 0.0]

"""The shared-storage marker (smolvla_ray/shared_storage.py): what a node that sees the run
directory reads back, and what one that does not (the SMOLVLA_STORAGE_VIEW seam) is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolvla_ray.shared_storage import VIEW_ENV, marker_problem, node_view, write_marker


def test_a_node_that_sees_the_run_directory_reads_the_token_back(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "runs" / "job")
    token = write_marker(run_dir, {})
    assert marker_problem(run_dir, token, {}) is None
    assert "another run's" in marker_problem(run_dir, "0" * 32, {})
    newer = write_marker(run_dir, {})  # a later run of the job: the old token is stale
    assert newer != token and marker_problem(run_dir, newer, {}) is None


def test_a_node_with_another_view_of_the_path_does_not_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = str(tmp_path / "runs")
    token = write_marker(f"{storage}/job", {})
    monkeypatch.setenv(VIEW_ENV, f"{storage}={tmp_path / 'other-disk'}")
    assert node_view(f"{storage}/job") == f"{tmp_path / 'other-disk'}/job"
    assert node_view(f"{storage}-2/job") == f"{storage}-2/job"  # a prefix, not a path: kept
    problem = marker_problem(f"{storage}/job", token, {})
    assert (
        problem
        == f"does not see {storage}/job/.smolvla-shared-storage.json, which the driver wrote"
    )


def test_the_marker_on_s3(s3_server, s3_bucket) -> None:
    run_dir = s3_server.url(s3_bucket, "runs", "job")
    token = write_marker(run_dir, s3_server.storage_options)
    assert marker_problem(run_dir, token, s3_server.storage_options) is None
    other = s3_server.url(s3_bucket, "runs", "other")
    assert "does not see" in marker_problem(other, token, s3_server.storage_options)

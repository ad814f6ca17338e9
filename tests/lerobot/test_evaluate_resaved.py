"""`smolvla-ray evaluate` gives the same numbers on our export of a real-shaped finetune
(renamed cameras, other widths) and on the same weights as LeRobot 0.6.1 saved them itself
(its config.json, its processor pipelines with their rename map).

Runs only where `LEROBOT_PYTHON` names an interpreter with `lerobot[smolvla]==0.6.1`; CI
checks the committed golden instead (tests/unit/policy/test_parity_golden.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lerobot.cases import (
    assert_evaluations_equal,
    evaluate_both,
    run_oracle,
    write_raw_inference_inputs,
)

LEROBOT_PYTHON = os.environ.get("LEROBOT_PYTHON")
pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not LEROBOT_PYTHON, reason="set LEROBOT_PYTHON to a LeRobot 0.6.1 python"),
]


def test_evaluate_equals_on_our_export_and_lerobots_resave(tmp_path: Path) -> None:
    write_raw_inference_inputs(tmp_path)
    run_oracle(LEROBOT_PYTHON, "oracle_resave.py", tmp_path)
    assert (tmp_path / "lerobot_saved" / "policy_preprocessor.json").is_file()
    ours, theirs = evaluate_both(tmp_path, tmp_path / "lerobot_saved")
    assert_evaluations_equal(ours, theirs)

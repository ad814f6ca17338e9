"""LeRobot 0.6.1 loads what a finetune across renamed cameras and other widths exports, and
acts on a raw observation under the dataset's own key names through its own saved
processors, exactly as ours does.

Runs only where `LEROBOT_PYTHON` names an interpreter with `lerobot[smolvla]==0.6.1`; CI
checks the committed golden instead (tests/unit/policy/test_parity_golden.py). The case is
defined once, in `cases.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lerobot.cases import (
    assert_raw_inference_like_lerobot,
    run_oracle,
    write_raw_inference_inputs,
)

LEROBOT_PYTHON = os.environ.get("LEROBOT_PYTHON")
pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not LEROBOT_PYTHON, reason="set LEROBOT_PYTHON to a LeRobot 0.6.1 python"),
]


def test_lerobot_acts_on_raw_dataset_keys_like_ours(tmp_path: Path) -> None:
    write_raw_inference_inputs(tmp_path)
    theirs = run_oracle(LEROBOT_PYTHON, "oracle_raw_inference.py", tmp_path)
    assert_raw_inference_like_lerobot(tmp_path, theirs, theirs)

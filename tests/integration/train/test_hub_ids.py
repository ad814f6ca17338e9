"""Hub ids end to end on a real local Ray: the base policy comes from a (loopback) Hub into an
empty Hugging Face cache, the dataset from the cache, two workers plus a restart fetch the
base once per node, checkpoints record the pinned commit, and resuming onto another commit is
refused naming both.

The driver runs in a subprocess whose environment (HF_HOME, HF_ENDPOINT) its Ray workers
inherit; this process's own embedded Ray is not used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.hub import FakeHub, blob_id, commit_of, iter_lines, read_tree, write_cached_repo
from tests.integration.conftest import tiny_spec_dict

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
MAIN, V2, DATA = commit_of("tiny main"), commit_of("tiny v2"), commit_of("demo main")

DRIVER = """
import json, sys
import ray
from smolvla_ray import driver
from smolvla_ray.checkpoint.discovery import list_checkpoints
from smolvla_ray.checkpoint.export import policy_from_checkpoint
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.run_layout import run_uri

base = json.loads(sys.argv[1])

def spec(steps, **policy):
    return spec_from_dict({**base, "train": {**base["train"], "steps": steps},
                           "policy": {**base["policy"], **policy}})

driver.start_ray("local", num_cpus=4, log_to_driver=False)
out = {"first": driver.run(spec(2)).metrics["step"]}
out["resumed_from"] = driver.run(spec(3)).metrics["resumed_from_step"]  # the restart
last = list_checkpoints(run_uri(base["checkpoint"]["storage"], base["name"]))[-1]
policy_from_checkpoint(last.uri)  # export rebuilds the base from the recorded commit
out["checkpoint"] = last.uri
try:
    driver.run(spec(4, revision="v2"))
    out["refused"] = None
except Exception as err:
    out["refused"] = str(err)
print("RESULT " + json.dumps(out))
"""


def pretrained_files(dataset: str, directory: Path, seed: int) -> dict[str, bytes]:
    """A tiny pretrained_model/ whose features fit `dataset` (random weights from `seed`)."""
    from smolvla_ray.build import build_policy
    from smolvla_ray.data.meta import load_meta
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.spec import spec_from_dict

    spec = spec_from_dict(
        tiny_spec_dict(dataset, directory / "unused", "base", train={"seed": seed})
    )
    policy = build_policy(RunSettings.from_spec(spec), load_meta(dataset), storage_options={})
    policy.save_pretrained(str(directory))
    return read_tree(directory)


def test_two_workers_and_a_restart_fetch_the_base_once_per_node(
    tmp_path: Path, demo_dataset: str
) -> None:
    cache, log = tmp_path / "hf" / "hub", tmp_path / "fetches.log"
    data = read_tree(demo_dataset)
    write_cached_repo(cache, "me/demo", data, commit=DATA, repo_type="dataset")
    spec = tiny_spec_dict("me/demo", tmp_path / "runs", "hub", failure={"max_failures": 0})
    spec["policy"] = {"pretrained": "me/tiny"}
    with FakeHub() as server:
        server.add("me/tiny", pretrained_files(demo_dataset, tmp_path / "a", 0), commit=MAIN)
        server.add(
            "me/tiny", pretrained_files(demo_dataset, tmp_path / "b", 1), commit=V2, refs=("v2",)
        )
        server.add("me/demo", data, commit=DATA, repo_type="dataset")
        env = {
            **os.environ,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": server.url,
            "SMOLVLA_RAY_HUB_FETCH_LOG": str(log),
            "PYTHONPATH": str(REPO),
        }
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(spec)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert (out["first"], out["resumed_from"]) == (2, 2)

    # Driver, two workers, the resumed run and the export: each blob of the base once
    # (files with equal content share a blob, which huggingface_hub downloads once).
    fetched = Counter(f for repo, commit, f in server.downloads if commit == MAIN)
    files = read_tree(tmp_path / "a")
    assert set(fetched.values()) == {1}
    assert len(fetched) == len({blob_id(name, content) for name, content in files.items()})
    assert not [k for k in server.downloads if k[0] == "me/demo"]  # read from the cache
    ours = Counter(line.split()[3] for line in iter_lines(log) if f" {MAIN} " in line)
    assert ours == Counter({"config.json": 1, "snapshot": 1})  # preflight, then a worker

    state = json.loads((Path(out["checkpoint"]) / "state.json").read_text())
    assert state["base"]["uri"] == "me/tiny"
    assert state["base"]["commit"] == state["base"]["revision"] == MAIN  # pinned by the run
    assert out["refused"] is not None
    assert "policy.revision" in out["refused"]  # the resume-change table refuses it
    assert MAIN in out["refused"] and V2 in out["refused"]  # naming both commits

"""Faults on a real two-node Ray cluster (head + `ray start --address` node on this machine)
with checkpoints on the loopback S3 server: placement across nodes, storage outages (short
and for good), a SIGKILLed worker, a SIGTERMed worker, a Ray preemption notice, a lost node.

The module shares one cluster (tests/integration/faults/conftest.py): killed workers leave
it healthy; the preemption and lost-node tests, last, mark its second node spent, and a
later test would get a fresh one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.run_layout import run_uri
from tests.integration.conftest import tiny_spec_dict
from tests.integration.faults.conftest import (
    RAY,
    StorageGate,
    TwoNodeCluster,
    start_driver,
    storage_options,
    wait_for,
)

pytestmark = pytest.mark.slow

# Two workers, one per node: STRICT_SPREAD cannot put both on one node.
SCALING = {
    "num_workers": 2,
    "resources_per_worker": {"CPU": 1},
    "placement_strategy": "STRICT_SPREAD",
}
TRAIN = {"log_every": 1, "scheduler": {"warmup_steps": 1, "decay_steps": 8}}
# Steps take ~50 ms here: runs that a fault must hit mid-way get this many, checkpointing
# every EVERY steps.
LONG, EVERY = 300, 20


def fault_spec(dataset: str, storage: str, name: str, options: dict, *, steps: int, **extra):
    checkpoint = {
        "storage": storage,
        "every_steps": 2 if steps < LONG else EVERY,
        "keep_last": 20,
        **extra.pop("checkpoint", {}),
    }
    failure = {"max_failures": 0, "resource_wait_s": 30, **extra.pop("failure", {})}
    # Long runs report every 10 steps: Ray's per-report logging would otherwise dominate.
    log_every = {"log_every": 1 if steps < LONG else 10}
    train = {**TRAIN, **log_every, "steps": steps, **extra.pop("train", {})}
    return tiny_spec_dict(
        dataset, storage, name, train=train, scaling=SCALING, checkpoint=checkpoint,
        failure=failure, storage_options=options, **extra,
    )  # fmt: skip


def steps_of(storage: str, name: str, options: dict, *, valid: bool = True) -> list[int]:
    infos = list_checkpoints(run_uri(storage, name), options)
    return [i.step for i in infos if i.valid == valid]


def trainable_at(storage: str, name: str, step: int, options: dict) -> dict[str, torch.Tensor]:
    (info,) = [i for i in list_checkpoints(run_uri(storage, name), options) if i.step == step]
    with tempfile.TemporaryDirectory() as tmp:
        return load_file(
            str(fetch_checkpoint(info.uri, Path(tmp), options) / "trainable.safetensors")
        )


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def watch_worker_nodes(cluster: TwoNodeCluster, stop: threading.Event) -> dict[str, set[int]]:
    """Collect, in the background, the Ray Train worker pids seen on each node."""
    seen: dict[str, set[int]] = {"node_a": set(), "node_b": set()}

    def poll() -> None:
        while not stop.wait(0.5):
            for node, pids in cluster.train_worker_pids().items():
                seen[node] |= pids

    threading.Thread(target=poll, daemon=True).start()
    return seen


@pytest.fixture
def s3_storage(s3_server, s3_bucket) -> tuple[str, dict]:
    return s3_server.url(s3_bucket, "runs"), s3_server.storage_options


# --- storage outages: the S3 endpoint the job sees is a gate in front of the server ---


def _gated_storage(s3_server, bucket: str, gate: StorageGate) -> tuple[str, dict]:
    options = storage_options(gate.endpoint)
    options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
    return s3_server.url(bucket, "runs"), options


def test_short_storage_outage_during_upload_is_ridden_out(
    cluster: TwoNodeCluster, demo_dataset: str, s3_server, s3_bucket, storage_gate, tmp_path
) -> None:
    storage, options = _gated_storage(s3_server, s3_bucket, storage_gate)
    spec = fault_spec(
        demo_dataset, storage, "blip", options, steps=4, checkpoint={"upload_mode": "sync"}
    )
    # Down for 3 s when the step-2 checkpoint's manifest (the last file) is being uploaded.
    storage_gate.trigger(r"PUT /[^ ]*checkpoint_000000002/manifest\.json", outage_s=3)
    run = start_driver(cluster, spec, tmp_path)
    assert run.wait(300) == 0, run.output()[-4000:]
    assert storage_gate.triggered.is_set()
    assert steps_of(storage, "blip", options) == [2, 4]


def test_storage_gone_for_good_fails_clearly_and_lists_no_invalid_checkpoint(
    cluster: TwoNodeCluster, demo_dataset: str, s3_server, s3_bucket, storage_gate, tmp_path
) -> None:
    storage, options = _gated_storage(s3_server, s3_bucket, storage_gate)
    # sync: rank 0 waits on this upload, so the upload's error is the one the run fails
    # with (async, training goes on and whatever touches storage next fails first).
    spec = fault_spec(
        demo_dataset, storage, "outage", options, steps=4, checkpoint={"upload_mode": "sync"}
    )
    storage_gate.trigger(r"PUT /[^ ]*checkpoint_000000002/manifest\.json", outage_s=None)
    run = start_driver(cluster, spec, tmp_path)
    assert run.wait(300) != 0
    output = run.output()
    assert "storage unavailable: upload of" in output and "manifest.json" in output, output[-4000:]
    storage_gate.up()
    # Every data file of step 2 landed, its manifest did not: listed, never as valid.
    infos = list_checkpoints(run_uri(storage, "outage"), options)
    assert [(i.step, i.valid) for i in infos] == [(2, False)], infos
    assert "no manifest.json" in infos[0].problem


# --- killed workers, then the second node drained and lost (the last two tests) ---


def test_spread_across_two_nodes_and_a_sigkilled_worker_resumes_to_the_same_parameters(
    cluster: TwoNodeCluster, demo_dataset: str, s3_storage, tmp_path: Path
) -> None:
    storage, options = s3_storage
    # The reference: an undisturbed run, one training worker on each node, to the end.
    stop = threading.Event()
    seen = watch_worker_nodes(cluster, stop)
    reference = start_driver(
        cluster,
        fault_spec(demo_dataset, storage, "straight", options, steps=LONG),
        tmp_path,
        name="ref",
    )
    code = reference.wait(300)
    stop.set()
    assert code == 0, reference.output()[-4000:]
    assert "2 worker(s) on cpu" in reference.output()
    assert seen["node_a"] and seen["node_b"], seen
    assert steps_of(storage, "straight", options) == list(range(EVERY, LONG + 1, EVERY))

    spec = fault_spec(
        demo_dataset, storage, "killed", options, steps=LONG, failure={"max_failures": 1}
    )
    run = start_driver(cluster, spec, tmp_path)
    # The first checkpoint's report line: cheap to watch (steps are fast here).
    wait_for(lambda: "(checkpoint)" in run.output(), timeout_s=240, what="a checkpoint", run=run)
    (victim,) = cluster.second.train_worker_pids()
    os.kill(victim, signal.SIGKILL)
    assert run.wait(300) == 0, run.output()[-4000:]
    output = run.output()
    assert "resuming at step" in output, output[-4000:]
    assert steps_of(storage, "killed", options)[-1] == LONG
    assert_same(
        trainable_at(storage, "killed", LONG, options),
        trainable_at(storage, "straight", LONG, options),
    )


def _step_reached(run, step: int) -> bool:
    return f"step {step}/" in run.output()


def test_sigterm_to_a_worker_checkpoints_the_current_step(
    cluster: TwoNodeCluster, demo_dataset: str, s3_storage, tmp_path: Path
) -> None:
    storage, options = s3_storage
    spec = fault_spec(
        demo_dataset, storage, "sigterm", options, steps=LONG,
        checkpoint={"every_steps": None}, failure={"max_failures": 1},
    )  # fmt: skip
    run = start_driver(cluster, spec, tmp_path)
    wait_for(lambda: _step_reached(run, 10), timeout_s=240, what="step 10", run=run)
    (victim,) = cluster.second.train_worker_pids()
    os.kill(victim, signal.SIGTERM)
    assert run.wait(300) == 0, run.output()[-4000:]
    output = run.output()
    saved = steps_of(storage, "sigterm", options)
    # A checkpoint at the step the signal arrived (not at every_steps), then the end.
    assert len(saved) == 2 and saved[0] < LONG and saved[-1] == LONG, (saved, output[-4000:])
    assert "received SIGTERM" in output
    assert f"resuming at step {saved[0]}" in output, output[-4000:]
    assert not Path(f"/proc/{victim}").exists()  # the signalled worker exited


def test_preemption_notice_saves_a_checkpoint_and_training_goes_on(
    cluster: TwoNodeCluster, demo_dataset: str, s3_storage, tmp_path: Path
) -> None:
    storage, options = s3_storage
    spec = fault_spec(
        demo_dataset, storage, "preempt", options, steps=LONG, checkpoint={"every_steps": None}
    )
    run = start_driver(cluster, spec, tmp_path)
    wait_for(lambda: _step_reached(run, 10), timeout_s=240, what="step 10", run=run)
    node_id = cluster.second.node_id()
    cluster.second_spent = True  # drained: no new work is placed on it
    subprocess.run(
        [
            str(RAY), "drain-node", "--address", cluster.address, "--node-id", node_id,
            "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
            "--deadline-remaining-seconds", "3600",
        ],
        env=cluster.env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert run.wait(300) == 0, run.output()[-4000:]
    saved = steps_of(storage, "preempt", options)
    assert len(saved) == 2 and saved[0] < LONG and saved[-1] == LONG, (saved, run.output()[-4000:])


def test_lost_node_without_spare_resources_fails_clearly(
    cluster: TwoNodeCluster, demo_dataset: str, s3_storage, tmp_path: Path
) -> None:
    storage, options = s3_storage
    spec = fault_spec(
        demo_dataset, storage, "nodeloss", options, steps=LONG,
        failure={"max_failures": 2, "resource_wait_s": 5},
    )  # fmt: skip
    run = start_driver(cluster, spec, tmp_path)
    # The first checkpoint's report line: cheap to watch (steps are fast here).
    wait_for(lambda: "(checkpoint)" in run.output(), timeout_s=240, what="a checkpoint", run=run)
    cluster.second_spent = True
    cluster.second.stop()
    assert run.wait(300) != 0
    output = run.output()
    assert "did not grant the workers' resources within failure.resource_wait_s=5s" in output, (
        output[-4000:]
    )
    assert "STRICT_SPREAD" in output
    # The node may die during an asynchronous upload: that checkpoint stays unfinished (and
    # is never resumed from), but the ones before it verify.
    infos = list_checkpoints(run_uri(storage, "nodeloss"), options)
    assert any(i.valid for i in infos), infos

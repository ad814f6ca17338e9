"""Faults on a real two-node Ray cluster (head + `ray start --address` node on this machine)
with checkpoints on the loopback S3 server: storage outages (short, then for good),
placement across nodes, a SIGTERMed and then a SIGKILLed worker, a Ray preemption notice, a
lost node.

A node that does not share the run's local storage is refused before step 1 (through
the SMOLVLA_STORAGE_VIEW seam of smolvla_ray/shared_storage.py).

The module shares one cluster (tests/integration/faults/conftest.py): signalled workers
leave it healthy; the preemption and lost-node tests, last, mark its second node spent (a
later test would get a fresh one). Faults are timed by the run's metrics.jsonl and
checkpoints in storage, not by its forwarded log lines, which can lag on a busy machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.run_layout import run_uri
from smolvla_ray.train.metrics import read_metrics
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
# Steps take ~50-70 ms here: runs that a fault must hit mid-way get this many, checkpointing
# every EVERY steps (unless a test asks for none but the final one).
LONG, EVERY = 200, 20


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


def fresh(options: dict) -> dict:
    """`options` with s3fs's listing cache off: tests poll storage while a run writes it."""
    return {**options, "use_listings_cache": False}


def steps_of(storage: str, name: str, options: dict, *, valid: bool = True) -> list[int]:
    infos = list_checkpoints(run_uri(storage, name), fresh(options))
    return [i.step for i in infos if i.valid == valid]


def trainable_at(storage: str, name: str, step: int, options: dict) -> dict[str, torch.Tensor]:
    infos = list_checkpoints(run_uri(storage, name), fresh(options))
    (info,) = [i for i in infos if i.step == step]
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


def records(storage: str, name: str, options: dict) -> list[dict]:
    """The run's metrics.jsonl so far (rank 0 writes it at every report)."""
    try:
        return read_metrics(run_uri(storage, name), fresh(options))
    except FileNotFoundError:
        return []


def reached(storage: str, name: str, options: dict, step: int, *, resumed_from: int = 0):
    """The newest record if it is at `step` or later (of a run resumed from `resumed_from`)."""
    logged = records(storage, name, options)
    if logged and logged[-1]["step"] >= step and logged[-1]["resumed_from_step"] == resumed_from:
        return logged[-1]
    return None


@pytest.fixture
def s3_storage(s3_server, s3_bucket) -> tuple[str, dict]:
    return s3_server.url(s3_bucket, "runs"), s3_server.storage_options


# --- storage outages: the S3 endpoint the job sees is a gate in front of the server ---


def _gated_storage(s3_server, bucket: str, gate: StorageGate) -> tuple[str, dict]:
    options = storage_options(gate.endpoint)
    options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
    return s3_server.url(bucket, "runs"), options


def test_short_storage_outage_is_ridden_out_and_storage_gone_for_good_fails_clearly(
    cluster: TwoNodeCluster, demo_dataset: str, s3_server, s3_bucket, storage_gate, tmp_path
) -> None:
    storage, options = _gated_storage(s3_server, s3_bucket, storage_gate)
    # sync: rank 0 waits on each upload, so an upload's error is the one the run fails with
    # (async, training goes on and whatever touches storage next fails first). The cluster
    # retries storage for 8 s (SMOLVLA_RAY_STORAGE_RETRY_S).
    spec = fault_spec(
        demo_dataset, storage, "outage", options, steps=4, checkpoint={"upload_mode": "sync"}
    )
    # Down for 3 s when the step-2 checkpoint's manifest (the last file) is being uploaded...
    storage_gate.trigger(r"PUT /[^ ]*checkpoint_000000002/manifest\.json", outage_s=3)
    run = start_driver(cluster, spec, tmp_path)
    wait_for(storage_gate.triggered.is_set, timeout_s=240, what="the step-2 manifest", run=run)
    # ... and for good when the step-4 one is (armed while the first outage lasts).
    storage_gate.trigger(r"PUT /[^ ]*checkpoint_000000004/manifest\.json", outage_s=None)
    assert run.wait(300) != 0
    output = run.output()
    assert storage_gate.triggered.is_set(), output[-4000:]
    # Our upload names the file it gave up on; on a loaded machine Ray Train's controller can
    # fail first, on its own run state, and Ray's message names that file's URL instead.
    ours = "storage unavailable: upload of" in output and "manifest.json" in output
    rays = "Could not connect to the endpoint URL" in output and "/runs/outage/" in output
    assert ours or rays, output[-4000:]
    storage_gate.up()
    # Step 2 rode out its outage and verifies; training went on. Every data file of step 4
    # landed, its manifest did not: listed, never as valid.
    infos = list_checkpoints(run_uri(storage, "outage"), options)
    assert [(i.step, i.valid) for i in infos] == [(2, True), (4, False)], infos
    assert "no manifest.json" in infos[1].problem


# --- signalled workers, then the second node drained and lost (the last two tests) ---


def test_sigterm_then_sigkill_to_a_worker_resume_to_the_same_parameters(
    cluster: TwoNodeCluster, demo_dataset: str, s3_storage, tmp_path: Path
) -> None:
    storage, options = s3_storage
    # Checkpoints at the end only, unless a fault makes one.
    checkpoint = {"every_steps": None}
    # The reference: an undisturbed run to the end, one training worker on each node
    # (STRICT_SPREAD across the two nodes).
    stop = threading.Event()
    seen = watch_worker_nodes(cluster, stop)
    reference = start_driver(
        cluster,
        fault_spec(
            demo_dataset,
            storage,
            "straight",
            options,
            steps=LONG,
            checkpoint=checkpoint,
            failure={"collective_timeout_s": 900},
        ),
        tmp_path,
        name="ref",
    )
    code = reference.wait(300)
    stop.set()
    assert code == 0, reference.output()[-4000:]
    assert "2 worker(s) on cpu" in reference.output()
    assert "; collective timeout 900 s" in reference.output()  # the setting reached gloo
    assert seen["node_a"] and seen["node_b"], seen
    assert steps_of(storage, "straight", options) == [LONG]

    spec = fault_spec(
        demo_dataset, storage, "faulted", options, steps=LONG, checkpoint=checkpoint,
        failure={"max_failures": 2},
    )  # fmt: skip
    run = start_driver(cluster, spec, tmp_path)
    # SIGTERM (a pod deleted): the step in progress finishes, a checkpoint at that step is
    # uploaded, the worker exits, the group restarts from that checkpoint.
    wait_for(lambda: reached(storage, "faulted", options, 10), timeout_s=240, what="step 10",
             run=run)  # fmt: skip
    (terminated,) = cluster.second.train_worker_pids()
    os.kill(terminated, signal.SIGTERM)
    resumed = wait_for(
        lambda: next((r for r in records(storage, "faulted", options) if r["resumed_from_step"]),
                     None),
        timeout_s=240, what="the restart after SIGTERM", run=run,
    )  # fmt: skip
    at = resumed["resumed_from_step"]
    assert steps_of(storage, "faulted", options) == [at] and at < LONG  # not at every_steps
    # SIGKILL (OOM) a worker of the restarted group: it restarts again from the newest
    # checkpoint that verifies, the same one.
    wait_for(lambda: reached(storage, "faulted", options, at + 10, resumed_from=at),
             timeout_s=240, what=f"step {at + 10} after the restart", run=run)  # fmt: skip
    (killed,) = cluster.second.train_worker_pids()
    killed_at = time.time()
    os.kill(killed, signal.SIGKILL)
    assert run.wait(300) == 0, run.output()[-4000:]
    output = run.output()
    assert "received SIGTERM" in output, output[-4000:]
    assert not Path(f"/proc/{terminated}").exists()  # the signalled worker exited
    assert f"resuming at step {at}" in output, output[-4000:]
    assert steps_of(storage, "faulted", options) == [at, LONG]
    # Every record past the checkpoint was logged again after the SIGKILL: a second restart.
    assert all(r["time"] > killed_at for r in records(storage, "faulted", options)
               if r["step"] > at)  # fmt: skip
    assert_same(
        trainable_at(storage, "faulted", LONG, options),
        trainable_at(storage, "straight", LONG, options),
    )


def test_preemption_notice_saves_a_checkpoint_and_training_goes_on(
    cluster: TwoNodeCluster, demo_dataset: str, s3_storage, tmp_path: Path
) -> None:
    storage, options = s3_storage
    spec = fault_spec(
        demo_dataset, storage, "preempt", options, steps=LONG, checkpoint={"every_steps": None}
    )
    run = start_driver(cluster, spec, tmp_path)
    wait_for(lambda: reached(storage, "preempt", options, 10), timeout_s=240, what="step 10",
             run=run)  # fmt: skip
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
    wait_for(lambda: steps_of(storage, "nodeloss", options), timeout_s=240,
             what="a checkpoint", run=run)  # fmt: skip
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


def test_local_storage_a_node_does_not_share_is_refused_before_step_1(
    cluster: TwoNodeCluster, demo_dataset: str, tmp_path: Path
) -> None:
    # The run's storage is a local path; the second node sees another disk there (the seam).
    storage = str(tmp_path / "runs")
    cluster.replace_second({"SMOLVLA_STORAGE_VIEW": f"{storage}={tmp_path / 'other-disk'}"})
    cluster.second_spent = True  # a later test gets a node with the common view
    spec = fault_spec(demo_dataset, storage, "unshared", {}, steps=4)
    run = start_driver(cluster, spec, tmp_path)
    assert run.wait(240) == 2, run.output()[-4000:]
    output = run.output()
    assert f"checkpoint.storage={storage!r} is not shared by the cluster's nodes" in output
    assert "does not see" in output and ".smolvla-shared-storage.json" in output, output[-3000:]
    assert "Started training worker group" not in output  # refused before any worker
    run_dir = tmp_path / "runs" / "unshared"
    assert not list(run_dir.glob("checkpoint_*")) and not (run_dir / "metrics.jsonl").exists()

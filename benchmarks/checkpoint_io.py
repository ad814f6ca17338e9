"""Checkpoint size and cost: bytes, local write and upload seconds, and training time blocked
on checkpoints with async vs sync upload.

Part 1 (tiny and base presets, no Ray): the checkpoint of a policy after one AdamW step,
written locally and uploaded to an S3-compatible server (moto on loopback, started here),
against the size LeRobot's own checkpoint would have (all weights + the same moments).
Part 2 (tiny, real Ray Train runs to that S3 server): the share of wall time a run spends
blocked on checkpoints when every step checkpoints, with `upload_mode: async` and `sync`.

    .venv/bin/python benchmarks/checkpoint_io.py [--presets tiny,base]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fsspec
import torch

from smolvla_ray.checkpoint.format import TrainingState, optimizer_tensors, write_checkpoint
from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy


def start_moto() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    fs = fsspec.filesystem("s3", **options)
    fs.call_s3("create_bucket", Bucket="bench")
    return proc, options


def checkpoint_cost(preset: str, options: dict) -> dict:
    config = PolicyConfig.preset(preset).with_features(  # type: ignore[arg-type]
        state_dim=6, action_dim=6, cameras={"top": (3, 96, 128)}
    )
    policy = SmolVLAPolicy(config)
    named = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(list(named.values()), lr=1e-4)
    for p in named.values():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    names = list(named)
    moments, groups = optimizer_tensors(optimizer, names)
    state = TrainingState(
        step=1,
        epoch=0,
        cursors=[{}],
        param_names=names,
        param_groups=groups,
        scheduler={},
        spec={},
        policy_config={},
        base={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_checkpoint(
            Path(tmp),
            trainable=named,
            optimizer=moments,
            rng_states=[torch.get_rng_state()],
            state=state,
        )
        write_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        fs = fsspec.filesystem("s3", **options)
        start = time.perf_counter()
        fs.put(tmp + "/", f"bench/{preset}/", recursive=True)
        upload_s = time.perf_counter() - start
    all_weights = sum(p.numel() * 4 for p in policy.parameters())
    moment_bytes = sum(v.numel() * v.element_size() for v in moments.values())
    return {
        "checkpoint_bytes": size,
        "lerobot_checkpoint_bytes": all_weights + moment_bytes,
        "ratio_to_lerobot": size / (all_weights + moment_bytes),
        "write_s": write_s,
        "upload_s_loopback_s3": upload_s,
    }


def blocked_share(mode: str, options: dict, dataset: str, root: Path) -> dict:
    from smolvla_ray import driver
    from smolvla_ray.run_layout import run_uri
    from smolvla_ray.spec import spec_from_dict
    from smolvla_ray.train.metrics import read_metrics

    storage = f"s3://bench/runs-{mode}"
    spec = spec_from_dict(
        {
            "name": f"ckpt-{mode}",
            "policy": {"preset": "tiny"},
            "data": {"uri": dataset, "num_loader_workers": 0},
            "train": {"steps": 12, "batch_size": 4, "log_every": 1},
            "scaling": {"num_workers": 2},
            "checkpoint": {
                "storage": storage,
                "every_steps": 2,
                "keep_last": 2,
                "upload_mode": mode,
            },
            "storage_options": options,
        }
    )
    start = time.perf_counter()
    driver.run(spec)
    wall = time.perf_counter() - start
    records = read_metrics(run_uri(storage, spec.name), options)
    # report_s is logged one record late; at a checkpoint step it covers the upload in sync
    # mode. Subtract the plain report barrier measured at steps without a checkpoint.
    after_ckpt = [r["report_s"] for r in records[1:] if (r["step"] - 1) % 2 == 0]
    after_plain = [r["report_s"] for r in records[1:] if (r["step"] - 1) % 2 == 1]
    barrier = sum(after_plain) / max(len(after_plain), 1)
    blocked = sum(r["checkpoint_s"] for r in records) + sum(
        max(0.0, s - barrier) for s in after_ckpt
    )
    train_time = sum(r["step_s"] for r in records)
    return {
        "blocked_s": blocked,
        "train_s": train_time,
        "wall_s": wall,
        "blocked_share": blocked / (train_time + blocked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    args = parser.parse_args()
    proc, options = start_moto()
    try:
        sizes = {p: checkpoint_cost(p, options) for p in args.presets.split(",")}
        import ray

        from smolvla_ray.data.synthetic import write_demo_dataset

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            dataset = write_demo_dataset(str(Path(tmp) / "ds"), num_episodes=4)
            blocking = {m: blocked_share(m, options, dataset, Path(tmp)) for m in ("async", "sync")}
    finally:
        proc.terminate()
    print(
        json.dumps(
            {
                "benchmark": "checkpoint_io",
                "checkpoint": sizes,
                "tiny_training_blocked_on_checkpoints": blocking,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Ray Train step breakdown, communication bytes, scaling 1 -> 2 workers, peak memory.

Runs short real finetunes (embedded Ray, gloo on CPU; NCCL on GPU with --gpu) on a synthetic
dataset and prints one JSON object per preset: the mean step time split into data wait /
forward / backward / optimizer, all-reduced bytes per step (and the trainable gradient
bytes they should equal), samples/s with 1 and 2 workers and the scaling efficiency
`throughput(2) / (2 x throughput(1))`, and peak memory per worker.

    .venv/bin/python benchmarks/train_step.py [--presets tiny,base] [--steps 12] [--gpu]

On a 2-core CPU machine two workers share the cores, so the CPU efficiency measures
contention as much as communication; the GPU numbers are the meaningful scaling figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ray

from smolvla_ray import driver
from smolvla_ray.data.synthetic import write_demo_dataset
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics

PHASES = ["step_s", "data_wait_s", "forward_s", "backward_s", "optimizer_s"]


def run_once(
    preset: str,
    workers: int,
    steps: int,
    batch: int,
    dataset: str,
    root: Path,
    gpu: bool,
    feature_cache: str,
) -> dict:
    name = f"{preset}-{workers}w"
    spec = spec_from_dict(
        {
            "name": name,
            "policy": {"preset": preset},
            "data": {"uri": dataset, "num_loader_workers": 1, "feature_cache": feature_cache},
            "train": {"steps": steps, "batch_size": batch, "log_every": 1},
            "scaling": {"num_workers": workers, "use_gpu": gpu},
            "checkpoint": {"storage": str(root), "every_steps": None},
        }
    )
    driver.run(spec)
    records = read_metrics(run_uri(str(root), name))[2:]  # the first steps warm up
    out = {k: statistics.mean(r[k] for r in records) for k in PHASES}
    out["samples_per_s"] = statistics.mean(r["samples_per_s"] for r in records)
    out["comm_bytes_per_step"] = records[-1]["comm_bytes"]
    out["peak_memory_mb_rank0"] = max(r["peak_memory_mb"] for r in records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument(
        "--feature-cache",
        default="off",
        choices=["auto", "on", "off"],
        help="off (default) times the video path; the cache has its own benchmark",
    )
    args = parser.parse_args()
    batches = {"tiny": 8, "base": 2}
    ray.init(
        address="local",
        num_cpus=4 if not args.gpu else None,
        include_dashboard=False,
        log_to_driver=False,
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = write_demo_dataset(str(root / "dataset"), num_episodes=4, episode_length=60)
        for preset in args.presets.split(","):
            steps = args.steps if preset == "tiny" else max(4, args.steps // 3)
            common = (steps, batches[preset], dataset, root, args.gpu, args.feature_cache)
            one = run_once(preset, 1, *common)
            two = run_once(preset, 2, *common)
            results[preset] = {
                "batch_per_worker": batches[preset],
                "one_worker": one,
                "two_workers": two,
                "scaling_efficiency": two["samples_per_s"] / (2 * one["samples_per_s"]),
            }
    print(
        json.dumps(
            {"benchmark": "train_step", "device": "gpu" if args.gpu else "cpu", "results": results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Ray Train step breakdown, communication bytes, weak and strong scaling, peak memory.

Runs short real finetunes through `driver.run` (a private local Ray, or the cluster named by
`--address`; gloo on CPU, NCCL with `--device cuda`) on a synthetic video dataset with
cameras of `--camera` size (480x640, a real robot's, by default) and prints one JSON object:
per preset and worker count, the mean step time split into data wait / forward / backward /
optimizer (the first `--warmup` steps left out), the data-wait share of the step, the
all-reduced bytes per step, samples/s and peak memory of rank 0; and the scaling efficiency:

- weak (the batch per worker fixed): samples/s(N) / (N x samples/s(1));
- strong (the global batch of the largest N fixed, split across N): step time(1) /
  (N x step time(N)).

    .venv/bin/python benchmarks/train_step.py [--presets tiny,base] [--workers 1,2]
        [--steps 12] [--device cpu|cuda] [--address HOST:6379] [--camera 480x640]

DDP overlaps the gradient all-reduce with the backward pass, so the step's split cannot show
it; `allreduce_s` is measured apart, per worker count: a Ray Train job of N workers (the same
backend) all-reducing a buffer of the step's all-reduced bytes, the median of 10 after 2 of
warm-up. What DDP fails to hide of it shows as backward(N) - backward(1). On a 2-core CPU
machine workers share the cores, so the CPU efficiency measures contention as much as
communication; GPUs give the real figure.
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
BATCH_PER_WORKER = {"tiny": 8, "base": 2}


def run_once(
    preset: str, workers: int, batch: int, args: argparse.Namespace, dataset: str, root: Path
) -> dict:
    name = f"{preset}-{workers}w-b{batch}"
    spec = spec_from_dict(
        {
            "name": name,
            "policy": {"preset": preset},
            "data": {"uri": dataset, "num_loader_workers": 1, "feature_cache": args.feature_cache},
            "train": {"steps": args.steps, "batch_size": batch, "log_every": 1},
            "scaling": {"num_workers": workers, "use_gpu": args.device == "cuda"},
            "checkpoint": {"storage": str(root), "every_steps": None},
            "observe": {"tensorboard": False},
        }
    )
    driver.run(spec, address=args.address)
    records = [r for r in read_metrics(run_uri(str(root), name)) if r["step"] > args.warmup]
    out = {k: statistics.mean(r[k] for r in records) for k in PHASES}
    out["data_wait_share"] = out["data_wait_s"] / out["step_s"]
    out["samples_per_s"] = statistics.mean(r["samples_per_s"] for r in records)
    out["comm_bytes_per_step"] = records[-1]["comm_bytes"]
    out["peak_memory_mb_rank0"] = max(r["peak_memory_mb"] for r in records)
    out["batch_per_worker"] = batch
    return out


def _allreduce_loop(config: dict) -> None:
    import time

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    device = ray.train.torch.get_device() if config["cuda"] else torch.device("cpu")
    buffer = torch.ones(config["numel"], dtype=torch.float32, device=device)
    times = []
    for _ in range(12):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    # Ray Train V2 keeps the metrics of reports that carry a checkpoint: rank 0 sends one.
    metrics = {"allreduce_s": statistics.median(times[2:])}
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def allreduce_seconds(workers: int, nbytes: int, args: argparse.Namespace, root: Path) -> float:
    """Median time of one all-reduce of `nbytes` (float32) across `workers` workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cuda = args.device == "cuda"
    trainer = TorchTrainer(
        _allreduce_loop,
        train_loop_config={"numel": max(nbytes // 4, 1), "cuda": cuda},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cuda),
        run_config=RunConfig(name=f"allreduce-{workers}", storage_path=str(root / "ray")),
    )
    return float(trainer.fit().metrics["allreduce_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4,8")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpu", action="store_true", help="the same as --device cuda")
    parser.add_argument("--address", default=None, help="a Ray cluster; default: private")
    parser.add_argument("--camera", default="480x640", help="HEIGHTxWIDTH of both cameras")
    parser.add_argument(
        "--feature-cache",
        default="off",
        choices=["auto", "on", "off"],
        help="off (default) times the video path; the cache has its own benchmark",
    )
    args = parser.parse_args()
    if args.gpu:
        args.device = "cuda"
    counts = sorted({int(n) for n in args.workers.split(",")})
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves nothing after --warmup {args.warmup}")
    height, width = (int(x) for x in args.camera.split("x"))
    if args.address is None:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = write_demo_dataset(
            str(root / "dataset"), num_episodes=4, episode_length=60, height=height, width=width
        )
        for preset in args.presets.split(","):
            per_worker = BATCH_PER_WORKER[preset]
            weak = {n: run_once(preset, n, per_worker, args, dataset, root) for n in counts}
            # Strong scaling: the largest count's global batch, split across each count.
            global_batch = per_worker * counts[-1]
            strong = {
                n: weak[n] if n == counts[-1] else run_once(
                    preset, n, global_batch // n, args, dataset, root
                )
                for n in counts
                if global_batch % n == 0
            }  # fmt: skip
            for n, record in weak.items():
                record["allreduce_s"] = (
                    allreduce_seconds(n, record["comm_bytes_per_step"], args, root)
                    if n > 1
                    else 0.0
                )
                record["backward_over_one_worker_s"] = (
                    record["backward_s"] - weak[counts[0]]["backward_s"]
                )
            one_weak, one_strong = weak[counts[0]], strong.get(counts[0])
            results[preset] = {
                "weak": {str(n): r for n, r in weak.items()},
                "strong": {str(n): r for n, r in strong.items()},
                "global_batch_strong": global_batch,
                "weak_efficiency": {
                    str(n): r["samples_per_s"] / (n / counts[0] * one_weak["samples_per_s"])
                    for n, r in weak.items()
                },
                "strong_efficiency": {
                    str(n): one_strong["step_s"] / (n / counts[0] * r["step_s"])
                    for n, r in strong.items()
                }
                if one_strong
                else {},
            }
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "device": args.device,
                "camera": args.camera,
                "workers": counts,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

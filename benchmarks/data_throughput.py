"""Data path throughput: video decode access patterns, loader samples/s, data wait per step.

    python benchmarks/data_throughput.py [--height 240 --width 320 --episodes 6 ...]

Writes a synthetic dataset per codec (AV1, H.264) to a temp dir, then prints one JSON object:

- `decode`: frames/s of one decoder, random access (seek to the keyframe, decode to the
  timestamp; what the loader does per sample) vs sequential (one pass through each episode).
- `loader`: samples/s of `ShardedLoader` (2 cameras, chunk 50) with 1 and 2 loader
  processes, and samples/s per CPU core.
- `training_wait`: the share of each simulated training step (a sleep standing in for the
  GPU step) that the loop spends waiting for its next batch.

The default run takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.synthetic import write_demo_dataset
from smolvla_ray.data.video import VideoFile


def decode_rates(root: Path, num_frames: int, fps: int) -> dict[str, float]:
    """Frames/s of random access vs a sequential pass, over one camera's v3.0 file."""
    path = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    times = np.arange(num_frames) / fps
    order = np.random.default_rng(0).permutation(num_frames)
    video = VideoFile(path)
    start = time.perf_counter()
    for t in times[order]:
        video.frames_at([t])
    random_fps = num_frames / (time.perf_counter() - start)
    video = VideoFile(path)
    start = time.perf_counter()
    video.frames_at(times)
    sequential_fps = num_frames / (time.perf_counter() - start)
    return {
        "random_access_frames_per_s": round(random_fps, 1),
        "sequential_frames_per_s": round(sequential_fps, 1),
        "sequential_speedup": round(sequential_fps / random_fps, 2),
    }


def loader_rate(dataset: FrameDataset, *, num_workers: int, batch_size: int, batches: int) -> float:
    """Samples/s of the loader after its warm-up batch."""
    it = iter(ShardedLoader(dataset, batch_size=batch_size, num_workers=num_workers, seed=0))
    next(it)  # worker start-up and first file opens
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def training_wait(
    dataset: FrameDataset, *, num_workers: int, batch_size: int, steps: int, step_s: float
) -> dict[str, float]:
    """Share of a simulated step spent waiting for data (the sleep stands in for the GPU)."""
    it = iter(ShardedLoader(dataset, batch_size=batch_size, num_workers=num_workers, seed=1))
    next(it)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t0
        time.sleep(step_s)
    total = time.perf_counter() - start
    return {
        "simulated_step_s": step_s,
        "mean_wait_per_step_s": round(waited / steps, 4),
        "wait_share_of_step": round(waited / total, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--episode-length", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--step-s", type=float, default=0.25, help="simulated training step")
    parser.add_argument("--codecs", default="av1,h264")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="smolvla-ray-bench-") as tmp:
        for codec in args.codecs.split(","):
            root = Path(tmp) / codec
            start = time.perf_counter()
            write_demo_dataset(
                str(root),
                codec=codec,  # type: ignore[arg-type]
                num_episodes=args.episodes,
                episode_length=args.episode_length,
                height=args.height,
                width=args.width,
            )
            write_s = time.perf_counter() - start
            dataset = FrameDataset(str(root), chunk_size=50)
            rates = {
                f"{n}_process{'es' if n > 1 else ''}": round(
                    loader_rate(
                        dataset, num_workers=n, batch_size=args.batch_size, batches=args.batches
                    ),
                    1,
                )
                for n in (1, 2)
            }
            results[codec] = {
                "write_dataset_s": round(write_s, 2),
                "decode": decode_rates(root, len(dataset), fps=30),
                "loader_samples_per_s": rates,
                "samples_per_s_per_core": round(rates["2_processes"] / min(2, cores), 1),
                "training_wait": training_wait(
                    dataset,
                    num_workers=2,
                    batch_size=args.batch_size,
                    steps=args.batches,
                    step_s=args.step_s,
                ),
            }
    print(
        json.dumps(
            {
                "benchmark": "data_throughput",
                "machine": platform.machine(),
                "cpu_cores": cores,
                "torch": torch.__version__,
                "frame": [args.height, args.width],
                "cameras": 2,
                "chunk_size": 50,
                "batch_size": args.batch_size,
                "loader_access": "random access per sample (seek to keyframe, GOP 2)",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""What held-out evaluation costs a finetune. Prints one JSON object.

Inline (in-process trainer, no Ray; `--presets tiny[,base]`): a run on a synthetic video
dataset that evaluates every `--every` steps; per evaluation its seconds and seconds per
sample, against the median training step, and the share of the run's wall time spent
evaluating. With `--async` (a private Ray): the same tiny job run three ways through
`driver.run` (no eval, inline, async) and the wall time per training step of each; async
evaluation runs in Ray Train validation tasks beside training.

    .venv/bin/python benchmarks/eval_cost.py [--presets tiny] [--async]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from smolvla_ray.data.synthetic import write_demo_dataset
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.trainer import WorkerContext, train

BATCH = {"tiny": 8, "base": 2}


class Recorder:
    """The trainer's reporter: keeps every report's metrics, drops checkpoints."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def report(self, metrics: Mapping[str, Any], checkpoint, *, save: bool, sync: bool) -> None:
        self.records.append(dict(metrics))
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)


def job(dataset: str, storage: Path, name: str, preset: str, steps: int, every: int, **extra):
    return spec_from_dict(
        {
            "name": name,
            "policy": {"preset": preset},
            "data": {"uri": dataset, "num_loader_workers": 1, "feature_cache": "off"},
            "train": {"steps": steps, "batch_size": BATCH[preset], "log_every": 1},
            "checkpoint": {"storage": str(storage), "every_steps": every},
            "observe": {"tensorboard": False},
            **extra,
        }
    )


def inline(preset: str, dataset: str, root: Path, steps: int, every: int, samples: int) -> dict:
    eval_spec = {"split": 0.25, "every_steps": every, "max_samples": samples}
    spec = job(dataset, root, f"inline-{preset}", preset, steps, every, eval=eval_spec)
    recorder = Recorder()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        start = time.perf_counter()
        train(RunSettings.from_spec(spec), recorder, WorkerContext())
        wall = time.perf_counter() - start
    finally:
        dist.destroy_process_group()
    evals = [r for r in recorder.records if "eval/seconds" in r]
    step_s = statistics.median(r["step_s"] for r in recorder.records[2:])
    eval_s = statistics.median(r["eval/seconds"] for r in evals)
    return {
        "batch_size": BATCH[preset],
        "evaluations": len(evals),
        "samples_per_evaluation": int(evals[0]["eval/samples"]),
        "eval_s_median": eval_s,
        "eval_s_per_sample": eval_s / evals[0]["eval/samples"],
        "train_step_s_median": step_s,
        "eval_over_step": eval_s / step_s,
        "eval_share_of_wall": sum(r["eval/seconds"] for r in evals) / wall,
        "wall_s": wall,
    }


def ray_modes(dataset: str, root: Path, steps: int, every: int, samples: int) -> dict:
    """Wall time per training step through `driver.run`: no eval, inline, async."""
    import ray

    from smolvla_ray import driver
    from smolvla_ray.run_layout import run_uri
    from smolvla_ray.train.metrics import read_metrics

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        for mode in ("none", "inline", "async"):
            extra = (
                {}
                if mode == "none"
                else {"eval": {"split": 0.25, "every_steps": every, "max_samples": samples,
                               "mode": mode}}
            )  # fmt: skip
            spec = job(dataset, root, f"ray-{mode}", "tiny", steps, every, **extra)
            start = time.perf_counter()
            driver.run(spec)
            wall = time.perf_counter() - start
            records = read_metrics(run_uri(str(root), spec.name))
            out[mode] = {
                "wall_s": wall,
                "train_step_s_median": statistics.median(r["step_s"] for r in records[2:]),
                "evaluations_logged": sum(1 for r in records if "eval/loss" in r),
            }
    finally:
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--samples", type=int, default=32, help="eval.max_samples")
    parser.add_argument("--async", dest="run_async", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = write_demo_dataset(str(root / "dataset"), num_episodes=8, episode_length=40)
        for preset in args.presets.split(","):
            results[preset] = inline(
                preset, dataset, root / "runs", args.steps, args.every, args.samples
            )
        if args.run_async:
            results["ray_tiny"] = ray_modes(
                dataset, root / "ray", args.steps, args.every, args.samples
            )
    print(json.dumps({"benchmark": "eval_cost", "results": results}, indent=2))


if __name__ == "__main__":
    main()

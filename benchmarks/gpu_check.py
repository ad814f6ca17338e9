"""GPU readiness check: one process, no Ray, no network; prints one JSON object.

For a bare single-GPU machine (torch and transformers installed, the project and the rest
carried along): the device and its bf16 support; that one backward gives every trainable
parameter a gradient and no frozen one (expert-only and full finetune); the parameters' and
the loss's dtypes; timed steps of the in-process trainer (expert-only from video and from
the feature cache, full finetune from video) with peak memory; and the fp32 loss of the
same weights and batch on the device against the CPU. `--ray` adds a one-worker `run`
(NCCL on GPU) with a checkpoint and a resume, where Ray is installed.

    python benchmarks/gpu_check.py                 # base size on cuda, 20 timed steps
    python benchmarks/gpu_check.py --cpu-smoke     # tiny preset on CPU (the test suite's)

The first two steps of each timed run warm up and are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project, when it is carried along and not installed

from smolvla_ray.build import build_policy, open_dataset  # noqa: E402
from smolvla_ray.cache.build import encode_episodes  # noqa: E402
from smolvla_ray.data.synthetic import write_demo_dataset  # noqa: E402
from smolvla_ray.run_layout import run_uri  # noqa: E402
from smolvla_ray.settings import RunSettings  # noqa: E402
from smolvla_ray.spec import JobSpec, spec_from_dict  # noqa: E402
from smolvla_ray.train.ddp import wrap_ddp  # noqa: E402
from smolvla_ray.train.metrics import read_metrics  # noqa: E402
from smolvla_ray.train.setup import build_loader  # noqa: E402
from smolvla_ray.train.step import flow_noise_and_time, to_device  # noqa: E402
from smolvla_ray.train.trainer import WorkerContext, train  # noqa: E402

WARMUP = 2
FULL = {"train_expert_only": False, "freeze_vision_encoder": False}


class Recorder:
    """The trainer's reporter: keeps every step's metrics, drops checkpoints."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def report(self, metrics: Mapping[str, Any], checkpoint, *, save: bool, sync: bool) -> None:
        self.records.append(dict(metrics))


def job(dataset: str, storage: Path, name: str, preset: str, steps: int, gpu: bool, **policy):
    return spec_from_dict(
        {
            "name": name,
            "policy": {"preset": preset, **policy},
            "data": {"uri": dataset, "num_loader_workers": 0, "feature_cache": "off"},
            "train": {"steps": steps, "batch_size": 2, "log_every": 1},
            "scaling": {"use_gpu": gpu},
            "checkpoint": {"storage": str(storage), "every_steps": None},
            "observe": {"tensorboard": False},
        }
    )


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        info.update(
            name=torch.cuda.get_device_name(device),
            capability=list(torch.cuda.get_device_capability(device)),
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
            memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1),
        )
    else:
        info["bf16_supported"] = False
    return info


def one_backward(spec: JobSpec, device: torch.device, autocast: torch.dtype | None):
    """(policy, per-sample loss) after one forward/backward of the first batch."""
    settings = RunSettings.from_spec(spec)
    meta = open_dataset(settings, storage_options={})
    torch.manual_seed(spec.train.seed)
    policy = build_policy(settings, meta, storage_options={}).to(device)
    policy.train()
    ddp, _ = wrap_ddp(policy, device=device)
    loader = build_loader(
        settings, meta, policy, rank=0, world_size=1, cursor=None, storage_options={}, device=device
    )
    raw = next(iter(loader))
    noise, flow_time = flow_noise_and_time(
        raw["index"].tolist(), seed=spec.train.seed, step=0,
        chunk_size=policy.config.chunk_size, action_dim=policy.config.max_action_dim,
    )  # fmt: skip
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
        per_sample = ddp(to_device(raw, device), noise.to(device), flow_time.to(device))
    per_sample.sum().backward()
    return policy, per_sample.detach().float().cpu()


def gradients(policy: torch.nn.Module, per_sample: torch.Tensor) -> dict[str, Any]:
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in policy.named_parameters() if not p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    leaked = [n for n, p in frozen if p.grad is not None]
    return {
        "trainable_tensors": len(trainable),
        "trainable_params": sum(p.numel() for _, p in trainable),
        "frozen_params": sum(p.numel() for _, p in frozen),
        "without_gradient": missing[:5],
        "frozen_with_gradient": leaked[:5],
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for _, p in trainable}),
        "loss_dtype": str(per_sample.dtype).removeprefix("torch."),
        "ok": not missing and not leaked,
    }


def timed(spec: JobSpec, device: torch.device, feature_cache: str | None) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    recorder = Recorder()
    context = WorkerContext(device=device, feature_cache=feature_cache)
    start = time.perf_counter()
    train(RunSettings.from_spec(spec), recorder, context)
    steps = [r for r in recorder.records if r["step"] > WARMUP]
    ms = sorted(r["step_s"] * 1000 for r in steps)
    return {
        "steps_timed": len(steps),
        "step_ms_median": round(statistics.median(ms), 2),
        "step_ms_max": round(ms[-1], 2),
        "samples_per_s": round(statistics.median(r["samples_per_s"] for r in steps), 2),
        "peak_memory_mb": round(max(r["peak_memory_mb"] for r in recorder.records), 1),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def ray_resume(dataset: str, storage: Path, preset: str, gpu: bool) -> dict[str, Any]:
    """A one-worker `run` with a checkpoint, then the same job with more steps: it resumes."""
    try:
        import ray
    except ImportError:
        return {"skipped": "Ray is not installed"}
    from smolvla_ray import driver

    first = job(dataset, storage, "ray-resume", preset, 4, gpu).public_dict()
    first["checkpoint"]["every_steps"] = 2
    driver.run(spec_from_dict(first), progress=None)
    more = {**first, "train": {**first["train"], "steps": 6}}
    result = driver.run(spec_from_dict(more), progress=None)
    ray.shutdown()
    last = read_metrics(run_uri(str(storage), "ray-resume"))[-1]
    step, resumed = result.metrics.get("step"), last.get("resumed_from_step")
    return {"final_step": step, "resumed_from_step": resumed, "ok": step == 6 and resumed == 4}


def main() -> None:
    """Parse the flags and run the checks; the trainer's progress lines go to stderr so
    that stdout holds the JSON alone."""
    with contextlib.redirect_stdout(sys.stderr):
        out = checks()
    print(json.dumps(out, indent=2))


def checks() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--ray", action="store_true", help="also a one-worker run + resume")
    args = parser.parse_args()
    started = time.perf_counter()
    gpu = not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke for the CPU check")
    device = torch.device("cuda" if gpu else "cpu")
    preset, steps = ("base", args.steps) if gpu else ("tiny", min(args.steps, 4))
    autocast = torch.bfloat16 if gpu else None
    backend = "nccl" if gpu else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    out: dict[str, Any] = {"benchmark": "gpu_check", "device": device_info(device)}
    out["preset"], out["precision"] = preset, "bf16" if autocast else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = write_demo_dataset(str(root / "data"), num_episodes=2, episode_length=40)
        runs = root / "runs"
        expert = job(dataset, runs, "expert", preset, WARMUP + steps, gpu)
        full = job(dataset, runs, "full", preset, WARMUP + steps, gpu, **FULL)
        out["gradients"] = {
            "expert_only": gradients(*one_backward(expert, device, autocast)),
            "full_finetune": gradients(*one_backward(full, device, autocast)),
        }
        # The same weights and batch in fp32, on the device and on the CPU.
        _, on_device = one_backward(expert, device, None)
        _, on_cpu = one_backward(expert, torch.device("cpu"), None)
        out["fp32_loss_device_vs_cpu"] = {
            "device": on_device.mean().item(),
            "cpu": on_cpu.mean().item(),
            "max_abs_diff": (on_device - on_cpu).abs().max().item(),
        }
        cache = str(root / "feature-cache")
        encode_episodes(RunSettings.from_spec(expert), {}, cache, [0, 1])
        out["steps"] = {
            "expert_only_video": timed(expert, device, None),
            "expert_only_cache": timed(
                job(dataset, runs, "expert-cache", preset, WARMUP + steps, gpu), device, cache
            ),
            "full_finetune_video": timed(full, device, None),
        }
        dist.destroy_process_group()
        if args.ray:
            out["ray"] = ray_resume(dataset, root / "ray-runs", preset, gpu)
        else:
            out["ray"] = {"skipped": "not asked (--ray)"}
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


if __name__ == "__main__":
    main()

"""Step time (forward + backward) of the no-grad prefix against LeRobot's joint forward.

Prints one JSON object: per preset, the median forward/backward/step seconds of each mode,
the speed-up ratio, and the loss of each mode (equal up to float error). CPU by default.

    .venv/bin/python benchmarks/prefix_step.py [--presets tiny,base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy


def make_batch(config: PolicyConfig, batch_size: int, image_hw: tuple[int, int]) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        key: torch.rand(batch_size, 3, *image_hw, generator=g) for key in config.image_features
    }
    batch["observation.state"] = torch.randn(batch_size, config.state_dim, generator=g)
    batch["action"] = torch.randn(batch_size, config.chunk_size, config.action_dim, generator=g)
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    batch["observation.language.tokens"] = torch.randint(5, 300, (batch_size, 16), generator=g)
    batch["observation.language.attention_mask"] = torch.ones(batch_size, 16, dtype=torch.bool)
    return batch


def time_mode(policy: SmolVLAPolicy, batch: dict, mode: str, repeats: int) -> dict:
    policy.prefix_mode = mode  # type: ignore[assignment]
    g = torch.Generator().manual_seed(1)
    size = batch["action"].shape[0]
    noise = torch.randn(size, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    t = torch.rand(size, generator=g)
    forwards, backwards, loss = [], [], None
    for i in range(repeats + 1):  # the first run warms up allocators
        policy.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = policy(dict(batch), noise=noise, time=t)
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        if i:
            forwards.append(mid - start)
            backwards.append(end - mid)
    fwd, bwd = statistics.median(forwards), statistics.median(backwards)
    return {"forward_s": fwd, "backward_s": bwd, "step_s": fwd + bwd, "loss": loss.item()}


def run(preset: str, batch_size: int, cameras: int, image_hw: tuple[int, int], repeats: int):
    config = PolicyConfig.preset(preset).with_features(  # type: ignore[arg-type]
        state_dim=6, action_dim=6, cameras={f"cam{i}": (3, *image_hw) for i in range(cameras)}
    )
    torch.manual_seed(0)
    policy = SmolVLAPolicy(config)
    policy.train()
    batch = make_batch(config, batch_size, image_hw)
    joint = time_mode(policy, batch, "joint", repeats)
    no_grad = time_mode(policy, batch, "no_grad", repeats)
    return {
        "batch_size": batch_size,
        "cameras": cameras,
        "image_hw": list(image_hw),
        "joint": joint,
        "no_grad_prefix": no_grad,
        "step_speedup": joint["step_s"] / no_grad["step_s"],
        "backward_speedup": joint["backward_s"] / no_grad["backward_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"tiny": (8, 2, (96, 128)), "base": (2, 2, (480, 640))}
    results = {
        preset: run(preset, *shapes[preset], repeats=args.repeats)
        for preset in args.presets.split(",")
    }
    print(
        json.dumps(
            {
                "benchmark": "prefix_step",
                "device": "cpu",
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
